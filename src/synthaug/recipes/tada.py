"""TADA (seed 001): augment only the examples that are not learned early in training.

1. Train the classifier for a few epochs of its normal schedule.
2. Score each training example by its loss at that point; k-means (k=2) on the losses
   splits them into learned and slow-learnable (typically 30-40% of the data). synthaug's
   default targets the top 35% of losses instead (`share`; unset it for the paper's k-means).
3. Make `variants` image-guided variants of each slow-learnable example: noise the real
   image part of the way (SDEdit, about half the steps) and denoise it under its label.
4. Train from scratch on the originals plus the variants (SGD or SAM, usual augmentation),
   each variant weighted `synthetic_weight` (default 0.3) in the loss.

The paper's baselines are registered beside it: `tada-all` generates variants of every
example, `tada-upsample` duplicates the slow-learnable examples instead of generating; and
a control, `tada-random`, generates variants of as many examples drawn at random (does the
targeting matter, or only the number of images?).
"""

from __future__ import annotations

import html
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from ..classify import example_losses, fit_classifier, training_key
from ..config import register_section
from ..data import ImageDataset, concat
from ..errors import SynthaugError
from ..generate.cache import check_generator, check_store_made
from ..generate.stage import generator_stage
from ..plan import target_mask, targeted_plan
from ..report import image_row, pct, png, show, subplots
from ..select.stage import generated_rows, select_stage, stage_seconds
from ..utils.io import atomic_write_json, read_keyed
from ..utils.paths import check_folder
from .registry import RecipeResult, register_recipe, train_and_evaluate

MODES = {
    "tada": "TADA: image-guided variants of the slow-learnable examples (the top tada.share of early-training "
            "losses; k-means on them with share null)",
    "tada-all": "TADA's baseline: image-guided variants of every training example",
    "tada-upsample": "TADA's baseline: the slow-learnable examples duplicated instead of generated",
    "tada-random": "TADA's control: image-guided variants of as many examples as TADA targets, drawn at random",
}


@register_section("tada")
@dataclass
class TadaSection:
    """TADA: image-guided variants of the training examples not learned early in training."""

    # a variant's image follows its example, variant index and strength: runs that target differently share a store
    IMAGE_KEYS = ("variants", "strength")
    # options added since TADA's first release, with what it did before them (the paper's k-means, weight 1)
    ADDED: ClassVar[dict[str, object]] = {"loss_epochs": 1, "per_class": False, "share": None, "synthetic_weight": 1.0}

    early_epochs: int = 3  # epochs of the normal schedule run before each example's loss is scored
    variants: int = 5  # image-guided variants per targeted example (the paper: 5 on CIFAR)
    strength: float | list = 0.5  # SDEdit strength, the share of sampling steps re-run: a number or [low, high]
    store_dir: str | None = None  # where the variants go (default: <run folder>/synthetic); tada, tada-all, tada-random
    # runs on the same split and generator can share one store (same row ids for the same examples)
    # the targeting (issue 21): losses averaged over the last `loss_epochs` early epochs; k-means within each
    # class (`per_class`); `share`: that share of the highest losses (None: the paper's k-means split)
    loss_epochs: int = 1
    per_class: bool = False
    share: float | None = 0.35
    # each added image's loss weight (real images: 1). The defaults, top 35% at weight 0.3, are the longtail
    # suite's best TADA row on 10% of Fashion-MNIST (2 generator seeds; BENCHMARKS.md)
    synthetic_weight: float = 0.3

    def __post_init__(self):
        from ..plan import strength_range

        if self.early_epochs < 1 or self.variants < 1:
            raise SynthaugError("tada.early_epochs and tada.variants must be >= 1")
        if not 1 <= self.loss_epochs <= self.early_epochs:
            raise SynthaugError(f"tada.loss_epochs must be in [1, tada.early_epochs = {self.early_epochs}], "
                                f"got {self.loss_epochs}")
        if self.share is not None and not 0 < self.share < 1:
            raise SynthaugError(f"tada.share must be in (0, 1) (or unset: k-means), got {self.share}")
        if not 0 < self.synthetic_weight < float("inf"):
            raise SynthaugError(f"tada.synthetic_weight must be a finite number > 0, got {self.synthetic_weight}")
        strength_range(self.strength, "tada.strength")
        check_folder(self.store_dir, "tada.store_dir")


def check(task, config):
    """Fail on a generator that cannot be built, an early checkpoint that is not early, or a given
    store that holds a variant this run may make made another way, before anything is written."""
    opts = config.tada
    if opts.early_epochs >= config.train.epochs:
        raise SynthaugError(f"tada.early_epochs ({opts.early_epochs}) must be below train.epochs "
                            f"({config.train.epochs}): the split needs a model that has not finished training")
    check_generator(config.generator, task.train, groups=task.train.groups is not None)  # variants keep their group
    if opts.store_dir:  # which examples are targeted is known after the early training; a variant's row is not
        every = torch.ones(len(task.train), dtype=torch.bool)
        plan = targeted_plan(task.train, every, variants=opts.variants, strength=opts.strength,
                             seed=config.generator.plan_seed)
        check_store_made(opts.store_dir, task.train.classes, generated_rows(plan, config), config.generator,
                         config.train.device)


