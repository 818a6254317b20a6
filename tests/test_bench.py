"""`synthaug bench`: the smoke suite end to end, resuming an interrupted suite without redoing
a finished cell, refusing (or with --force re-running) a changed cell, re-running chosen cells
after a code change (--rerun), and the leaderboard's
interval and verdict on made-up numbers with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

import synthaug.runs
from synthaug.bench import leaderboard_markdown, load_suite, read_results, run_suite, shipped
from synthaug.bench.leaderboard import _gap, costs, setting_summary
from synthaug.bench.runner import result_row
from synthaug.errors import SynthaugError

TWO_BASELINES = """
name: tiny
classifier_seeds: [0, 1]
steps: 20
common: [data.dataset=digits, split.ratio=5, train.batch_size=64, train.augment=none]
recipes:
  ce: [recipe=ce]
  balanced-softmax: [recipe=balanced-softmax]
settings:
  digits: []
"""


def test_the_smoke_suite_runs_and_writes_results_and_a_leaderboard(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["bench", "smoke", "--out", str(tmp_path / "smoke"), "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    rows = read_results(tmp_path / "smoke")
    suite = load_suite("smoke")
    assert sorted(r["cell"] for r in rows) == sorted(c.key for c in suite.cells_) and len(rows) == 6
    for r in rows:
        assert {"suite", "setting", "recipe", "seed", "metrics", "seconds", "device", "commit", "version",
                "images_generated", "fingerprint"} <= set(r)
        assert 0 <= r["metrics"]["balanced_accuracy"] <= 1
    generated = [r for r in rows if r["recipe"] == "synaug"]
    assert all(r["images_generated"] > 0 for r in generated)
    assert sum(r["generated_now"] for r in generated) == generated[0]["images_generated"]  # one store, both seeds
    board = (tmp_path / "smoke" / "leaderboard.md").read_text()
    synaug = next(line for line in board.splitlines() if "synaug |" in line)
    assert any(v in synaug for v in ("| gain |", "| loss |", "| no significant difference |"))
    assert "Best classical baseline:" in board and "| ce |" in board
    page = (tmp_path / "smoke" / "leaderboard.html").read_text()
    assert page.count("<img src=\"data:image/png;base64,") == 2  # accuracy against cost, per class


def _suite(tmp_path: Path, text: str = TWO_BASELINES) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def test_an_interrupted_suite_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    suite = load_suite(str(_suite(tmp_path)))
    out = tmp_path / "out"
    real_train_run, calls = synthaug.runs.train_run, []

    def interrupted(config, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the third cell
        calls.append(config.name)
        return real_train_run(config, **kwargs)

    monkeypatch.setattr(synthaug.runs, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out, progress=False, echo=lambda _: None)
    first = {r["cell"]: r for r in read_results(out)}
    assert len(first) == 2 and (out / "leaderboard.md").is_file()  # what finished is kept and shown

    calls.clear()
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (calls.append(config.name),
                                                                           real_train_run(config, **kw))[1])
    rows = run_suite(suite, out, progress=False, echo=lambda _: None)
    assert len(calls) == 2 and len(rows) == 4 == len({r["cell"] for r in read_results(out)})
    for key, row in first.items():  # the finished cells were not redone
        assert next(r for r in read_results(out) if r["cell"] == key) == row
    calls.clear()
    run_suite(suite, out, progress=False, echo=lambda _: None)
    assert calls == []  # idempotent


def test_damaged_result_rows_are_skipped_and_their_cells_run_again(tmp_path, capsys, monkeypatch):
    """A results line that is JSON but not a bench row (a field missing or of the wrong type) is
    skipped with a warning, like one that is not JSON: the leaderboard is written from the rest
    and the damaged cell runs again."""
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    rows = run_suite(suite, out, progress=False, echo=lambda _: None)
    good, damaged = rows[0], dict(rows[1], settings=5)
    lines = [json.dumps(good), json.dumps(damaged), json.dumps({"cell": "x"}),
             json.dumps(dict(rows[2], metrics=5)), json.dumps(dict(rows[3], seed="0"))]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert read_results(out) == [good]
    assert "line 2 is not a bench row" in capsys.readouterr().err
    code, _, err = run_cli(["bench", str(_suite(tmp_path)), "--out", str(out), "--report-only"], capsys, monkeypatch)
    assert code == 0 and "Traceback" not in err, err
    real_train_run, calls = synthaug.runs.train_run, []
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (calls.append(config.name),
                                                                           real_train_run(config, **kw))[1])
    run_suite(suite, out, progress=False, echo=lambda _: None)
    assert len(calls) == 3 and {r["cell"] for r in read_results(out)} == {c.key for c in suite.cells_}


def test_a_changed_cell_is_refused_then_rerun_with_force(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_suite(load_suite(str(_suite(tmp_path))), out, progress=False, echo=lambda _: None)
    before = (out / "results.jsonl").read_text()
    edited = load_suite(str(_suite(tmp_path, TWO_BASELINES.replace("balanced-softmax: [recipe=balanced-softmax]",
                                                                     "balanced-softmax: [recipe=balanced-softmax, train.lr=0.02]"))))
    with pytest.raises(SynthaugError, match=r"2 cell\(s\) of suite 'tiny' changed .*--force"):
        run_suite(edited, out, progress=False, echo=lambda _: None)
    assert (out / "results.jsonl").read_text() == before
    real_train_run, calls = synthaug.runs.train_run, []
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (calls.append(kw["force"]),
                                                                           real_train_run(config, **kw))[1])
    rows = run_suite(edited, out, force=True, progress=False, echo=lambda _: None)
    assert calls == [True, True] and len(rows) == 4
    fingerprints = {c.key: c.fingerprint for c in edited.cells_}
    assert all(r["fingerprint"] == fingerprints[r["cell"]] for r in read_results(out))


def test_a_stopped_cell_changed_since_is_refused_before_any_write_then_rerun_with_force(tmp_path, monkeypatch):
    """A cell stopped in its run (its folder holds its config and partial work), then its recipe
    edited: refused at the start like a finished cell that changed, not in the middle of the suite."""
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    real_train_run, calls = synthaug.runs.train_run, []

    def stopped(config, **kwargs):
        if len(calls) == 2:  # the third cell starts its run, writes some work, then Ctrl-C
            run_dir = Path(config.output_dir) / config.run_name()
            synthaug.runs.prepare_run_dir(run_dir, config)
            (run_dir / "checkpoint").mkdir()
            raise KeyboardInterrupt
        calls.append(config.recipe)
        return real_train_run(config, **kwargs)

    monkeypatch.setattr(synthaug.runs, "train_run", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out, progress=False, echo=lambda _: None)
    assert calls == ["ce", "ce"]
    edited = load_suite(str(_suite(tmp_path, TWO_BASELINES.replace("balanced-softmax: [recipe=balanced-softmax]",
                                                                     "balanced-softmax: [recipe=balanced-softmax, train.lr=0.02]"))))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SynthaugError, match=r"1 cell\(s\) of suite 'tiny' changed .*train.lr.*--force"):
        run_suite(edited, out, progress=False, echo=lambda _: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing written
    forced = []
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (forced.append(kw["force"]),
                                                                           real_train_run(config, **kw))[1])
    said = []
    rows = run_suite(edited, out, force=True, progress=False, echo=said.append)
    assert sorted(forced) == [False, True] and len(rows) == 4  # the stopped cell's folder replaced, the other new
    assert said[0].startswith("suite tiny: 4 cells, 2 finished, 2 to run")


def test_rerun_runs_only_the_chosen_finished_cells_afresh(tmp_path, monkeypatch):
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    run_suite(suite, out, progress=False, echo=lambda _: None)
    before = {r["cell"]: r for r in read_results(out)}
    with pytest.raises(SynthaugError, match="--rerun .* --recipe"):
        run_suite(suite, out, rerun=True, progress=False, echo=lambda _: None)  # a whole suite is a new --out
    real_train_run, calls = synthaug.runs.train_run, []
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (calls.append((config.recipe, kw["force"])),
                                                                           real_train_run(config, **kw))[1])
    run_suite(suite, out, rerun=True, recipes=["balanced-softmax"], progress=False, echo=lambda _: None)
    assert calls == [("balanced-softmax", True)] * 2  # its run folders replaced, ce untouched
    after = {r["cell"]: r for r in read_results(out)}
    assert after.keys() == before.keys()
    for key, row in after.items():
        assert (row == before[key]) == (row["recipe"] == "ce")  # each rerun cell's row replaced, not added


@pytest.mark.parametrize("again", [True, False], ids=["the same --rerun", "a plain run"])
def test_an_interrupted_rerun_goes_on_where_it_stopped(tmp_path, monkeypatch, again):
    """Interrupted in its second cell, a --rerun run again keeps the cell it redid and resumes the
    one it was running from its checkpoint (a plain run goes on with it too)."""
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    run_suite(suite, out, progress=False, echo=lambda _: None)
    real_train_run, calls = synthaug.runs.train_run, []

    def interrupted(config, **kw):
        calls.append((config.name, kw["force"]))
        if len(calls) == 2:  # the second cell's fresh run starts, writes a checkpoint, then Ctrl-C
            run_dir = Path(config.output_dir) / config.run_name()
            synthaug.runs.prepare_run_dir(run_dir, config, force=kw["force"])
            (run_dir / "checkpoint").mkdir()
            raise KeyboardInterrupt
        return real_train_run(config, **kw)

    monkeypatch.setattr(synthaug.runs, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out, rerun=True, recipes=["balanced-softmax"], progress=False, echo=lambda _: None)
    assert [force for _, force in calls] == [True, True]
    stopped = calls[1][0]
    before = {r["cell"]: r for r in read_results(out)}
    resumed = []

    def resume(config, **kw):
        run_dir = Path(config.output_dir) / config.run_name()
        resumed.append((config.name, kw["force"], (run_dir / "checkpoint").is_dir()))
        return real_train_run(config, **kw)

    monkeypatch.setattr(synthaug.runs, "train_run", resume)
    said = []
    run_suite(suite, out, rerun=again, recipes=["balanced-softmax"] if again else (), progress=False, echo=said.append)
    assert resumed == [(stopped, False, True)]  # not redone from scratch; the redone cell not at all
    assert any("the 1 cell(s) it redid are kept" in s for s in said)
    after = {r["cell"]: r for r in read_results(out)}
    assert [after[k]["run"] for k in after if after[k] != before[k]] == [f"cells/{stopped}"]
    assert not (out / ".synthaug-pending.json").exists()
    resumed.clear()
    run_suite(suite, out, progress=False, echo=lambda _: None)
    assert resumed == []


def test_a_rerun_left_interrupted_does_not_hold_back_a_later_rerun_of_other_cells(tmp_path, monkeypatch):
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    run_suite(suite, out, progress=False, echo=lambda _: None)
    real_train_run, calls = synthaug.runs.train_run, []

    def interrupted(config, **kw):
        calls.append(config.recipe)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_run(config, **kw)

    monkeypatch.setattr(synthaug.runs, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):  # balanced-softmax's batch: one cell redone, one left
        run_suite(suite, out, rerun=True, recipes=["balanced-softmax"], progress=False, echo=lambda _: None)
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (calls.append(config.recipe),
                                                                           real_train_run(config, **kw))[1])
    for _ in range(2):  # ce's own batch, finished, then ce's cells afresh again after another code change
        calls.clear()
        run_suite(suite, out, rerun=True, recipes=["ce"], progress=False, echo=lambda _: None)
        assert calls == ["ce", "ce"]
    calls.clear()
    run_suite(suite, out, progress=False, echo=lambda _: None)  # balanced-softmax's batch goes on
    assert calls == ["balanced-softmax"] and not (out / ".synthaug-pending.json").exists()


def test_the_data_caches_are_written_before_the_first_cell(tmp_path, monkeypatch):
    """So a cache that cannot be written stops the bench before --rerun or --force clears a cell."""
    from conftest import write_image_folder

    images, cache = write_image_folder(tmp_path / "images", counts=(6, 6)), tmp_path / "cache"
    suite = load_suite(str(_suite(tmp_path, TWO_BASELINES.replace("data.dataset=digits",
                                                                  f"data.dataset={images}, data.cache_dir={cache}"))))
    real_train_run, cached = synthaug.runs.train_run, []
    monkeypatch.setattr(synthaug.runs, "train_run", lambda config, **kw: (
        cached.append(sorted(p.name for p in (cache / "folders").glob("*.safetensors"))), real_train_run(config, **kw))[1])
    run_suite(suite, tmp_path / "out", seeds=[0], recipes=["ce"], progress=False, echo=lambda _: None)
    assert len(cached) == 1 and len(cached[0]) == 1  # the folder's decoded images, there before the cell ran


def _fake_runs(monkeypatch, out: Path, what) -> list:
    """Replace each cell's run by a stub that records `what(config)` and a result; returns the records."""
    calls = []

    def fake_run(config, **kw):
        calls.append(what(config))
        (out / "cells" / config.name).mkdir(parents=True)
        return out / "cells" / config.name, {"test": {"balanced_accuracy": 0.5}, "seconds": {"train": 1.0}}

    monkeypatch.setattr(synthaug.runs, "train_run", fake_run)
    return calls


