"""benchmarks/parallel_cells.py: a setting's cells as parallel jobs, in an order that keeps one
writer per store (the generator's cell first, a recipe's seeds after its first), first seeds
first, and the cells an earlier lease finished left out."""

import argparse
import importlib
import os
import time
from pathlib import Path

import pytest

from synthaug.bench import load_suite
from synthaug.bench.suite import settings_of

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SUITE = """
name: parallel
classifier_seeds: [0, 1]
generator_seeds: [0]
steps: 20
common: [data.dataset=digits, split.kind=long-tail, split.ratio=5, generator.steps=2]
recipes:
  ce: [recipe=ce]
  synaug: [recipe=synaug]
  synaug, all generated: [recipe=synaug, synaug.replay_share=0]
  real replay: [recipe=synaug, synaug.replay=true]
  oracle: [recipe=oracle]
settings:
  digits: []
"""


@pytest.fixture
def parallel(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("parallel_cells")


def test_jobs_keep_one_writer_per_store_and_start_first_seeds_first(parallel, tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(str(tmp_path / "s.yaml"))
    jobs = parallel.plan_jobs(suite, "digits", tmp_path / "out", last=["oracle"])
    by = {(j.cell.recipe, j.cell.seed): j for j in jobs}
    first = by["synaug", 0]
    assert first.after == [] and first.alone and jobs[0] is first  # it trains the generator: first, alone
    # one store for both SYNAuG recipes (replay_share changes no image): their first seeds one after another
    assert by["synaug, all generated", 0].after == [first.name]
    # the other seeds read the store once its last writer is done (a reader repairs what it finds)
    assert by["synaug", 1].after == by["synaug, all generated", 1].after == [by["synaug, all generated", 0].name]
    assert by["real replay", 0].after == [] and not by["real replay", 0].generative  # no generator, no store
    order = [(j.cell.recipe, j.cell.seed) for j in jobs]
    assert order.index(("ce", 0)) < order.index(("ce", 1)) < order.index(("oracle", 0))  # --last: after all others
    assert len({j.name for j in jobs}) == len(jobs) == 10


def test_skip_leaves_out_finished_cells_and_the_next_seed_fills_the_store(parallel, tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(str(tmp_path / "s.yaml"))
    everything = {(j.cell.recipe, j.cell.seed): j.name for j in parallel.plan_jobs(suite, "digits", tmp_path / "a")}
    ran = {c.key for c in suite.cells_ if c.seed == 0 and c.recipe in ("ce", "synaug")}
    jobs = parallel.plan_jobs(suite, "digits", tmp_path / "b", skip=ran)
    by = {(j.cell.recipe, j.cell.seed): j for j in jobs}
    assert ("ce", 0) not in by and ("synaug", 0) not in by and len(jobs) == 8
    # a new machine holds no generator and no store: the first generative cell left trains and fills them
    head = by["synaug, all generated", 0]
    assert head.after == [] and head.alone and by["synaug", 1].after == [head.name]
    assert all(everything[k] == j.name for k, j in by.items())  # a cell's job has one name in every lease


def test_a_row_counts_as_finished_unless_its_cell_changed(parallel, tmp_path):
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(str(tmp_path / "s.yaml"))
    cell = next(c for c in suite.cells_ if c.recipe == "ce" and c.seed == 0)
    settings = settings_of(cell.config)
    older = {k: v for k, v in settings.items() if k != "train.data_on_device"}  # a row from before that option
    rows = [{"cell": cell.key, "fingerprint": "before", "settings": older},
            {"cell": "no such cell", "fingerprint": cell.fingerprint, "settings": settings}]
    assert parallel.finished(suite, rows) == {cell.key}
    edited = {**settings, "train.lr": settings["train.lr"] * 2}  # the suite's cell differs from what ran
    assert parallel.finished(suite, [{"cell": cell.key, "fingerprint": "before", "settings": edited}]) == set()


class FakeProcess:
    """A job that ends at once: rc 1 for the cells in FAIL (recipe labels), else 0 (without a row)."""
    FAIL: set = set()

    def __init__(self, cmd, **kw):
        self.pid, self.returncode = os.getpid(), 1 if cmd[cmd.index("--recipe") + 1] in self.FAIL else 0
        STARTED.append(cmd[cmd.index("--recipe") + 1])

    def poll(self):
        return self.returncode


STARTED: list = []


def test_a_failed_cell_drops_what_waits_on_it_and_the_run_ends(parallel, tmp_path, monkeypatch):
    (tmp_path / "s.yaml").write_text(SUITE)
    STARTED.clear()
    monkeypatch.setattr(FakeProcess, "FAIL", {"synaug"})
    monkeypatch.setattr(parallel.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(parallel.os, "killpg", lambda pid, sig: None)
    monkeypatch.setattr(parallel.time, "sleep", lambda s: None)
    args = argparse.Namespace(suite=str(tmp_path / "s.yaml"), setting="digits", out=str(tmp_path / "out"), workers=4,
                              minutes=60.0, stop=float("inf"), export=None, commit=None, last=[], skip=[], alone=True)
    t0 = time.perf_counter()
    assert parallel.run(args) == 1  # a cell failed
    assert time.perf_counter() - t0 < 60  # it did not wait for --minutes with nothing to start
    # every SYNAuG cell (both fills share the failed cell's generator and store) dropped, the others ran
    assert STARTED.count("synaug") == 1 and "synaug, all generated" not in STARTED
    assert sorted(set(STARTED)) == ["ce", "oracle", "real replay", "synaug"] and len(STARTED) == 7
    assert STARTED[0] == "synaug"  # --alone: the generator's cell first, alone
