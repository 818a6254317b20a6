"""`synthaug analyse` and `recipe: auto`: the profile and duplicate counts on data with a known
answer, the evidence behind every rule against the shipped benchmark results, the
recommendation on each benchmark setting against what the benchmark measured, and the
command on built-in data and an ImageFolder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_dataset, run_cli, write_image_folder

from synthaug.analyse import EVIDENCE, data_profile, duplicates, recommend
from synthaug.bench import load_suite, read_results
from synthaug.bench.leaderboard import setting_summary
from synthaug.config import load_config
from synthaug.data import ImageDataset, load_dataset
from synthaug.data.dataset import LoadedDataset
from synthaug.task import make_task

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "bench"


def _measured(suite: str) -> dict:
    found = load_suite(suite)
    rows = read_results(BENCH / suite)
    return {s.name: setting_summary([r for r in rows if r["setting"] == s.name], s)
            for s in found.settings if any(r["setting"] == s.name for r in rows)}


@pytest.mark.parametrize("rule", list(EVIDENCE))
def test_every_rule_s_evidence_is_what_the_benchmark_measured(rule):
    for e in EVIDENCE[rule]:
        v = _measured(e.suite)[e.setting]["verdicts"][e.recipe]
        assert (v.baseline, v.verdict) == (e.baseline, e.verdict)
        assert [round(100 * x, 2) for x in (v.difference, v.low, v.high)] == [e.difference, e.low, e.high]


def _like(dataset: str, per_class_train: int, per_class_test: int, size: int = 8) -> LoadedDataset:
    """A stand-in with the dataset's class counts (splits depend only on the labels)."""
    def part(n):
        labels = torch.arange(10).repeat_interleave(n)
        return ImageDataset(torch.zeros(len(labels), 1, size, size, dtype=torch.uint8), labels, [str(c) for c in range(10)])
    return LoadedDataset(dataset, part(per_class_train), part(per_class_test), "stand-in")


STAND_INS = {"fashion-mnist": (6000, 1000), "cifar10": (5000, 1000)}
# a classical recommendation (its label) -> its row in the suites
LABEL = {"ce + RandAugment + Mixup": "RandAugment + Mixup", "fixmatch + RandAugment + Mixup": "FixMatch + RandAugment + Mixup",
         "balanced-softmax": "balanced-softmax", "class-balanced": "class-balanced",
         "ce, 6x the schedule": "none, augment-all's steps",
         "balanced-softmax, SYNAuG's steps": ("balanced-softmax, replay's steps (960)", "balanced-softmax, replay's steps"),
         "group-reweighted, SYNAuG's steps": "group-reweighted, replay's steps"}
# a recommendation at SYNAuG's steps -> its row in a setting where every recipe trains the same steps
EQUAL_STEPS = {"balanced-softmax, SYNAuG's steps": "balanced-softmax"}
# where each recommendation is checked: suite -> its settings (None: all). targeted-small's TADA setting and
# longtail-small's long-tailed ones are superseded by longtail's, which also trains the classical rows for as many
# steps as the generative ones (rules 2, 3 and 5)
CHECKED = {"longtail": ["MNIST-5k-LT r50", "Fashion-MNIST-LT r100", "Fashion-MNIST 10%",
                        "Coloured MNIST-5k, agreement 0.95, every test colour"], "fewshot-small": None,
           "fewshot": None, "cifar10-gpu": None}