def test_generator_seed_runs_only_that_seeds_generative_cells(tmp_path, monkeypatch):
    suite = load_suite(str(_suite(tmp_path, TWO_BASELINES.replace(
        "  balanced-softmax: [recipe=balanced-softmax]",
        "  synaug: {overrides: [recipe=synaug, generator.steps=2], generator_seeds: [0, 1]}"))))
    out = tmp_path / "out"
    calls = _fake_runs(monkeypatch, out, lambda config: (config.recipe, config.generator.seed, config.seed))
    with pytest.raises(SynthaugError, match="no generator seed 2: use one of 0, 1"):
        run_suite(suite, out, generator_seeds=[2], progress=False, echo=lambda _: None)
    assert not out.exists()  # refused before the first write
    run_suite(suite, out, generator_seeds=[1], progress=False, echo=lambda _: None)
    assert calls == [("synaug", 1, 0), ("synaug", 1, 1)]  # neither ce nor generator seed 0
    calls.clear()
    run_suite(suite, out, progress=False, echo=lambda _: None)  # the rest, later
    assert sorted(calls) == [("ce", 0, 0), ("ce", 0, 1), ("synaug", 0, 0), ("synaug", 0, 1)]


def test_seed_runs_only_that_classifier_seeds_cells(tmp_path, monkeypatch):
    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    calls = _fake_runs(monkeypatch, out, lambda config: (config.recipe, config.seed))
    with pytest.raises(SynthaugError, match="no classifier seed 7: use one of 0, 1"):
        run_suite(suite, out, seeds=[7], progress=False, echo=lambda _: None)
    assert not out.exists()  # refused before the first write
    run_suite(suite, out, seeds=[1], recipes=["ce"], progress=False, echo=lambda _: None)
    assert calls == [("ce", 1)]  # one cell: one process's share of a suite split over processes
    calls.clear()
    run_suite(suite, out, seeds=[0], progress=False, echo=lambda _: None)
    assert sorted(calls) == [("balanced-softmax", 0), ("ce", 0)]


