"""The generator interface: what recipes and stages may ask of any generator. The embedded
diffusion model (`diffusion.DiffusionGenerator`) and Stable Diffusion through diffusers
(`stable_diffusion.StableDiffusionGenerator`) implement it; a third generator plugs in by
implementing it too, without touching the recipes.

Plan rows reach a generator through `generate_rows`; UtilGen's policy and model steps go
through the four policy handles at the bottom."""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..plan import row_kind
from .image_condition import condition_embeddings
from .network import SamplerConfig


@runtime_checkable
class Generator(Protocol):
    kind: str  # recorded in generator.json and the run's metrics
    history: list[dict]  # training curve (steps, loss)
    train_seconds: float

    @property
    def image_embed_dim(self) -> int:
        """Dimensions of the image condition it takes (0: class-conditional only)."""

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """The shape of one image's initial noise (pixels or latents)."""

    def check_compatible(self, data: ImageDataset) -> None:
        """Raise SynthaugError if it cannot make images for `data` (classes, channels, size)."""

    def fingerprint(self) -> str:
        """Names exactly what makes the images (weights, policy): stored with each image."""

    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, image_embeds: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images for `labels`, each from its own seed (image-guided from `init_images`
        at `strength`, image-conditioned on `image_embeds`, or from given initial `noise`)."""

    def generate_rows(self, rows: list[dict], sampler: SamplerConfig | None = None,
                      sources: ImageDataset | None = None) -> torch.Tensor:
        """uint8 images for plan rows (rows that start from real images index `sources`). A
        generator that takes feedback guidance (the embedded one) also accepts `guide=`, the
        classifier that steers its sampling (`feedback.py`)."""

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """generator.json + weights (safetensors), read back by `from_pretrained`."""

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *args, **kwargs) -> Generator:
        """The generator `save_pretrained` wrote."""

    # UtilGen's policy handles
    def policy_embeddings(self) -> torch.Tensor:
        """The condition vectors the instance-level policy moves (class or prompt embeddings)."""

    def optimise_policy_embeddings(self, images: torch.Tensor, labels: torch.Tensor, *, steps: int, lr: float,
                                   proximity: float, anchor: torch.Tensor | None, seed: int, progress: bool = False) -> dict:
        """Move the classes' policy vectors to lower the denoising loss on `images`, kept near `anchor`."""

    def invert_noise(self, images: torch.Tensor, labels, *, steps: int, guidance_scale: float,
                     guidance_interval: tuple[float, float] | None = None, progress: bool = False) -> torch.Tensor:
        """The initial noise from which the deterministic sampler (guided as it samples: at
        `guidance_scale`, within `guidance_interval` where set) returns to each image."""

    def finetune_dpo(self, preferred: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, *, steps: int,
                     lr: float, beta: float, seed: int, progress: bool = False) -> list[dict]:
        """Diffusion-DPO: prefer `preferred[i]` over `rejected[i]` (same class); the training log."""


def generate_arguments(rows: list[dict], sources: ImageDataset | None, encoder) -> dict:
    """`generate`'s arguments for plan rows of one kind: labels, seeds and groups; the source
    images and strengths of image-guided rows; the conditioning embeddings (from `encoder`)
    of image-conditioned rows."""
    kind = row_kind(rows[0]) if rows else "plain"
    if kind not in ("plain", "guided", "conditioned"):
        raise SynthaugError(f"plan rows of kind '{kind}' are made by their recipe (UtilGen), not by generate_rows")
    guided, conditioned = kind == "guided", kind == "conditioned"
    if (guided or conditioned) and sources is None:
        raise SynthaugError("these plan rows start from real images: pass the dataset their source indices point into")
    embeds = keep = None
    if conditioned:
        pairs = torch.tensor([r["sources"] for r in rows])
        embeds, keep = condition_embeddings(encoder, sources.images[pairs[:, 0]], sources.images[pairs[:, 1]],
                                            [r["conditioning"] for r in rows], [r["seed"] for r in rows],
                                            dropout=rows[0].get("dropout", 0.3))
    return {"labels": [r["label"] for r in rows], "seeds": [r["seed"] for r in rows],
            "groups": [r["group"] for r in rows] if rows and rows[0].get("group") is not None else None,
            "init_images": sources.images[[r["source"] for r in rows]] if guided else None,
            "strength": [r["strength"] for r in rows] if guided else 1.0, "image_embeds": embeds, "image_keep": keep}