@pytest.mark.parametrize("suite", list(CHECKED))
def test_the_recommendation_on_each_benchmark_setting_matches_what_it_measured(suite):
    measured = _measured(suite)
    for setting in load_suite(suite).settings:
        if setting.name not in measured or setting.name not in (CHECKED[suite] or [setting.name]):
            continue  # not run yet, or not checked here
        config = load_config(None, setting.overrides)
        name = config.data.dataset
        data = load_dataset(name) if name not in STAND_INS else _like(name, *STAND_INS[name])
        profile = data_profile(make_task(data, config.split))
        summary = measured[setting.name]
        found = recommend(profile, None, config.train.augment, config.train)
        if found.rule == "few-labels-pool" and LABEL["fixmatch + RandAugment + Mixup"] not in summary["recipes"]:
            # no classifier of this setting trained on the pool (it only fed a generator): the suite measured
            # the rule for data without one
            found = recommend({**profile, "unlabeled_images": 0}, None, config.train.augment, config.train)
        if found.generative_expected:  # the recipe it names (its label is its row) measured a gain
            assert summary["verdicts"][found.label].verdict == "gain", setting.name
        else:  # it names the best classical baseline, and no generative recipe gained
            best = next(v.baseline for v in summary["verdicts"].values() if v)
            rows = LABEL.get(found.label)
            rows = rows if isinstance(rows, tuple) else (rows,)
            equal = setting.steps is not None and found.label in EQUAL_STEPS
            if equal:  # every recipe trains the setting's steps: the plain row is the one at SYNAuG's
                rows += (EQUAL_STEPS[found.label],)
            assert best in rows, (setting.name, found.label, best)
            steps = [o for o in found.overrides if o.startswith("train.steps=")]
            if steps and not equal:  # the schedule it names is the row's
                assert steps == [o for o in setting.recipes[best] if o.startswith("train.steps=")], setting.name
            # (a control adds real images, replayed or unseen: its gain is no generative recipe's)
            assert all(v.verdict != "gain" for r, v in summary["verdicts"].items() if v and r not in summary["controls"]), \
                setting.name


def test_profile_and_duplicates_on_known_data():
    train = make_dataset((12, 6, 3), size=16)
    train.images[1] = train.images[0]  # an exact copy
    train.images[2] = (train.images[0].int() + 1).clamp(0, 255).to(torch.uint8)  # a near copy (1 grey level)
    test = make_dataset((2, 2, 2), size=16, seed=5)
    test.images[0] = train.images[5]  # a test image that is also a training image
    found = duplicates(train, test)
    assert found["exact_within_train"] == 1 and found["exact_train_test"] == 1
    assert found["near_within_train"] == 3  # images 0, 1, 2 each have a near copy
    assert found["near_train_test"] >= 1

    class T:  # the fields data_profile reads
        pass
    t = T()
    t.train, t.test, t.unlabeled = train, test, None
    p = data_profile(t)
    assert p["imbalance_ratio"] == 4.0 and p["smallest_classes"][0] == ("class2", 3) and p["largest_count"] == 12


@pytest.mark.parametrize("counts, rule", [
    ({"largest_count": 10, "smallest_count": 10, "imbalance_ratio": 1.0}, "few-labels"),
    ({"largest_count": 10, "smallest_count": 10, "imbalance_ratio": 1.0, "unlabeled_images": 500}, "few-labels-pool"),
    ({"largest_count": 5, "smallest_count": 5, "imbalance_ratio": 1.0, "unlabeled_images": 500}, "few-labels"),
    ({"classes": 10, "largest_count": 400, "smallest_count": 8, "imbalance_ratio": 50.0}, "longtail-tiny-tail"),
    ({"classes": 10, "largest_count": 6000, "smallest_count": 60, "imbalance_ratio": 100.0}, "longtail-large-tail"),
    ({"largest_count": 500, "smallest_count": 100, "imbalance_ratio": 5.0}, "imbalanced"),
    ({"largest_count": 600, "smallest_count": 600, "imbalance_ratio": 1.0}, "balanced-moderate"),
    ({"largest_count": 5000, "smallest_count": 5000, "imbalance_ratio": 1.0}, "balanced-other"),
    ({"classes": 10, "largest_count": 500, "smallest_count": 480, "imbalance_ratio": 1.04,
      "cells": {"groups": 10, "cells": 100, "largest": 384, "smallest": 0, "mean": 50.0, "empty": 8}}, "groups"),
    ({"classes": 10, "largest_count": 500, "smallest_count": 480, "imbalance_ratio": 1.04,
      "cells": {"groups": 2, "cells": 20, "largest": 400, "smallest": 70, "mean": 245.0, "empty": 0}}, "groups"),
    ({"classes": 10, "largest_count": 30, "smallest_count": 26, "imbalance_ratio": 1.15,  # cells too small to tell
      "cells": {"groups": 10, "cells": 100, "largest": 9, "smallest": 0, "mean": 2.8, "empty": 6}}, "balanced-other"),
    ({"classes": 10, "largest_count": 500, "smallest_count": 480, "imbalance_ratio": 1.04,  # cells balanced enough
      "cells": {"groups": 2, "cells": 20, "largest": 300, "smallest": 90, "mean": 245.0, "empty": 0}},
     "balanced-moderate"),
])
def test_each_rule(counts, rule):
    found = recommend(counts)
    assert found.rule == rule and found.why
    if rule == "groups":  # SYNAuG's steps: every cell filled to the largest, at the default schedule's epochs
        cells = counts["cells"]
        assert found.overrides == [f"train.steps={15 * -(-cells['cells'] * cells['largest'] // 128)}"]
    assert not found.generative_expected  # no setting measured a generative gain over its best baseline


