"""The skeleton every training loop in synthaug shares (the classifier, the weight network,
the embedded generator, Stable Diffusion's LoRA adaptation): each step draws its randomness
from (seed, step) alone, and a checkpoint keyed to the training (data, settings, seed) is
saved every N steps, so an interrupted training resumes exactly where it stopped and a
checkpoint of another training is never resumed. State is saved as safetensors (`io.py`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .io import load_state, save_state


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: from (seed, step) alone, so a resumed run
    draws what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Checkpoint:
    """A training's resume point in `folder` (None: no checkpoints). `key` names the training;
    `save(values, **stateful)` writes plain values and the state dicts of the stateful objects
    (model, optimizer, scheduler, EMA, ...); `restore(**stateful)` loads those back and returns
    the values, or None when the folder holds no checkpoint of this training."""

    def __init__(self, folder: str | os.PathLike | None, key: dict):
        self.folder = Path(folder) if folder else None
        self.key = json.dumps(key, sort_keys=True, default=str)

    def restore(self, accept=lambda values: True, **stateful) -> dict | None:
        state = load_state(self.folder) if self.folder else None
        if state is None or state.get("run_key") != self.key or not accept(state):
            return None
        for name, obj in stateful.items():
            obj.load_state_dict(state[name])
        return {k: v for k, v in state.items() if k not in stateful and k != "run_key"}

    def save(self, values: dict, **stateful):
        if self.folder is not None:
            save_state(self.folder, {**values, **{n: o.state_dict() for n, o in stateful.items()}, "run_key": self.key})


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate over `warmup` steps, then a half cosine to 0 at `total`.
    The warmup's first step already trains ((step + 1) / warmup); diffusers'
    `get_cosine_schedule_with_warmup` starts at 0, a wasted step, and would change every
    recorded result."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_constant(optimizer: torch.optim.Optimizer, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the base rate over `warmup` steps ((step + 1) / warmup), then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup)))