def score_examples(task, config, *, workdir: Path, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Steps 1-2: each training example's loss after `tada.early_epochs` epochs (averaged over
    the last `tada.loss_epochs` of them), and the targeted (slow-learnable) mask. Both go to
    `targeted.json` in `workdir` with what names them (the early training's key, the epochs), and
    a re-run of the run folder reads them back (with the seconds they took) when that matches."""
    opts, saved, t0 = config.tada, workdir / "targeted.json", time.perf_counter()
    early_train = replace(config.train, refit_head=False)
    key = {**training_key(task.train, early_train, seed=config.seed), "epochs": opts.early_epochs,
           "loss_epochs": opts.loss_epochs}
    early = read_keyed(saved, key)
    if early is None:
        scored = []
        for epoch in range(opts.early_epochs - opts.loss_epochs + 1, opts.early_epochs + 1):  # each resumes the last
            fit = fit_classifier(task.train, early_train, seed=config.seed, stop_after_epochs=epoch,
                                 checkpoint_dir=workdir / "early-checkpoint", progress=progress)
            scored.append(example_losses(fit.model, task.train))
        early = {"key": key, "seconds": time.perf_counter() - t0,
                 "train_acc": fit.history[-1]["train_acc"] if fit.history else None,
                 "losses": torch.stack(scored).mean(0).tolist()}
    losses = torch.tensor(early["losses"])
    mask = target_mask(losses, task.train.labels, per_class=opts.per_class, share=opts.share, seed=config.seed)
    atomic_write_json(saved, {**early, "slow_learnable": mask.tolist()})
    return losses, mask, early


def random_like(mask: torch.Tensor, *, seed: int) -> torch.Tensor:
    """A mask with as many examples as `mask`, drawn uniformly at random."""
    pick = torch.randperm(len(mask), generator=torch.Generator().manual_seed(seed))[: int(mask.sum())]
    return torch.zeros_like(mask).index_fill_(0, pick, True)


def loss_histogram(losses: torch.Tensor, mask: torch.Tensor, bins: int = 30) -> dict:
    """Counts of learned and slow-learnable examples per bin of log(1 + loss)."""
    x = torch.log1p(losses.double())
    edges = torch.linspace(0, max(float(x.max()), 1e-6) if len(x) else 1.0, bins + 1)
    count = lambda v: torch.histogram(v, edges.double()).hist.long().tolist() if len(v) else [0] * bins  # noqa: E731
    return {"log1p_edges": [round(e, 4) for e in edges.tolist()], "learned": count(x[~mask]), "slow": count(x[mask])}


def run_tada(mode, task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    opts, seconds = config.tada, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-"))
    real = task.train

    losses, mask, early = score_examples(task, config, workdir=workdir, progress=progress)
    seconds["early_training"] = early["seconds"]  # read back by a re-run: the seconds it took when scored
    if mode == "tada-all":
        target = torch.ones_like(mask)
    elif mode == "tada-random":
        target = random_like(mask, seed=config.seed)
    else:
        target = mask
    extra = {"targeted": {
        "mode": mode, "early_epochs": opts.early_epochs, "early_train_acc": early["train_acc"],
        "loss_epochs": opts.loss_epochs, "per_class": opts.per_class, "share": opts.share,
        "slow_learnable": int(mask.sum()), "slow_learnable_share": float(mask.float().mean()),
        "targeted": int(target.sum()), "variants": opts.variants, "strength": opts.strength,
        "synthetic_weight": opts.synthetic_weight,
        "slow_per_class": torch.bincount(real.labels[mask], minlength=real.num_classes).tolist(),
        "loss_histogram": loss_histogram(losses, mask),
        # the hardest targeted examples, for the report (the full mask is in targeted.json)
        "examples": torch.nonzero(target).flatten()[losses[target].argsort(descending=True)][:64].tolist(),
    }}

    if mode == "tada-upsample":  # the same examples, duplicated `variants` times
        added = real.subset(torch.nonzero(target).flatten().repeat_interleave(opts.variants))
    else:
        # 3. image-guided variants of the targeted examples, into the store
        generator, extra["generator"] = generator_stage(real, config, progress=progress, unlabeled=task.unlabeled)
        seconds["generator"] = extra["generator"].pop("seconds")
        plan = targeted_plan(real, target, variants=opts.variants, strength=opts.strength, seed=config.generator.plan_seed)
        store_dir = Path(opts.store_dir) if opts.store_dir else workdir / "synthetic"
        added, extra["synthetic"] = select_stage(plan, generator, config, store_dir, real, progress=progress)
        seconds.update(stage_seconds(extra["synthetic"]))
        extra["synthetic"]["counts_after"] = (real.class_counts() + added.class_counts()).tolist()

    # 4. train from scratch on the originals + the variants (each weighted `synthetic_weight` in the loss)
    weights = torch.cat([torch.ones(len(real)), torch.full((len(added),), opts.synthetic_weight)])
    result, metrics, spent = train_and_evaluate(concat(real, added) if len(added) else real, task, config,
                                                workdir=workdir, progress=progress, sample_weights=weights)
    seconds.update(spent)
    return RecipeResult(metrics=metrics, model=result.model, history=result.history, seconds=seconds, extra=extra,
                        steps=result.steps, synthetic=added if mode != "tada-upsample" and len(added) else None)


def _register(mode: str):
    def fn(task, config, *, workdir=None, progress=False, trained=None):
        return run_tada(mode, task, config, workdir=workdir, progress=progress, trained=trained)

    fn.__name__ = mode.replace("-", "_")
    register_recipe(mode, MODES[mode], check=check if mode != "tada-upsample" else None, report=report,
                    shared_store="tada", generates=mode != "tada-upsample", selects=mode != "tada-upsample")(fn)  # a variant's image follows its source and seed, not the classifier


# ---------------------------------------------------------------------------- report


def report(result: RecipeResult, real: ImageDataset) -> str:
    """TADA's sections of report.html: the targeted examples, and real images beside their variants."""
    out = targeted_section(result.extra["targeted"], real)
    synthetic = result.synthetic
    if synthetic is not None and len(synthetic) and any(r.get("source") is not None for r in synthetic.info["rows"]):
        out += ("<h2>Conditions and their generations</h2><p class='muted'>Each row: the real image a generation "
                "started from (left), then the images made from it, with the SDEdit strength of each.</p>"
                + conditions_grid(real, synthetic))
    return out


def targeted_section(t: dict, real: ImageDataset) -> str:
    """TADA's plan: how many examples were slow-learnable, their losses, classes and faces."""
    n = len(real)
    how = "the top share of" if t.get("share") else "k-means on"
    text = (f"<h2>Targeted examples</h2><p>After {t['early_epochs']} epoch(s) (training accuracy "
            f"{pct(t.get('early_train_acc'))}%), {how} the per-example losses put <b>{t['slow_learnable']} of {n} "
            f"examples ({100 * t['slow_learnable_share']:.1f}%)</b> in the slow-learnable cluster. Mode "
            f"<b>{html.escape(t['mode'])}</b>: {t['targeted']} example(s) targeted, {t['variants']} "
            f"{'duplicate' if t['mode'] == 'tada-upsample' else 'variant'}(s) each.</p>")
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 2.8))
    h = t["loss_histogram"]
    edges = h["log1p_edges"]
    width = edges[1] - edges[0]
    ax1.bar(edges[:-1], h["learned"], width, align="edge", label="learned", color="#4c72b0")
    ax1.bar(edges[:-1], h["slow"], width, align="edge", bottom=h["learned"], label="slow-learnable", color="#dd8452")
    ax1.set_xlabel("log(1 + loss) early in training")
    ax1.set_ylabel("examples")
    ax1.legend(fontsize=8)
    counts = real.class_counts().tolist()
    share = [100 * s / max(1, c) for s, c in zip(t["slow_per_class"], counts)]
    ax2.bar(range(len(share)), share, color="#dd8452")
    ax2.set_xticks(range(len(share)), real.classes, rotation=45, ha="right", fontsize=8)
    ax2.set_ylabel("slow-learnable (% of class)")
    text += png(fig)
    examples = t.get("examples", [])[:32]
    if examples:
        text += "<p class='muted'>The targeted examples with the highest early loss:</p>" + image_row(real.images[examples], 16)
    return text


def conditions_grid(real: ImageDataset, synthetic: ImageDataset, sources: int = 8, per_source: int = 6) -> str:
    rows = synthetic.info["rows"]
    by_source: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.get("source") is not None:
            by_source.setdefault(int(r["source"]), []).append(i)
    picked = list(by_source.items())[:: max(1, len(by_source) // sources)][:sources]
    fig, axes = subplots(len(picked), per_source + 1, figsize=((per_source + 1) * 1.2, len(picked) * 1.3))
    axes = axes.reshape(len(picked), per_source + 1)
    for ax_row, (src, made) in zip(axes, picked):
        for j, ax in enumerate(ax_row):
            ax.axis("off")
            if j == 0:
                show(ax, real.images[src])
                ax.set_title(f"real: {real.classes[int(real.labels[src])]}", fontsize=7)
            elif j - 1 < len(made):
                show(ax, synthetic.images[made[j - 1]])
                strength = rows[made[j - 1]].get("strength")
                ax.set_title("" if strength is None else f"s={strength:.2f}", fontsize=7)
    return png(fig)


for _mode in MODES:
    _register(_mode)
