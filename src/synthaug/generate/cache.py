"""The generator stage of a run: load the configured generator, or train one on the
training split, cached by a fingerprint of the data and the config, so a second run (or a
second recipe) on the same data reuses it, and an interrupted training resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from ..data.dataset import ImageDataset
from .diffusion import DiffusionGenerator, GeneratorConfig, GeneratorTrainConfig, SamplerConfig

TRAINING_KEYS = ("preset", "steps", "batch_size", "lr", "ema_decay", "label_dropout", "seed")


def generator_fingerprint(data: ImageDataset, section, num_groups: int) -> str:
    keys = {k: getattr(section, k) for k in TRAINING_KEYS}
    payload = json.dumps({"data": data.fingerprint(), "generator": keys, "groups": num_groups}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def generator_for(data: ImageDataset, section, *, cache_root: str | Path, progress: bool = False,
                  device: str = "auto") -> tuple[DiffusionGenerator, dict]:
    """The generator for `data`: `section.path` if set, else the cached one trained with the
    same data and settings, else a new one trained now. Returns it and a description."""
    if section.path:
        gen = DiffusionGenerator.from_pretrained(section.path, device=device)
        gen.check_compatible(data)
        return gen, {"source": "pretrained", "path": str(section.path), "trained_now": False}
    num_groups = len(data.group_names) if data.groups is not None and data.group_names else 0
    fingerprint = generator_fingerprint(data, section, num_groups)
    folder = Path(cache_root) / fingerprint
    if (folder / "generator.json").exists():
        gen = DiffusionGenerator.from_pretrained(folder, device=device)
        return gen, {"source": "cache", "path": str(folder), "trained_now": False}
    config = GeneratorConfig(image_size=data.image_size[0], channels=data.channels, classes=data.classes,
                             num_groups=num_groups, preset=section.preset, label_dropout=section.label_dropout)
    train = GeneratorTrainConfig(steps=section.steps, batch_size=section.batch_size, lr=section.lr,
                                 ema_decay=section.ema_decay, checkpoint_every=section.checkpoint_every, device=device)
    gen = DiffusionGenerator.fit(data, config, train, seed=section.seed, checkpoint_dir=folder / "checkpoint",
                                 progress=progress)
    gen.save_pretrained(folder)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return gen, {"source": "trained", "path": str(folder), "trained_now": True, "train_config": asdict(train)}


def sampler_config(section) -> SamplerConfig:
    return SamplerConfig(sampler=section.sampler, steps=section.sampling_steps, guidance_scale=section.guidance_scale,
                         batch_size=section.sampling_batch_size)


def provenance(generator, sampling: SamplerConfig) -> dict:
    """What made an image, as recorded in a store's metadata (a store refuses rows made otherwise)."""
    return {"generator": generator.fingerprint(), "guidance_scale": sampling.guidance_scale,
            "sampler": f"{sampling.sampler}/{sampling.steps}"}
