"""The command line: runs, run folders, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_cli, write_image_folder

FAST = ["-s", "data.dataset=digits", "-s", "split.ratio=5", "-s", "train.epochs=1", "-s", "train.augment=none"]


def test_train_writes_a_run_folder_and_does_not_redo_it(tmp_path):
    """The installed entry point, end to end, in a subprocess."""
    cmd = [sys.executable, "-m", "synthaug.cli", "train", *FAST, "-s", f"output_dir={tmp_path}", "--quiet"]
    env = {**os.environ, "COLUMNS": "120"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "digits-lt5-ce-s0"
    # the classifier's last checkpoint stays, for `run` on the same folder (baselines and report, no retraining)
    assert {p.name for p in run.iterdir()} == {".synthaug-run", "config.yaml", "metrics.json", "classifier", "checkpoint"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["balanced_accuracy"] > 0.1 and metrics["task"]["train"]["class_counts"]["0"] > 0
    assert "balanced_accuracy" in done.stdout
    stamp = (run / "metrics.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and (run / "metrics.json").stat().st_mtime_ns == stamp


def test_datasets_list_and_describe(capsys, monkeypatch):
    code, out, _ = run_cli(["datasets"], capsys, monkeypatch)
    assert code == 0 and "fashion-mnist" in out and "cifar10" in out
    code, out, _ = run_cli(["datasets", "digits"], capsys, monkeypatch)
    assert code == 0 and "1347" in out


def test_recipes_and_config(capsys, monkeypatch):
    code, out, _ = run_cli(["recipes"], capsys, monkeypatch)
    assert code == 0 and "balanced-softmax" in out and "oracle" in out
    code, out, _ = run_cli(["config", "-s", "train.epochs=3"], capsys, monkeypatch)
    assert code == 0 and "epochs: 3" in out


def test_a_different_config_under_the_same_name_is_refused(tmp_path, capsys, monkeypatch):
    args = ["train", *FAST, "-s", f"output_dir={tmp_path}", "-s", "name=x", "--quiet"]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    code, _, err = run_cli([*args, "-s", "train.lr=0.01"], capsys, monkeypatch)
    assert code == 2 and "different config" in err
    assert run_cli([*args, "-s", "train.lr=0.01", "--force"], capsys, monkeypatch)[0] == 0


def _bad_folder(tmp_path):
    root = write_image_folder(tmp_path / "imgs")
    (root / "cls0" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return str(root)


@pytest.mark.parametrize(
    "args, match",
    [
        (["-s", "data.dataset=nope"], "unknown dataset 'nope'"),
        (["-s", "data.dataset=./no/such/folder"], "does not exist"),
        (["-s", "data.dataset=BAD"], "cannot read image"),
        (["-s", "split.ratio=0.5"], "ratio must be >= 1"),
        (["-s", "split.kind=few-shot", "-s", "split.k=500"], "k=500 is larger than class"),
        (["-s", "train.epoch=2"], "did you mean 'train.epochs'"),
        (["-s", "recipe=magic"], "unknown recipe 'magic'"),
        (["missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["-s", "recipe=synaug", "-s", "synaug.target_per_class=3"], "below the largest class"),
        (["-s", "recipe=synaug", "-s", "generator.preset=base", "-s", "data.image_size=10"], "not divisible"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, match, tmp_path, capsys, monkeypatch):
    args = ["data.dataset=" + _bad_folder(tmp_path) if a.endswith("=BAD") else a for a in args]
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(["train", *args, "-s", f"output_dir={out_dir}", "--quiet"], capsys, monkeypatch)
    assert code == 2
    assert match in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err + out
    assert not out_dir.exists()


def test_usage_error_exit_code(capsys, monkeypatch):
    code, _, _ = run_cli(["train", "--no-such-flag"], capsys, monkeypatch)
    assert code == 2
