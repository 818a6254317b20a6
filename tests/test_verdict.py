"""The paired comparison behind every claim of a gain: the interval and verdict on made-up
numbers with a known answer, and `synthaug run --seeds` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from synthaug.verdict import compare, compare_tied, paired_interval, verdict_of


def test_the_interval_of_a_known_paired_difference():
    # differences 0.5, 0.5, 1, 0.5, 1: mean 0.7, sd 0.27386, t(0.975, 4) = 2.776445 -> half width 0.34004
    mean, low, high = paired_interval([1, 2, 3, 4, 5], [0.5, 1.5, 2.0, 3.5, 4.0])
    assert mean == pytest.approx(0.7) and low == pytest.approx(0.35996, abs=1e-4) and high == pytest.approx(1.04004, abs=1e-4)
    assert verdict_of(low, high) == "gain"


def test_pairing_is_what_matters():
    """A steady +0.2 over baselines that vary a lot between seeds is a gain when paired,
    though the two sets of scores overlap."""
    baseline = [0.70, 0.80, 0.75, 0.90, 0.65]
    mean, low, high = paired_interval([b + 0.2 + e for b, e in zip(baseline, (0.01, -0.01, 0.0, 0.02, -0.02))], baseline)
    assert low > 0.17 and high < 0.23 and verdict_of(low, high) == "gain"


@pytest.mark.parametrize("ours, theirs, verdict", [
    ([0.5, 0.6, 0.7], [0.6, 0.7, 0.8], "loss"),  # -0.1 every time: the interval is a point below zero
    ([0.5, 0.7, 0.6], [0.6, 0.6, 0.6], "no significant difference"),
    ([0.9], [0.8], "one seed: no interval"),
])
def test_verdicts(ours, theirs, verdict):
    mean, low, high = paired_interval(ours, theirs)
    assert verdict_of(low, high) == verdict
    assert math.isnan(low) == (len(ours) == 1)


def test_seeds_that_change_neither_score_are_one_replicate_not_an_exact_difference():
    """Both methods the same on every seed (seeds that reach neither, a deterministic head
    re-fit, say): a difference there is one replicate, never a gain with a zero-width interval;
    equal there is a tie, which the tie-break reads."""
    mean, low, high = paired_interval([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert mean == pytest.approx(0.1) and math.isnan(low) and math.isnan(high)
    found = compare({"synaug": {0: 0.9, 1: 0.9, 2: 0.9}, "ce": {0: 0.8, 1: 0.8, 2: 0.8}}, "synaug")
    assert found.verdict == "the seeds change neither score: no interval" and found.verdict != "gain"
    assert "interval" not in found.difference_text().split(":")[0]  # no "(95% interval ...)" printed
    assert found.to_dict()["low"] is None and json.dumps(found.to_dict(), allow_nan=False)  # summary.json stays JSON
    tie = compare({"synaug": {0: 0.0, 1: 0.0}, "ce": {0: 0.0, 1: 0.0}}, "synaug")
    assert tie.tied and tie.verdict == "no significant difference"


def test_compare_pairs_with_the_best_classical_baseline_not_the_oracle():
    scores = {"synaug": {0: 0.90, 1: 0.92, 2: 0.91}, "ce": {0: 0.70, 1: 0.72, 2: 0.71},
              "balanced-softmax": {0: 0.89, 1: 0.90, 2: 0.92}, "oracle": {0: 0.99, 1: 0.99, 2: 0.99}}
    found = compare(scores, "synaug")
    assert found.baseline == "balanced-softmax" and found.seeds == [0, 1, 2]
    assert found.difference == pytest.approx(0.0066667, abs=1e-6) and found.verdict == "no significant difference"
    assert "synaug against balanced-softmax over 3 seeds: +0.67 points (95% interval" in found.line()
    assert compare({"synaug": {0: 0.9}, "oracle": {0: 0.99}}, "synaug") is None
    # only the seeds both have are paired
    assert compare({"synaug": {0: 0.9, 1: 0.8}, "ce": {1: 0.7}}, "synaug").seeds == [1]
    # named classical baselines: other generative methods are not the bar
    assert compare(scores, "synaug", classical=["ce"]).baseline == "ce"


def test_compare_breaks_a_tie_on_the_metric_with_the_second_metric():
    # every worst group at 0: the bar is the baseline with the better average, whatever the list order
    worst = {"synaug": {0: 0.0, 1: 0.0}, "ce": {0: 0.0, 1: 0.0}, "group-balanced": {0: 0.0, 1: 0.0}}
    average = {"synaug": {0: 0.60, 1: 0.61}, "ce": {0: 0.30, 1: 0.31}, "group-balanced": {0: 0.46, 1: 0.45}}
    assert compare(worst, "synaug", classical=["ce", "group-balanced"]).baseline == "ce"
    found = compare(worst, "synaug", classical=["ce", "group-balanced"], tiebreak=average)
    assert found.baseline == "group-balanced" and found.difference == 0.0
    # tied on every seed, the pair is also compared on the second metric: 0.60, 0.61 against 0.46, 0.45
    # -> differences 0.14, 0.16: mean 0.15, sd 0.01414, t(0.975, 1) = 12.7062 -> half width 0.127
    assert found.tied
    second = compare_tied(found, average)
    assert (second.recipe, second.baseline) == ("synaug", "group-balanced")
    assert second.difference == pytest.approx(0.15) and second.low == pytest.approx(0.023, abs=1e-3)
    assert second.verdict == "gain"
    # the tie-break never overrules the metric itself, and a difference on it is no tie
    worst["ce"] = {0: 0.01, 1: 0.01}
    found = compare(worst, "synaug", classical=["ce", "group-balanced"], tiebreak=average)
    assert found.baseline == "ce" and not found.tied and compare_tied(found, average) is None
    # one seed is no tie to read: no interval either way
    assert compare_tied(compare({"synaug": {0: 0.0}, "ce": {0: 0.0}}, "synaug"), average) is None


def test_run_with_several_seeds_gives_a_verdict_and_resumes(tmp_path, capsys, monkeypatch):
    args = ["run", "-s", "data.dataset=digits", "-s", "recipe=crt", "-s", "train.epochs=2", "-s", "train.batch_size=64",
            "-s", "report.baselines=[ce,oracle]", "-s", f"output_dir={tmp_path}", "--seeds", "0,1", "--quiet"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    summary_dir = tmp_path / "digits-lt50-crt-seeds-0-1"
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert summary["verdict"]["baseline"] == "ce" and summary["verdict"]["seeds"] == [0, 1]
    assert summary["verdict_line"] in out.replace("\n", " ") or summary["verdict_line"][:40] in out
    assert "Verdict" in (summary_dir / "report.html").read_text() and (summary_dir / "summary.md").exists()
    runs = [tmp_path / "digits-lt50-crt-s0", tmp_path / "digits-lt50-crt-s1"]
    stamps = [(r / "metrics.json").stat().st_mtime_ns for r in runs]
    code, _, err = run_cli(args, capsys, monkeypatch)  # a second call redoes no seed
    assert code == 0, err
    assert [(r / "metrics.json").stat().st_mtime_ns for r in runs] == stamps


@pytest.mark.parametrize("seeds, match", [("0,0", "two or more different seeds"), ("0", "two or more different seeds"),
                                          ("0,x", "comma-separated whole numbers"), ("0,-1", "seed")])
def test_bad_seeds_are_one_line(seeds, match, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["run", "-s", "data.dataset=digits", "-s", f"output_dir={tmp_path}", "--seeds", seeds],
                             capsys, monkeypatch)
    assert code == 2 and match in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_seeds_of_a_generative_recipe_share_one_store(tmp_path, capsys, monkeypatch):
    """SYNAuG's images do not depend on the classifier seed: the second seed generates nothing."""
    args = ["run", "-s", "data.dataset=digits", "-s", "recipe=synaug", "-s", "split.ratio=8", "-s", "train.epochs=2",
            "-s", "generator.preset=tiny", "-s", "generator.steps=6", "-s", "generator.batch_size=8",
            "-s", "generator.sampling_steps=3", "-s", "report.baselines=[ce]", "-s", "report.html=false",
            "-s", f"output_dir={tmp_path}", "--seeds", "0,1", "--quiet"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((tmp_path / "digits-lt8-synaug-seeds-0-1" / "summary.json").read_text())
    metrics = [json.loads((Path(d) / "metrics.json").read_text()) for d in summary["runs"].values()]
    stores = {m["synthetic"]["store"] for m in metrics}
    assert stores == {str(tmp_path / "digits-lt8-synaug-seeds-0-1" / "synthetic")}
    assert metrics[0]["synthetic"]["generated_now"] > 0 and metrics[1]["synthetic"]["generated_now"] == 0
    assert metrics[0]["synthetic"]["images"] == metrics[1]["synthetic"]["images"]


def test_with_groups_the_default_baselines_are_the_group_methods_and_the_verdict_is_worst_group(
        tmp_path, capsys, monkeypatch):
    """On a split with groups the report's default baselines are what a user would do about groups
    (group-balanced sampling, group reweighting, Group DRO), trained for the recipe's steps, and the
    verdict is on worst-group accuracy; a list the user gives is kept as given."""
    base = ["run", "-s", "data.dataset=digits", "-s", "split.kind=colored", "-s", "split.agreement=0.9",
            "-s", "recipe=class-balanced", "-s", "train.epochs=1", "-s", "train.batch_size=64",
            "-s", f"output_dir={tmp_path}", "--quiet"]
    code, out, err = run_cli([*base, "--seeds", "0,1"], capsys, monkeypatch)
    assert code == 0, err
    (summary_dir,) = [p for p in tmp_path.iterdir() if p.name.endswith("seeds-0-1")]
    summary = json.loads((summary_dir / "summary.json").read_text())
    assert summary["metric"] == "worst_group_accuracy"
    assert set(summary["scores"]) == {"class-balanced", "ce", "group-balanced", "group-reweighted", "group-dro"}
    assert summary["verdict"]["baseline"] in {"ce", "group-balanced", "group-reweighted", "group-dro"}
    assert "worst-group accuracy" in (summary_dir / "summary.md").read_text()
    # one epoch leaves a cell at 0 for every method: tied on every seed, the line reads accuracy too
    assert all(v == 0 for by_seed in summary["scores"].values() for v in by_seed.values())
    assert "+0.00 points (95% interval +0.00 to +0.00): no significant difference; tied on every seed, " \
           "so on accuracy: " in summary["verdict_line"]
    assert summary["tied"]["baseline"] == summary["verdict"]["baseline"]
    assert summary["verdict_line"] in (summary_dir / "summary.md").read_text()
    run_dir = Path(summary["runs"]["0"])
    assert "worst-group accuracy" in (run_dir / "report.html").read_text()
    # a run compared with other baselines (an older synthaug's defaults) is compared again, not taken as finished
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["baselines"]["group-dro"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, out, err = run_cli([*base, "--seeds", "0,1"], capsys, monkeypatch)
    assert code == 0, err
    assert "group-dro" in json.loads((run_dir / "metrics.json").read_text())["baselines"]
    code, out, err = run_cli([*base, "-s", "name=given", "-s", "report.baselines=[ce]"], capsys, monkeypatch)
    assert code == 0, err
    assert set(json.loads((tmp_path / "given" / "metrics.json").read_text())["baselines"]) == {"ce"}