def test_the_command_line_passes_its_cell_filters_on(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    calls = _fake_runs(monkeypatch, out, lambda config: (config.recipe, config.seed))
    code, _, err = run_cli(["bench", str(_suite(tmp_path)), "--out", str(out), "--seed", "1", "--recipe", "ce",
                            "--setting", "digits", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert calls == [("ce", 1)]


def _row(recipe, seed, score, generator_seed=None, images=0):
    return {"suite": "made-up", "setting": "s", "recipe": recipe, "seed": seed, "generator_seed": generator_seed,
            "cell": f"s | {recipe} | {generator_seed} | {seed}", "metric": "balanced_accuracy",
            "metrics": {"balanced_accuracy": score}, "per_class": {}, "seconds": {"train": 60.0},
            "images_generated": images, "generated_now": images, "device": "CPU", "commit": "x"}


def test_a_recipe_the_seeds_do_not_change_gets_no_interval_in_the_leaderboard():
    rows = [_row("synaug", s, 0.9, images=1000) for s in range(3)] + [_row("ce", s, 0.8 + 0.01 * s) for s in range(3)]
    rows += [_row("crt", s, 0.7) for s in range(3)]  # every seed one score, as synaug: their pair is one replicate
    line = next(line for line in leaderboard_markdown(None, rows).splitlines() if line.startswith("| **synaug** |"))
    assert "| +9.00 (" in line and "| gain |" in line  # against ce, which the seeds move: an interval (and in bold)
    lone = [r for r in rows if r["recipe"] != "ce"]
    line = next(line for line in leaderboard_markdown(None, lone).splitlines() if line.startswith("| synaug |"))
    assert "| +20.00 |" in line and "the seeds change neither score: no interval" in line and "nan" not in line


def test_a_replay_control_costs_no_generation_and_is_not_a_classical_baseline(tmp_path):
    made = [dict(_row("synaug", s, 0.9, images=1000), seconds={"train": 60.0, "generate": 100.0}) for s in range(2)]
    replay = [dict(_row("real replay", s, 0.9), images_replayed=1000) for s in range(2)]
    plain = [_row("ce", s, 0.8) for s in range(2)]
    suite = load_suite(str(_suite(tmp_path)))
    metrics = {"test": {"balanced_accuracy": 0.9}, "seconds": {"train": 60.0},
               "synthetic": {"images": 1000, "generated_now": 0, "replay": True}}
    row = result_row(suite, suite.cells_[0], metrics, tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
    assert row["images_generated"] == 0 and row["images_replayed"] == 1000  # how the runner records a replay
    assert "per_group" not in row  # no groups in the test, no per-cell accuracies
    cells = {"a": {"0": 1.0, "1": 0.5}}
    row = result_row(suite, suite.cells_[0], dict(metrics, test={"balanced_accuracy": 0.9, "group_accuracy": cells}),
                     tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
    assert row["per_group"] == cells  # each (class, group) cell's accuracy, for what the worst one hides
    # a generator costs all its training, as it records it: not this cell's last minute of a resumed training,
    # and not nothing where a cell that trained it stopped before its row and the next found it trained
    for trained_now in (True, False):
        used = dict(metrics, seconds={"train": 60.0, "generator": 63.0},
                    generator={"path": "generators/abc", "trained_now": trained_now, "train_seconds": 3209.0})
        row = result_row(suite, suite.cells_[0], used, tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
        assert row["generator"] == "abc" and row["generator_train_seconds"] == 3209.0
    # an ensemble (generator.ensemble) is named by its members' folders and costs their training together
    ensemble = dict(metrics, generator={"source": "ensemble", "trained_now": False, "train_seconds": 900.0,
                                        "members": [{"path": "generators/abc"}, {"path": "generators/def"}]})
    row = result_row(suite, suite.cells_[0], ensemble, tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
    assert row["generator"] == "abc+def" and row["generator_train_seconds"] == 900.0
    # a cell's own unnamed generator (LDMLR's feature model) is costed by its stage, once, and by no other recipe
    features = dict(metrics, seconds={"train": 60.0, "generator": 50.0}, generator={"kind": "features", "train_seconds": 50.0})
    row = result_row(suite, suite.cells_[0], features, tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
    assert row["generator"] is None and row["generator_train_seconds"] is None
    cost = costs([dict(_row("ldmlr", 0, 0.9), seconds={"train": 60.0, "generator": 50.0}, generator_train_seconds=50.0),
                  _row("ce", 0, 0.8)])  # the first as a row of 84d01f0 recorded it
    assert cost["ldmlr"]["generator"] == 50.0 and cost["ce"]["generator"] == 0.0
    cost = costs(made + replay + plain)
    assert cost["synaug"]["generation"] == 100.0 and cost["real replay"]["generation"] == 0.0
    # each recipe's images at its own generator's rate: cheap features do not lower the images' cost
    features = [dict(_row("ldmlr", s, 0.9, images=1000), seconds={"train": 60.0, "generate": 1.0}) for s in range(2)]
    images = [dict(r, generator="g") for r in made]
    cost = costs(images + features)
    assert cost["synaug"]["generation"] == 100.0 and cost["ldmlr"]["generation"] == 1.0
    # a shared generator's training counts once; a cell's own unnamed one (LDMLR's feature model) in every cell
    images[0].update(generator_train_seconds=500.0, seconds={**images[0]["seconds"], "generator": 500.0})
    features = [dict(r, seconds={**r["seconds"], "generator": 20.0}) for r in features]
    cost = costs(images + features)
    assert cost["synaug"]["generator"] == 500.0 and cost["ldmlr"]["generator"] == 20.0
    assert cost["ldmlr"]["total"] == 60.0 + 1.0 + 20.0
    # one generator timed differently by two rows (an older row: its run's part of a resumed training) costs the longer
    cost = costs([dict(images[0], generator_train_seconds=3209.0), *images[1:], dict(images[0], generator_train_seconds=63.0)])
    assert cost["synaug"]["generator"] == 3209.0
    summary = setting_summary(made + replay + plain, None)
    assert summary["classical"] == ["ce"] and summary["controls"] == ["real replay"]
    # half replayed, half generated (synaug.replay_share) is a generative recipe, not a control
    mixed = [dict(r, recipe="half replay", images_generated=50, images_replayed=50) for r in replay]
    assert setting_summary(made + replay + mixed + plain, None)["controls"] == ["real replay"]
    # the perfect-generator control (synaug.unseen) adds real images only, generates none: a control
    unseen = [dict(_row("unseen real", s, 0.95 + 0.01 * s), images_unseen=500) for s in range(2)]
    assert setting_summary(made + replay + unseen + plain, None)["controls"] == ["real replay", "unseen real"]
    board = leaderboard_markdown(None, made + replay + unseen + plain)  # its gain shown as a control's, not a recipe's
    assert "| gain (control) |" in next(line for line in board.splitlines() if line.startswith("| unseen real |"))
    row = result_row(suite, suite.cells_[0], dict(metrics, synthetic={"images": 0, "generated_now": 0, "replay": False,
                                                                     "replayed": 500, "unseen": 500}),
                     tmp_path / "out" / "cells" / "x", tmp_path / "out", 60.0, {})
    assert (row["images_generated"], row["images_replayed"], row["images_unseen"]) == (0, 500, 500)
    # the oracle's gap is closed by generated images, never by the replay control, however high it scores
    oracle = [_row("oracle", s, 1.0) for s in range(2)]
    replay = [dict(r, metrics={"balanced_accuracy": 0.95}) for r in replay]
    assert "synaug, closes 50% of the gap" in _gap(setting_summary(made + replay + plain + oracle, None), "ce")
    below = [dict(r, metrics={"balanced_accuracy": 0.7}) for r in made]
    assert "no generative recipe reaches" in _gap(setting_summary(below + replay + plain + oracle, None), "ce")


def test_the_leaderboard_says_when_rows_ran_in_another_arithmetic():
    from synthaug.bench.runner import environment

    assert environment()["auto_precision"] in ("bfloat16", "float32")
    rows = [_row("ce", s, 0.8) for s in range(2)] + [dict(_row("synaug", s, 0.9, images=10), auto_precision="float32")
                                                      for s in range(2)]
    head = leaderboard_markdown(None, rows).split("**s**: ")[1].splitlines()[0]
    assert "on CPU, CPU (float32) (costs mix the devices)" in head
    assert "on CPU;" in leaderboard_markdown(None, rows[:2])
    # a row that pins its arithmetic is named by it, whatever auto would have chosen on its device
    pinned = [dict(r, auto_precision="bfloat16", settings={"train.precision": "float32"}) for r in rows[:2]]
    auto = [dict(r, auto_precision="bfloat16", settings={"train.precision": "auto"}) for r in rows[2:]]
    head = leaderboard_markdown(None, pinned + auto).split("**s**: ")[1].splitlines()[0]
    assert "on CPU (bfloat16), CPU (float32) (costs mix the devices)" in head
    made = [dict(r, settings={"train.precision": "float32", "generator.precision": "auto"}) for r in auto]
    assert "on CPU (float32), CPU (float32, generator bfloat16)" in leaderboard_markdown(None, pinned + made)


def test_the_leaderboard_interval_and_verdict_on_a_known_paired_difference():
    baseline = [0.50, 0.60, 0.70]
    # generative recipe, two generator seeds per classifier seed: their means are +2.0, +2.5, +1.5 points
    # -> mean 2.0, sd 0.5, t(0.975, 2) = 4.302653 -> half width 1.242: interval +0.76 to +3.24, a gain
    gains = [(0.02, 0.02), (0.03, 0.02), (0.01, 0.02)]
    rows = [_row("ce", s, 0.40 + 0.1 * s) for s in range(3)] + [_row("balanced-softmax", s, b) for s, b in enumerate(baseline)]
    for s, pair in enumerate(gains):
        rows += [_row("synaug", s, baseline[s] + d, generator_seed=g, images=100) for g, d in enumerate(pair)]
    # the oracle is far above but never the bar
    rows += [_row("oracle", s, 0.99) for s in range(3)]
    board = leaderboard_markdown(None, rows)
    line = next(x for x in board.splitlines() if x.startswith("| **synaug**"))
    assert "+2.00 (+0.76 to +3.24) | gain" in line
    assert "Best classical baseline: balanced-softmax" in board
    # a noisier difference of the same mean: no significant difference (sd 1 -> half width 2.48)
    rows = [r for r in rows if r["recipe"] != "synaug"]
    rows += [_row("synaug", s, baseline[s] + d) for s, d in enumerate((0.02, 0.03, 0.01))]
    rows = [dict(r, images_generated=100) if r["recipe"] == "synaug" else r for r in rows]
    line = next(x for x in leaderboard_markdown(None, rows).splitlines() if x.startswith("| synaug"))
    assert "+2.00 (-0.48 to +4.48) | no significant difference" in line


def test_baselines_tied_on_the_metric_are_told_apart_by_the_next_column():
    from types import SimpleNamespace

    from synthaug.bench.leaderboard import markdown_setting

    def row(recipe, seed, worst, average, images=0):
        return dict(_row(recipe, seed, 0.0, images=images), metric="worst_group_accuracy",
                    metrics={"worst_group_accuracy": worst, "accuracy": average})

    # every worst group at 0 (agreement 0.99): ce is listed first, group-balanced has the better average
    rows = [row("ce", s, 0.0, 0.30) for s in range(2)] + [row("group-balanced", s, 0.0, 0.46) for s in range(2)]
    rows += [row("synaug", s, 0.0, 0.60 + 0.01 * s, images=100) for s in range(2)]
    setting = SimpleNamespace(metric="worst_group_accuracy", recipes=["ce", "group-balanced", "synaug"],
                              classical=["ce", "group-balanced"], columns=["worst_group_accuracy", "accuracy"])
    summary = setting_summary(rows, setting)
    assert summary["verdicts"]["synaug"].baseline == "group-balanced"
    board = markdown_setting("s", rows, summary, setting.columns)
    assert "Best classical baseline: group-balanced (highest mean worst group, ties broken by highest mean" in board
    # tied on every seed, the row reads the next column's paired difference: 0.14, 0.15 -> +14.50 +- 6.35
    line = next(x for x in board.splitlines() if x.startswith("| synaug"))
    assert "| tied on every seed; accuracy +14.50 (+8.15 to +20.85) | tie; accuracy: gain |" in line
    # no tie: the sentence says nothing of a tie-break
    rows = [dict(r, metrics=dict(r["metrics"], worst_group_accuracy=0.1)) if r["recipe"] == "ce" else r for r in rows]
    board = markdown_setting("s", rows, setting_summary(rows, setting), setting.columns)
    assert "Best classical baseline: ce (highest mean worst group);" in board
    assert "tied on every seed" not in board


@pytest.mark.parametrize("name", shipped())
def test_every_shipped_suite_loads(name):
    suite = load_suite(name)
    assert suite.cells_ and all(s.classical for s in suite.settings)
    for setting in suite.settings:  # every setting compares against a classical baseline it runs
        assert set(setting.classical) <= set(setting.recipes)
    assert len({c.key for c in suite.cells_}) == len(suite.cells_)


def test_results_rows_are_json_lines(tmp_path):
    out = tmp_path / "out"
    run_suite(load_suite(str(_suite(tmp_path))), out, progress=False, echo=lambda _: None)
    for line in (out / "results.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_a_new_option_at_its_default_does_not_change_a_finished_cell(tmp_path):
    """A row written before an option existed (its settings lack the key) still counts as the
    same cell while the option is at its default; a non-default value is a change."""
    from synthaug.bench.suite import changes, settings_of

    cell = load_suite(str(_suite(tmp_path))).cells_[0]
    recorded = json.loads(json.dumps(settings_of(cell.config), default=str))
    older = {k: v for k, v in recorded.items() if k != "train.mix_prob"}
    assert changes(older, cell.config) == []
    edited = load_suite(str(_suite(tmp_path, TWO_BASELINES.replace("recipe=ce]", "recipe=ce, train.mix_prob=0.5]")))).cells_[0]
    assert changes(older, edited.config) == ["train.mix_prob: 1.0 -> 0.5"]


def test_a_spent_budget_stops_between_cells_and_the_next_run_goes_on(tmp_path):
    path = _suite(tmp_path, TWO_BASELINES + "budget: {minutes: 0.001}\n")  # 60 ms: one cell, then stop
    said = []
    rows = run_suite(load_suite(str(path)), tmp_path / "out", progress=False, echo=said.append)
    assert len(rows) == 1 and any("budget of 0.001 min spent after 1 cell(s)" in line for line in said)
    rows = run_suite(load_suite(str(_suite(tmp_path))), tmp_path / "out", progress=False, echo=said.append)
    assert len(rows) == 4


def test_only_the_chosen_settings_and_recipes_run(tmp_path):
    suite = load_suite(str(_suite(tmp_path)))
    rows = run_suite(suite, tmp_path / "out", progress=False, echo=lambda _: None, recipes=["balanced-softmax"])
    assert {r["recipe"] for r in rows} == {"balanced-softmax"} and len(rows) == 2
    with pytest.raises(SynthaugError, match="has no setting 'nope'"):
        run_suite(suite, tmp_path / "out", progress=False, echo=lambda _: None, settings=["nope"])


def test_two_benches_never_write_one_folder(tmp_path):
    import os
    import subprocess
    import sys

    suite, out = load_suite(str(_suite(tmp_path))), tmp_path / "out"
    out.mkdir()
    (out / ".synthaug-run").write_text("x")
    (out / ".synthaug-bench.lock").write_text(f"{os.getppid()}\n")  # a live process holds it
    with pytest.raises(SynthaugError, match=r"another synthaug bench \(pid \d+\) is writing"):
        run_suite(suite, out, progress=False, echo=lambda _: None)
    assert not (out / "results.jsonl").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".synthaug-bench.lock").write_text(gone.stdout)  # a stale lock: that process has ended
    rows = run_suite(suite, out, progress=False, echo=lambda _: None, recipes=["ce"])
    assert len(rows) == 2 and not (out / ".synthaug-bench.lock").exists()


def test_a_run_folder_from_before_an_option_existed_is_the_same_run(tmp_path):
    """Upgrading synthaug (a new option, at its default) does not turn a run folder into "a
    run with a different config"; a changed value still does."""
    import yaml

    from synthaug.config import load_config
    from synthaug.runs import train_run

    base = ["data.dataset=digits", "train.epochs=1", "train.augment=none", f"output_dir={tmp_path}", "name=r"]
    run_dir, first = train_run(load_config(None, base), progress=False)
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    del recorded["train"]["group_dro_eta"]  # as written by a synthaug without that option
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert train_run(load_config(None, base), progress=False)[1] == first  # finished: not redone
    with pytest.raises(SynthaugError, match="different config"):
        train_run(load_config(None, [*base, "train.group_dro_eta=0.5"]), progress=False)


def test_recipes_from_reads_the_mapping_form_of_another_suite(tmp_path):
    (tmp_path / "base.yaml").write_text("recipes:\n  ce: {overrides: [recipe=ce], generator_seeds: [0, 1]}\n"
                                        "settings: {digits: [data.dataset=digits]}\n")
    (tmp_path / "user.yaml").write_text(f"recipes_from: [{tmp_path / 'base.yaml'}]\n"
                                        "settings: {digits: {overrides: [data.dataset=digits], recipes: [ce]}}\n")
    suite = load_suite(str(tmp_path / "user.yaml"))
    assert [c.config.recipe for c in suite.cells_] == ["ce"]


def test_an_append_after_a_seed_placeholder_loads(tmp_path):
    """`+=` reads the value so far before the cell's seeds are known: a {seed} placeholder
    among the overrides once made the suite unloadable."""
    (tmp_path / "s.yaml").write_text('common: ["generator.sample_seed={seed}"]\n'
                                     "classifier_seeds: [0, 3]\n"
                                     "recipes: {strong: [recipe=ce, train.augment+=randaugment]}\n"
                                     "settings: {digits: [data.dataset=digits, train.augment=flip]}\n")
    cells = load_suite(str(tmp_path / "s.yaml")).cells_
    assert [(c.config.train.augment, c.config.generator.sample_seed) for c in cells] == [("flip+randaugment", 0),
                                                                                          ("flip+randaugment", 3)]
    # every metric a row records is one a suite may rank by
    (tmp_path / "g.yaml").write_text("metric: mean_group_accuracy\nrecipes: {ce: [recipe=ce]}\n"
                                     "settings: {coloured: [data.dataset=digits, split.kind=colored]}\n")
    assert load_suite(str(tmp_path / "g.yaml")).settings[0].metric == "mean_group_accuracy"


def test_a_setting_that_differs_in_its_test_only_shares_the_stores_it_names(tmp_path):
    """`stores` names another setting whose images a setting reuses (only its test differs);
    the store's key still holds the images' settings, so a setting whose training data differs
    never shares one, and a name that is not a setting of the suite is refused."""
    from synthaug.bench.suite import with_locations

    text = TWO_BASELINES.replace("  balanced-softmax: [recipe=balanced-softmax]\n", "  synaug: [recipe=synaug]\n").replace(
        "settings:\n  digits: []\n",
        "settings:\n  coloured: [split.kind=colored]\n"
        "  coloured, drawn test: {overrides: [split.kind=colored, split.test_colours=drawn], stores: coloured}\n"
        "  coloured, own store: [split.kind=colored, split.test_colours=drawn]\n"
        "  other data: {overrides: [split.kind=colored, split.agreement=0.5], stores: coloured}\n")
    cells = [c for c in load_suite(str(_suite(tmp_path, text))).cells_ if c.seed == 0 and c.recipe == "synaug"]
    stores = {c.setting: with_locations(c, tmp_path).synaug.store_dir for c in cells}
    assert stores["coloured"] == stores["coloured, drawn test"]
    assert stores["coloured, own store"] != stores["coloured"]  # its own folder, the same key
    assert stores["coloured, own store"].rsplit("-", 1)[1] == stores["coloured"].rsplit("-", 1)[1]
    assert stores["other data"] != stores["coloured"]
    with pytest.raises(SynthaugError, match="stores must name another"):
        load_suite(str(_suite(tmp_path, text.replace("stores: coloured}", "stores: colored}", 1))))


def test_a_selection_of_the_plan_itself_shares_the_unselected_store(tmp_path):
    """At select.overgenerate 1 the candidates are the plan's own rows: a filter row reads the
    images of its unselected twin; at 2 the candidates are their own (larger) store."""
    from synthaug.bench.suite import with_locations

    text = TWO_BASELINES.replace("  balanced-softmax: [recipe=balanced-softmax]\n", (
        "  synaug: [recipe=synaug]\n  filtered: [recipe=synaug, select.method=agreement, select.overgenerate=1]\n"
        "  overgenerated: [recipe=synaug, select.method=agreement, select.overgenerate=2]\n"))
    cells = [c for c in load_suite(str(_suite(tmp_path, text))).cells_ if c.seed == 0 and c.recipe != "ce"]
    stores = {c.recipe: with_locations(c, tmp_path).synaug.store_dir for c in cells}
    assert stores["filtered"] == stores["synaug"] != stores["overgenerated"]


def test_feedback_guided_rows_share_a_store_only_where_their_guide_trains_alike(tmp_path):
    """Feedback guidance's images depend on the scorer that guides them, so on the training
    settings and select.scorer_epochs: the classifier seeds share one store, a row that trains
    otherwise gets its own, and at feedback 0 the store is the one it always was."""
    from synthaug.bench.suite import with_locations

    text = TWO_BASELINES.replace("  balanced-softmax: [recipe=balanced-softmax]\n", (
        "  synaug: [recipe=synaug]\n  unguided: [recipe=synaug, generator.feedback=0, select.scorer_epochs=3]\n"
        "  guided: [recipe=synaug, generator.feedback=0.1]\n"
        "  longer: [recipe=synaug, generator.feedback=0.1, select.scorer_epochs=3]\n"
        "  lr: [recipe=synaug, generator.feedback=0.1, train.lr=0.01]\n"))
    cells = [c for c in load_suite(str(_suite(tmp_path, text))).cells_ if c.recipe != "ce"]
    stores = {(c.recipe, c.seed): with_locations(c, tmp_path).synaug.store_dir for c in cells}
    assert stores[("guided", 0)] == stores[("guided", 1)]
    assert stores[("synaug", 0)] == stores[("unguided", 0)]
    assert len({stores[(r, 0)] for r in ("synaug", "guided", "longer", "lr")}) == 4


def test_an_option_added_since_keeps_the_stores_of_rows_that_leave_it_at_its_former_value(tmp_path):
    """SYNAuG's translation changes the images, so it names another store; left at its former
    value (off, strength 0.7) the store is the one cells measured before it existed, and a
    training-only option (the targets' gamma) shares the translated store, as a strength with nothing
    translated shares the plain one."""
    from synthaug.bench.suite import with_locations

    text = TWO_BASELINES.replace("  balanced-softmax: [recipe=balanced-softmax]\n", (
        "  synaug: [recipe=synaug]\n  untranslated: [recipe=synaug, synaug.translate=0, synaug.translate_strength=0.7]\n"
        "  translated: [recipe=synaug, synaug.translate=1]\n"
        "  hard: [recipe=synaug, synaug.translate=1, synaug.translate_gamma=0]\n"
        "  further: [recipe=synaug, synaug.translate=1, synaug.translate_strength=0.9]\n"
        "  inert: [recipe=synaug, synaug.translate=0, synaug.translate_strength=0.9]\n"
        "  own: [recipe=synaug, synaug.translate=1, synaug.translate_from=own]\n"
        "  inert-own: [recipe=synaug, synaug.translate=0, synaug.translate_from=own]\n"
        "  ensembled: [recipe=synaug, generator.ensemble=2]\n  one: [recipe=synaug, generator.ensemble=1]\n"
        "  partial: [recipe=synaug, synaug.fill=0.5]\n"))
    cells = [c for c in load_suite(str(_suite(tmp_path, text))).cells_ if c.seed == 0 and c.recipe != "ce"]
    stores = {c.recipe: with_locations(c, tmp_path).synaug.store_dir.rsplit("-", 1)[1] for c in cells}
    # the key before translation existed (8bce2d9); a strength with nothing translated changes no image
    assert stores["synaug"] == stores["untranslated"] == stores["inert"] == stores["inert-own"] == "dec4e34ca5a7"
    assert stores["translated"] == stores["hard"] not in (stores["synaug"], stores["further"], stores["own"])
    assert stores["own"] != stores["synaug"] == stores["one"] != stores["ensembled"]  # an ensemble makes other images
    assert stores["partial"] not in (stores["synaug"], stores["translated"])  # a partial fill makes other images
