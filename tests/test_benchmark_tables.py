"""The benchmark tables are made from their results files alone: summarising each results
file again gives the table beside it and in BENCHMARKS.md, to the character. The method
tables are `synthaug bench` leaderboards of the shipped suites."""

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("key", ["dpt_limits", "executors", "selection", "speed"])
def test_each_table_regenerates_from_its_results(key, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("SYNTHAUG_CIFAR10", "")  # the benchmarks would point it at ../shared/data
    for name in (key, "common", "sampler"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    common = importlib.import_module("common")
    module = importlib.import_module(key)
    rows = common.read_rows(BENCHMARKS / "results" / f"{key}.jsonl")
    # the selection table ranks AugCond's modes too, by their accuracy in the former AugCond results
    extra = [common.read_rows(BENCHMARKS / "results" / "augcond.jsonl")] if key == "selection" else []
    table = module.summarise(rows, *extra).strip()
    assert table == (BENCHMARKS / "results" / f"{key}.md").read_text().strip()
    assert table in (BENCHMARKS.parent / "BENCHMARKS.md").read_text()


@pytest.mark.parametrize("suite", ["longtail-small", "targeted-small", "fewshot-small", "cifar10-gpu", "longtail"])
def test_each_leaderboard_regenerates_from_its_bench_results(suite):
    from synthaug.bench import leaderboard_markdown, load_suite, read_results
    from synthaug.bench.leaderboard import setting_tables

    out = BENCHMARKS / "results" / "bench" / suite
    found, rows = load_suite(suite), read_results(out)
    assert rows and leaderboard_markdown(found, rows) == (out / "leaderboard.md").read_text()
    document = (BENCHMARKS.parent / "BENCHMARKS.md").read_text()
    placed = 0
    for setting, table in setting_tables(found, rows).items():
        if f"<!-- bench:{suite}:{setting}:start -->" in document:  # settings still running have no place yet
            assert f"<!-- bench:{suite}:{setting}:start -->\n{table.strip()}\n<!-- bench:{suite}:{setting}:end -->" in document
            placed += 1
    assert placed


def test_backfill_gives_older_rows_what_their_cells_recorded(tmp_path, monkeypatch):
    import json

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "tables", raising=False)
    tables = importlib.import_module("tables")
    (tmp_path / "cells" / "a").mkdir(parents=True)
    (tmp_path / "cells" / "a" / "metrics.json").write_text(json.dumps(
        {"curve": [[10, 0.5]], "generator": {"train_seconds": 3209.0}, "synthetic": {"images": 8}}))
    # a cell that resumed its generator's training recorded only its own part of it; one that found the
    # generator trained recorded none
    rows = [{"run": "cells/a", "generator": "g", "generator_train_seconds": 63.0, "images_generated": 8},
            {"run": "cells/a", "generator": "g", "generator_train_seconds": None, "images_generated": 8},
            {"run": "cells/gone", "generator": "g", "generator_train_seconds": 63.0, "images_generated": 8},
            {"run": "cells/gone", "generator": "g", "generator_train_seconds": None, "images_generated": 8},
            {"run": "cells/gone", "generator": "h", "generator_train_seconds": None, "images_generated": 8}]
    assert tables.backfill(rows, tmp_path)
    # a row whose folder is gone keeps what it recorded, and takes the generator's time from another row
    # when it recorded none; a generator no row timed stays untimed
    assert [r["generator_train_seconds"] for r in rows] == [3209.0, 3209.0, 63.0, 3209.0, None]
    assert rows[0]["curve"] == [[10, 0.5]] and "curve" not in rows[2]
    assert not tables.backfill(rows, tmp_path)  # nothing more to give


CONTROL = ["synaug, Min-SNR float32, replay share 0.5@0,1", "synaug, replay share 0.5, generator seeds 2 and 3@2,3"]
CBDM = "synaug, replay share 0.5, generator CBDM 0.1"


@pytest.mark.parametrize("row, baseline, quoted", [
    ([CBDM], CONTROL, "-0.04 (-0.26 to +0.17)"),
    ([f"{CBDM}, guidance 4"], [CBDM], "-0.01 (-0.31 to +0.29)"),
    ([f"{CBDM}, guidance 4"], CONTROL, "-0.05 (-0.20 to +0.09)"),
    ([f"{CBDM}, novel filter"], [CBDM], "+0.20 (-0.14 to +0.54)"),
    ([f"{CBDM}, novel filter of 4x"], [CBDM], "+0.06 (-0.20 to +0.32)"),
    ([f"{CBDM}, novel filter"], ["balanced-softmax, replay's steps (960)"], "-0.29 (-0.76 to +0.18)"),
    (["synaug, replay share 0.5, hard filter"], CONTROL, "+0.01 (-0.40 to +0.41)"),
    (["synaug, replay share 0.5, guidance 3 in (0.28, 5.42]"], CONTROL, "-0.23 (-0.46 to -0.00)"),
    (["synaug, replay share 0.5, guidance 2@0,1", "synaug, replay share 0.5, guidance 2, generator seeds 2 and 3@2,3"],
     CONTROL, "-0.00 (-0.21 to +0.20)"),
    (["synaug, replay share 0.5, guidance 2"], ["real replay@-"], "+1.33 (+0.89 to +1.77)"),
])
def test_readings_over_generators_regenerate_from_the_results(row, baseline, quoted, monkeypatch):
    """BENCHMARKS' readings that pair rows over generator seeds (benchmarks/pair_rows.py), from the results file."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    pair_rows = importlib.import_module("pair_rows")
    rows = pair_rows.read_rows(pair_rows.RESULTS)
    result = pair_rows.pair(pair_rows.control(rows, "MNIST-5k-LT r50", row),
                            pair_rows.control(rows, "MNIST-5k-LT r50", baseline))
    assert result["generators"] == ([0, 1] if "real replay@-" in baseline else [0, 1, 2, 3])
    assert result["seeds"] == [0, 1, 2, 3, 4]
    assert pair_rows.interval_text(*result["over"]) == quoted
    assert quoted in (BENCHMARKS.parent / "BENCHMARKS.md").read_text()


def test_pair_rows_merges_a_control_and_pairs_a_baseline_without_generator(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    pair_rows = importlib.import_module("pair_rows")
    rows = [{"setting": "s", "recipe": r, "generator_seed": g, "seed": s, "metrics": {"balanced_accuracy": v}}
            for r, g, s, v in [("a", 0, 0, 0.90), ("a", 0, 1, 0.92), ("a", 1, 0, 0.94), ("a", 1, 1, 0.98),
                               ("c", 0, 0, 0.90), ("c", 0, 1, 0.91), ("c", 1, 0, 0.5), ("c", 1, 1, 0.5),
                               ("d", 1, 0, 0.93), ("d", 1, 1, 0.95), ("bs", None, 0, 0.91), ("bs", None, 1, 0.93)]]
    merged = pair_rows.control(rows, "s", ["c@0", "d@1"])  # c's generator 1 left out
    assert merged == {(0, 0): 0.90, (0, 1): 0.91, (1, 0): 0.93, (1, 1): 0.95}
    result = pair_rows.pair(pair_rows.cells(rows, "s", "a"), merged)
    assert result["by_generator"][0][0] == pytest.approx(0.005) and result["by_generator"][1][0] == pytest.approx(0.02)
    assert result["means"] == pytest.approx((0.935, 0.9225))
    against = pair_rows.pair(pair_rows.cells(rows, "s", "a"), pair_rows.cells(rows, "s", "bs"))
    assert against["by_generator"] == {} and against["means"] == pytest.approx((0.935, 0.92))
    with pytest.raises(SystemExit, match="already"):
        pair_rows.control(rows, "s", ["c", "d"])
    with pytest.raises(SystemExit, match="share no generator seed"):
        pair_rows.pair(pair_rows.cells(rows, "s", "c@0"), pair_rows.cells(rows, "s", "d"))
    with pytest.raises(SystemExit, match="no cells"):
        pair_rows.cells(rows, "s", "c@7")
    with pytest.raises(SystemExit, match=r"no cells at generator seeds \[7\]"):
        pair_rows.cells(rows, "s", "c@0,7")
    with pytest.raises(SystemExit, match="after '@'"):
        pair_rows.cells(rows, "s", "c@0,")
    free = pair_rows.cells(rows, "s", "d@-")  # a row without a generator whose cells carry a generator seed
    assert free == {(None, 0): 0.93, (None, 1): 0.95}
    with pytest.raises(SystemExit, match="cannot mix"):
        pair_rows.control(rows, "s", ["c@0", "bs"])
    with pytest.raises(SystemExit, match="two cells"):
        pair_rows.cells(rows + rows[:1], "s", "a")
    with pytest.raises(SystemExit, match="no classifier seed"):
        pair_rows.pair({(0, 0): 0.9}, {(0, 1): 0.9})
    assert pair_rows.worth(rows, "s", pair_rows.cells(rows, "s", "a"), "bs", "d@-") == pytest.approx((0.935 - 0.92) / 0.02)
    assert pair_rows.worth(rows, "s", pair_rows.cells(rows, "s", "a"), "bs", "bs") is None
