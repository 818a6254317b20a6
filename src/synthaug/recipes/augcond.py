"""Augmentation-conditioned generation (seed 002): condition the generator on the class AND
on an augmented real image of that class, so the generations stay in the domain of the real
data yet differ from every real image.

1. Train the embedded generator with an image condition: the embedding of a real image from
   a fixed encoder (generate/image_condition.py), dropped at random so it also works without
   it. In the few-shot protocol it also trains on the unlabelled pool (never on test images).
2. Plan the images each class needs: fill a long tail to uniform, or expand few-shot classes.
3. Generate each from the class and a conditioning operator on one or two real images of the
   class: the image, Dropout, Mixup, CutMix, Embed-Mixup, Embed-CutMix, Embed-CutMix-Dropout
   (or label-only, the baseline). Classifier-free guidance (the paper: scale about 10).
4. Train the classifier on real + generated images (the paper used Balanced Softmax on a long
   tail: set train.loss).
"""

from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..choices import Operator
from ..config import register_section
from ..data import ImageDataset, concat
from ..errors import SynthaugError
from ..generate.cache import check_generator, check_store_made
from ..generate.stage import generator_stage
from ..plan import conditioned_plan
from ..report import png, show, subplots
from ..select.stage import generated_rows, select_stage, stage_seconds
from ..utils.paths import check_folder
from .registry import RecipeResult, register_recipe, train_and_evaluate


@register_section("augcond")
@dataclass
class AugcondSection:
    """AugCond: generations conditioned on the class and on augmented real images of it."""

    mode: Operator = "embed-cutmix-dropout"  # the best on ImageNet-LT
    embed_dim: int = 32  # dimensions of the fixed image encoder's embedding
    dropout: float = 0.3  # rate of the Dropout operators (dropout, embed-cutmix-dropout)
    expand: float = 1.0  # images per class after filling: expand x the largest class (1 = uniformize a long tail)
    target_per_class: int | None = None  # or this many per class
    store_dir: str | None = None  # where generated images go (default: <run folder>/synthetic)

    def __post_init__(self):
        if self.embed_dim < 1 or self.expand <= 0 or (self.target_per_class is not None and self.target_per_class < 1):
            raise SynthaugError("augcond.embed_dim must be >= 1, augcond.expand > 0 and augcond.target_per_class >= 1")
        if not 0 <= self.dropout < 1:
            raise SynthaugError(f"augcond.dropout must be in [0, 1), got {self.dropout}")
        check_folder(self.store_dir, "augcond.store_dir")


def target_count(task, config) -> int:
    opts = config.augcond
    largest = int(task.train.class_counts().max())
    target = opts.target_per_class if opts.target_per_class is not None else round(opts.expand * largest)
    if target <= int(task.train.class_counts().min()):
        raise SynthaugError(f"augcond would generate nothing: every class already has {target} or more images; "
                            "set augcond.expand > 1 (or augcond.target_per_class) to expand the classes")
    return target


def plan_of(task, config) -> list[dict]:
    """The rows to generate: each class expanded to the target, each row conditioned on real images."""
    opts = config.augcond
    return conditioned_plan(task.train, target_per_class=target_count(task, config), mode=opts.mode,
                            seed=config.generator.plan_seed, dropout=opts.dropout)


def check(task, config):
    """Fail on an impossible plan, generator or store before anything is written."""
    plan = plan_of(task, config)
    check_generator(config.generator, task.train, image_embed_dim=config.augcond.embed_dim)
    check_store_made(config.augcond.store_dir, task.train.classes, generated_rows(plan, config), config.generator,
                     config.train.device)


# ---------------------------------------------------------------------------- report


def report(result: RecipeResult, real: ImageDataset) -> str:
    """AugCond's section of report.html: each generation beside the real images it was conditioned on."""
    synthetic = result.synthetic
    if synthetic is None or not len(synthetic) or not any(r.get("sources") is not None for r in synthetic.info["rows"]):
        return ""
    c = result.extra.get("conditioning", {})
    pool = f", generator also trained on {c['unlabeled_pool']} unlabelled images" if c.get("unlabeled_pool") else ""
    return (f"<h2>Conditions and their generations</h2><p class='muted'>Conditioning mode "
            f"<b>{html.escape(str(c.get('mode')))}</b>, guidance {c.get('guidance_scale')}, image embedding of "
            f"{c.get('embed_dim')} dimensions{pool}. Each triple: the real image, the second real image of the "
            "class that the mixing modes blend in, and the generation.</p>" + pairs_grid(real, synthetic))


def pairs_grid(real: ImageDataset, synthetic: ImageDataset, lines: int = 8, per_line: int = 3) -> str:
    """Triples (first condition, second condition, generation) for image-conditioned rows,
    spread over the classes."""
    rows = synthetic.info["rows"]
    position, seen = [], {}
    for label in synthetic.labels.tolist():  # each row's place among its class's rows
        position.append(seen.get(label, 0))
        seen[label] = position[-1] + 1
    order = sorted(range(len(rows)), key=lambda i: (position[i], int(synthetic.labels[i])))
    picked = order[: lines * per_line]
    fig, axes = subplots(lines, 3 * per_line, figsize=(3 * per_line * 0.95, lines * 1.05))
    axes = axes.reshape(lines, 3 * per_line)
    for ax in axes.flatten():
        ax.axis("off")
    for k, i in enumerate(picked):
        a, b = rows[i]["sources"]
        line, col = divmod(k, per_line)
        for j, (image, title) in enumerate([(real.images[a], f"real: {real.classes[int(real.labels[a])]}"),
                                            (real.images[b], "2nd real"), (synthetic.images[i], "generated")]):
            ax = axes[line, 3 * col + j]
            show(ax, image)
            ax.set_title(title, fontsize=6, color="#dd8452" if j == 2 else "black")
    return png(fig)


@register_recipe("augcond", "AugCond: generations conditioned on the class and augmented real images of it "
                 "(augcond.mode picks the operator)", check=check, report=report, shared_store="augcond",
                 ssl=True, selects=True)
def augcond(task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    opts, seconds = config.augcond, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-"))
    real = task.train

    # 1. the image-conditioned generator (also trained on the unlabelled pool, when the split has one)
    generator, generator_info = generator_stage(real, config, progress=progress, unlabeled=task.unlabeled,
                                                image_embed_dim=opts.embed_dim)
    seconds["generator"] = generator_info.pop("seconds")

    # 2-3. plan and generate
    plan = plan_of(task, config)
    store_dir = Path(opts.store_dir) if opts.store_dir else workdir / "synthetic"
    synthetic, synthetic_info = select_stage(plan, generator, config, store_dir, real, progress=progress)
    seconds.update(stage_seconds(synthetic_info))

    # 4. train on real + generated
    data = concat(real, synthetic)
    result, metrics, spent = train_and_evaluate(data, task, config, workdir=workdir, progress=progress)
    seconds.update(spent)
    extra = {
        "conditioning": {"mode": opts.mode, "embed_dim": opts.embed_dim, "guidance_scale": config.generator.guidance_scale,
                         "unlabeled_pool": 0 if task.unlabeled is None else len(task.unlabeled)},
        "generator": generator_info,
        "synthetic": {**synthetic_info, "counts_after": data.class_counts().tolist()},
    }
    return RecipeResult(metrics=metrics, model=result.model, history=result.history, seconds=seconds, extra=extra,
                        steps=result.steps, synthetic=synthetic, curve=result.curve)
