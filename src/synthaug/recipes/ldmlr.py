"""LDMLR (Han et al. 2024): generation in feature space for long-tailed recognition.

1. Train the classifier on the long-tailed set as usual (its loss is the run's: `ce`, or
   `balanced-softmax` to build on the best classical baseline).
2. Encode the training images with its feature extractor (penultimate layer, no augmentation).
3. Fit a small class-conditional diffusion model (an MLP denoiser, DDPM noise schedule) on
   those features.
4. Generate features for every class below the largest (DDIM), up to `target_per_class`.
5. Re-train only the head on real + generated features; the feature extractor stays as is.

No image is generated, so it costs a minute on a CPU where image generation costs many."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..choices import HeadInit, check_choices
from ..classify import evaluate, fit_classifier
from ..classify.train import extract_features, fit_head
from ..config import register_section
from ..errors import SynthaugError
from ..generate.features import FeatureDiffusion
from .registry import RecipeResult, register_recipe


@register_section("ldmlr")
@dataclass
class LdmlrSection:
    """LDMLR: a diffusion model on the classifier's features; the head re-trained on real + generated features."""

    target_per_class: int | None = None  # features per class after filling (default: the largest class)
    steps: int = 2000  # denoiser training steps
    hidden: int = 256  # the MLP denoiser's width
    blocks: int = 3  # its residual blocks
    batch_size: int = 256
    lr: float = 1.0e-3
    sampling_steps: int = 50  # DDIM steps
    guidance_scale: float = 1.0  # classifier-free guidance (1: none)
    head_epochs: int = 10  # the head's re-training on real + generated features
    head_lr: float = 0.05
    head_init: HeadInit = "fresh"  # the head re-trained from a fresh start (as cRT), or fine-tuned from the trained one

    def __post_init__(self):
        check_choices(self, "ldmlr.")
        if min(self.steps, self.hidden, self.blocks, self.batch_size, self.sampling_steps, self.head_epochs) < 1:
            raise SynthaugError("ldmlr.steps, hidden, blocks, batch_size, sampling_steps and head_epochs must be >= 1")
        if self.lr <= 0 or self.head_lr <= 0 or self.guidance_scale < 0:
            raise SynthaugError("ldmlr.lr and ldmlr.head_lr must be > 0, ldmlr.guidance_scale >= 0")
        if self.target_per_class is not None and self.target_per_class < 1:
            raise SynthaugError("ldmlr.target_per_class must be >= 1 (or unset: the largest class)")


def check(task, config):
    if config.validate.enabled:
        raise SynthaugError("ldmlr generates features, not images, so validate.enabled would do nothing: set "
                            "validate.enabled=false")
    counts = task.train.class_counts()
    target = config.ldmlr.target_per_class
    if target is not None and target < int(counts.max()):
        raise SynthaugError(f"ldmlr.target_per_class ({target}) is below the largest class ({int(counts.max())}): "
                            "raise it or leave it unset")


def deficit_labels(counts: torch.Tensor, target: int | None) -> torch.Tensor:
    """One label per feature to generate: every class filled to `target` (default: the largest)."""
    target = int(counts.max()) if target is None else target
    return torch.cat([torch.full((max(0, target - int(n)),), c, dtype=torch.long) for c, n in enumerate(counts)])


@register_recipe("ldmlr", "LDMLR: a diffusion model on the classifier's features fills the tail; the head re-trained on "
                 "real + generated features", check=check, generates=True)
def ldmlr(task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    opts, seconds, real = config.ldmlr, {}, task.train

    # 1. the classifier, trained on the long-tailed set as configured
    result = fit_classifier(real, replace(config.train, refit_head=False), seed=config.seed, progress=progress,
                            checkpoint_dir=Path(workdir) / "checkpoint" if workdir else None)
    seconds["train"] = result.seconds
    model = result.model

    # 2-3. its features of the training images, and a diffusion model on them
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    feats = extract_features(model, real.images).float().cpu()
    diffusion = FeatureDiffusion(feats.shape[1], real.num_classes, hidden=opts.hidden, blocks=opts.blocks,
                                 seed=config.generator.seed)
    diffusion.fit(feats, real.labels, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                  seed=config.generator.seed, progress=progress, device=device)
    seconds["generator"] = time.perf_counter() - t0

    # 4. features for the classes below the target
    t0 = time.perf_counter()
    labels = deficit_labels(real.class_counts(), opts.target_per_class)
    generated = diffusion.generate(labels, seed=config.generator.plan_seed, sampling_steps=opts.sampling_steps,
                                   guidance_scale=opts.guidance_scale) if len(labels) else feats[:0]
    seconds["generate"] = time.perf_counter() - t0
    with torch.no_grad():  # how many generated features the trained head already puts in their class
        recognised = float((model.head(generated.to(device)).argmax(1).cpu() == labels).float().mean()) \
            if len(labels) else None

    # 5. only the head, re-trained on real + generated features
    t0 = time.perf_counter()
    fit_head(model, torch.cat([feats, generated]).to(device), torch.cat([real.labels, labels]).to(device),
             real.num_classes, epochs=opts.head_epochs, lr=opts.head_lr, seed=config.seed, reset=opts.head_init == "fresh")
    seconds["refit_head"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = evaluate(model, task.test, train_counts=real.class_counts(), many_threshold=config.eval.many_threshold,
                       few_threshold=config.eval.few_threshold)
    seconds["evaluate"] = time.perf_counter() - t0
    extra = {
        "generator": {"kind": diffusion.kind, "source": "trained", "train_seconds": diffusion.train_seconds,
                      "history": diffusion.history},
        "synthetic": {"images": len(labels), "generated_now": len(labels), "features": True,
                      "counts": torch.bincount(labels, minlength=real.num_classes).tolist(),
                      "recognised_by_the_trained_head": recognised},
    }
    return RecipeResult(metrics=metrics, model=model, history=result.history, seconds=seconds, extra=extra,
                        steps=result.steps)
