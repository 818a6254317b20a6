"""The benchmark tables are made from their results files alone: summarising each results
file again gives the table beside it and in BENCHMARKS.md, to the character."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("key", ["augcond", "tada", "utilgen", "executors", "selection", "speed"])
def test_each_table_regenerates_from_its_results(key, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("SYNTHAUG_CIFAR10", "")  # the benchmarks would point it at ../shared/data
    for name in (key, "common", "sampler"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    common = importlib.import_module("common")
    module = importlib.import_module(key)
    rows = common.read_rows(BENCHMARKS / "results" / f"{key}.jsonl")
    extra = [common.read_rows(BENCHMARKS / "results" / "augcond.jsonl")] if key == "selection" else []
    table = module.summarise(rows, *extra).strip()
    assert table == (BENCHMARKS / "results" / f"{key}.md").read_text().strip()
    assert table in (BENCHMARKS.parent / "BENCHMARKS.md").read_text()