def test_analyse_on_a_built_in_dataset_and_an_image_folder(tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["analyse", "digits", "-s", "split.ratio=10", "--probe-steps", "40", "--quiet",
                              "--json", str(tmp_path / "a.json")], capsys, monkeypatch)
    assert code == 0, err
    assert "imbalance ratio 10.0" in out and "recommendation: balanced-softmax" in out
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["recommendation"]["rule"] == "longtail-tiny-tail" and saved["probe"]["steps"] == 40
    # SYNAuG's steps: the default schedule's epochs over every class filled to the largest
    from synthaug.classify import TrainConfig
    p, train = saved["profile"], TrainConfig()
    steps = train.epochs * -(-p["classes"] * p["largest_count"] // train.batch_size)
    assert saved["recommendation"]["overrides"] == [f"train.steps={steps}"] and f"(train.steps={steps})" in out
    folder = write_image_folder(tmp_path / "imgs", counts=(9, 5), size=(12, 12))
    code, out, err = run_cli(["analyse", str(folder), "--probe-steps", "10", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert "training images in 2 classes" in out
    assert "recommendation:" in out
    # --json never overwrites
    code, out, err = run_cli(["analyse", "digits", "--probe-steps", "0", "--json", str(tmp_path / "a.json")],
                             capsys, monkeypatch)
    assert code == 2 and "overwrites nothing" in err
    # nor does a file that appears while the analysis runs get replaced
    import synthaug.analyse

    real = synthaug.analyse.analyse
    monkeypatch.setattr(synthaug.analyse, "analyse",
                        lambda *a, **k: (tmp_path / "late.json").write_text("theirs") and real(*a, **k))
    code, out, err = run_cli(["analyse", "digits", "--probe-steps", "0", "--json", str(tmp_path / "late.json")],
                             capsys, monkeypatch)
    assert code == 2 and "appeared while the analysis ran" in err and (tmp_path / "late.json").read_text() == "theirs"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".late.json")]  # no temporary file left


@pytest.mark.parametrize("name", ["mnist-5k", "fashion-mnist"])
def test_analyse_runs_on_the_other_built_in_datasets(name, capsys, monkeypatch):
    try:
        load_dataset(name)
    except Exception as e:  # Fashion-MNIST comes from a Debian package
        pytest.skip(f"{name} is not available here: {e}")
    code, out, err = run_cli(["analyse", name, "--probe-steps", "0", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert "recommendation:" in out


@pytest.mark.parametrize("split, recipe, rule", [
    (["split.ratio=10"], "balanced-softmax", "longtail-tiny-tail"),
    (["split.kind=few-shot", "split.k=10", "train.ssl_mu=1"], "fixmatch", "few-labels-pool"),  # the pool: FixMatch
    (["split.kind=colored", "split.agreement=0.95"], "group-reweighted", "groups"),  # imbalanced (digit, colour) cells
])
def test_recipe_auto_runs_the_recommendation_and_records_why(split, recipe, rule, tmp_path, capsys, monkeypatch):
    args = ["run", "-s", "recipe=auto", "-s", "data.dataset=digits", *[a for s in split for a in ("-s", s)],
            "-s", "train.epochs=1", "-s", "report.baselines=[ce]", "-s", f"output_dir={tmp_path}", "--quiet"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "auto" in run_dir.name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["recipe"] == recipe and metrics["auto"]["rule"] == rule
    assert "Chosen by" in (run_dir / "report.html").read_text()
