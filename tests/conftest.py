"""Shared fixtures: tiny in-code data and folders; every test gets its own cache folder."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synthaug.data import ImageDataset

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHAUG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SYNTHAUG_FASHION_MNIST_DIR", raising=False)
    monkeypatch.delenv("SYNTHAUG_CIFAR10", raising=False)


def make_dataset(n_per_class=(20, 10, 5), channels=1, size=8, seed=0) -> ImageDataset:
    """Class c images are bright in row band c, so a classifier can learn them."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c, n in enumerate(n_per_class):
        x = torch.randint(0, 60, (n, channels, size, size), generator=g)
        band = slice(c * size // len(n_per_class), (c + 1) * size // len(n_per_class))
        x[:, :, band, :] += 180
        images.append(x.clamp(0, 255).to(torch.uint8))
        labels += [c] * n
    return ImageDataset(torch.cat(images), torch.tensor(labels), [f"class{c}" for c in range(len(n_per_class))])


@pytest.fixture
def tiny():
    return make_dataset()


def run_cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    """`synthaug ARGS` in this process: (exit status, stdout, stderr)."""
    import sys

    from synthaug.cli import main

    monkeypatch.setattr(sys, "argv", ["synthaug", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def write_image_folder(root: Path, counts=(4, 3), size=(10, 10), mode="RGB", fmt="png") -> Path:
    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        d = root / f"cls{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(d / f"{i}.{fmt}")
    return root


def write_idx(path: Path, array: np.ndarray, compress=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def die_after_saving_step(monkeypatch, step: int, key: str = "step"):
    """Make every training loop's checkpoint (`utils.loop`) raise KeyboardInterrupt right after
    it saves training step (or epoch, `key`) `step`: a kill during training. Returns a
    function that undoes it."""
    from synthaug.utils import loop as module

    real_save = module.save_state

    def save_then_die(folder, state):
        real_save(folder, state)
        if state[key] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_state", save_then_die)
    return lambda: monkeypatch.setattr(module, "save_state", real_save)
