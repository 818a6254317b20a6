"""A generator ensemble (`generator.ensemble: k`): k embedded generators trained alike at the
seeds seed, seed + 1, ..., each making the images whose seed falls to it (seed mod k), so
the added images carry the k models' different readings of each class (a tail class of 8
images is learnt k ways) instead of one model's. An image still depends on its row alone:
the same row gives the same image from the same members, in any batch.

It is a `Generator` (base.py) made of generators: the recipes, stores and executors use it
as they use one, and its fingerprint names its members'."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.io import atomic_write_json, not_a_link
from .network import SamplerConfig

KIND = "ensemble"


def member_seeds(seed: int, size: int) -> list[int]:
    """The seeds an ensemble of `size` trains its members at: `seed` first, so its first member
    is the generator the run would train alone."""
    return [seed + j for j in range(size)]


class Ensemble:
    """Generators of one data and shape; image i is made by member `seeds[i] mod len(members)`."""

    kind = KIND

    def __init__(self, members: Sequence):
        if len(members) < 2:
            raise SynthaugError(f"an ensemble needs at least 2 generators, got {len(members)}")
        def made(m):  # what a member makes: the images' shape, conditioning, classes and groups
            config = getattr(m, "config", None)
            return (m.noise_shape, m.image_embed_dim, tuple(getattr(config, "classes", ())), getattr(config, "num_groups", 0))

        if len({made(m) for m in members}) > 1:
            raise SynthaugError("an ensemble's generators must make images of one shape, conditioning, classes and groups")
        self.members = list(members)
        self.history = [{**h, "member": j} for j, m in enumerate(self.members) for h in m.history]
        self.train_seconds = sum(m.train_seconds for m in self.members)

    @property
    def image_embed_dim(self) -> int:
        return self.members[0].image_embed_dim

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        return self.members[0].noise_shape

    @property
    def config(self):  # the network's settings, which the members share (seed aside)
        return self.members[0].config

    def check_compatible(self, data: ImageDataset) -> None:
        for m in self.members:
            m.check_compatible(data)

    def fingerprint(self) -> str:
        names = json.dumps([KIND, [m.fingerprint() for m in self.members]])
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def parts(self, seeds) -> list[list[int]]:
        """The positions each member makes: those whose seed mod k is its index."""
        k = len(self.members)
        owner = [int(s) % k for s in seeds]
        return [[i for i, o in enumerate(owner) if o == j] for j in range(k)]

    def _assemble(self, n: int, parts: list[list[int]], make) -> torch.Tensor:
        out = None
        for j, idx in enumerate(parts):
            if not idx:
                continue
            images = make(self.members[j], idx)
            if out is None:
                out = torch.empty(n, *images.shape[1:], dtype=images.dtype)
            out[idx] = images
        return out if out is not None else torch.empty(0, *self.noise_shape, dtype=torch.uint8)

    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, image_embeds: torch.Tensor | None = None,
                 image_keep: torch.Tensor | None = None, noise: torch.Tensor | None = None, **options) -> torch.Tensor:
        """`Generator.generate`, each image by its seed's member (per-image arguments split alike)."""
        seeds = list(seeds)

        def pick(value, idx):  # a per-image argument's share for `idx` (one value for all stays as it is)
            if value is None or isinstance(value, (int, float)):
                return value
            return value[idx] if isinstance(value, torch.Tensor) else [value[i] for i in idx]

        per_image = {"init_images": init_images, "strength": strength, "image_embeds": image_embeds, "noise": noise}
        if image_keep is not None:  # passed on only when given (a member without image conditioning takes none)
            per_image["image_keep"] = image_keep

        def make(member, idx):
            return member.generate(pick(list(labels), idx), [seeds[i] for i in idx], pick(groups, idx), sampler,
                                   **{k: pick(v, idx) for k, v in per_image.items()}, **options)

        return self._assemble(len(seeds), self.parts(seeds), make)

    def generate_rows(self, rows: list[dict], sampler: SamplerConfig | None = None,
                      sources: ImageDataset | None = None, **options) -> torch.Tensor:
        """Plan rows' images, each row by its seed's member (`options`: e.g. feedback's `guide`)."""
        return self._assemble(len(rows), self.parts([r["seed"] for r in rows]),
                              lambda member, idx: member.generate_rows([rows[i] for i in idx], sampler, sources,
                                                                       **options))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """`generator.json` (kind, members, fingerprint) and each member's own folder, `member-<j>/`."""
        folder = not_a_link(Path(folder))
        folder.mkdir(parents=True, exist_ok=True)
        for j, m in enumerate(self.members):
            m.save_pretrained(not_a_link(folder / f"member-{j}"))
        atomic_write_json(folder / "generator.json", {"kind": KIND, "config": {"members": len(self.members)},
                                                      "fingerprint": self.fingerprint()})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "auto") -> Ensemble:
        from .cache import load_generator

        folder = Path(folder)
        return cls([load_generator(folder / f"member-{j}", device=device) for j in range(saved_size(folder))])


def saved_size(folder: str | os.PathLike) -> int:
    """How many members the ensemble `save_pretrained` wrote to `folder` holds (its generator.json)."""
    try:
        return int(json.loads((Path(folder) / "generator.json").read_text())["config"]["members"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SynthaugError(f"generator folder '{folder}' is not an ensemble save_pretrained wrote ({e})") from None
