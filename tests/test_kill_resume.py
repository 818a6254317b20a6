"""Kill `synthaug run` (SIGKILL, no clean-up) during generator training and during
generation; the same command then finishes, with nothing lost or duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from synthaug.utils.io import load_state

ARGS = ["-s", "recipe=synaug", "-s", "data.dataset=digits", "-s", "split.ratio=10", "-s", "train.epochs=1", "-s", "train.augment=none",
        "-s", "generator.preset=tiny", "-s", "generator.batch_size=8", "-s", "generator.sampling_steps=2",
        "-s", "report.baselines=ce", "--quiet"]


def start(tmp_path, *extra):
    cmd = [sys.executable, "-m", "synthaug.cli", "run", *ARGS, "-s", f"output_dir={tmp_path}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.stderr.read()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("condition never met")


def finish(tmp_path, *extra):
    proc = start(tmp_path, *extra)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads((tmp_path / "digits-lt10-synaug-s0" / "metrics.json").read_text())


def test_kill_during_generator_training(tmp_path):
    extra = ["-s", "generator.steps=150", "-s", "generator.checkpoint_every=10", "-s", "generator.sampling_batch_size=512"]
    proc = start(tmp_path, *extra)
    kill_when(proc, lambda: any((tmp_path / "generators").rglob("state.safetensors")))
    state = load_state(next((tmp_path / "generators").rglob("state.safetensors")).parent)
    assert not list((tmp_path / "generators").rglob("generator.json"))  # killed before the end
    metrics = finish(tmp_path, *extra)
    steps = [h["step"] for h in metrics["generator"]["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 150 and 0 < state["step"] < 150
    assert metrics["generator"]["source"] == "trained"


# slow (three start-ups of torch): the damaged-store test below kills during generation and resumes too
@pytest.mark.slow
def test_kill_during_generation(tmp_path):
    extra = ["-s", "generator.steps=2", "-s", "generator.sampling_batch_size=8"]
    proc = start(tmp_path, *extra)
    meta = tmp_path / "digits-lt10-synaug-s0" / "synthetic" / "train" / "metadata.jsonl"
    kill_when(proc, lambda: meta.exists() and meta.read_text().count("\n") >= 16)
    first = meta.read_text().count("\n")
    metrics = finish(tmp_path, *extra)
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == metrics["synthetic"]["planned"] > first
    assert metrics["synthetic"]["generated_now"] == metrics["synthetic"]["planned"] - first
    files = list((meta.parent).glob("*/*.png"))
    assert len(files) == len(rows) and not list(meta.parent.rglob("*.tmp"))
    assert Path(tmp_path / "digits-lt10-synaug-s0" / "report.html").exists()


def pngs(folder: Path) -> dict:
    from PIL import Image

    out = {}
    for p in sorted(folder.glob("*/*.png")):
        with Image.open(p) as img:
            out[str(p.relative_to(folder))] = np.asarray(img).astype(int)
    return out


def test_a_damaged_store_is_repaired_by_the_same_command(tmp_path):
    """Killed during generation, then a PNG corrupted and a metadata row's id lost: the same
    command says so and regenerates exactly those rows. Then the finished run loses an image
    and another is corrupted: the same command again regenerates them, each from its seed."""
    extra = ["-s", "generator.steps=2", "-s", "generator.sampling_batch_size=8"]
    proc = start(tmp_path, *extra)
    meta = tmp_path / "digits-lt10-synaug-s0" / "synthetic" / "train" / "metadata.jsonl"
    kill_when(proc, lambda: meta.exists() and meta.read_text().count("\n") >= 16)
    lines = meta.read_text().splitlines()[:16]
    first = [json.loads(line) for line in lines]
    (meta.parent / first[0]["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    lines[1] = json.dumps({k: v for k, v in first[1].items() if k != "id"})
    meta.write_text("\n".join(lines) + "\n")
    proc = start(tmp_path, *extra)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "1 corrupt" in err and "1 bad lines" in err and "Traceback" not in err
    metrics = json.loads((tmp_path / "digits-lt10-synaug-s0" / "metrics.json").read_text())
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == metrics["synthetic"]["planned"]
    assert metrics["synthetic"]["generated_now"] == metrics["synthetic"]["planned"] - 16 + 2
    images = pngs(meta.parent)
    assert len(images) == len(rows)

    (meta.parent / rows[3]["file_name"]).unlink()
    (meta.parent / rows[4]["file_name"]).write_bytes(b"not a png")
    proc = start(tmp_path, *extra)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "regenerating" in err and "Traceback" not in err
    again = pngs(meta.parent)
    assert again.keys() == images.keys()
    for name, image in images.items():  # the same seeds give the same images (batching may move a pixel level)
        assert np.abs(again[name] - image).max() <= 2, name
    after = json.loads((tmp_path / "digits-lt10-synaug-s0" / "metrics.json").read_text())
    assert after["synthetic"]["generated_now"] == 2
