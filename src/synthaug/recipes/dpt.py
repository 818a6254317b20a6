"""DPT, "Diffusion models and semi-supervised learners benefit mutually with few labels"
(You et al. NeurIPS 2023): few labels and a pool of unlabelled images.

1. Train the semi-supervised classifier (FixMatch, or `train.ssl`) on the labelled images and
   the pool, and pseudo-label the whole pool with it (its label and confidence per image).
2. Train the class-conditional generator on the labelled images and the pseudo-labelled pool
   with its pseudo-labels; images below `dpt.confidence` train under the null class.
3. Generate `dpt.per_class` images per class: from the label alone, or (`dpt.mode`, AugCond's
   operators) conditioned on pseudo-labelled images of the class as well.
4. Retrain the semi-supervised classifier with the generated images as labelled data.

`dpt.replay` is the control: the same number of confident pseudo-labelled pool images take
the generated images' place (does the generator add anything beyond its pseudo-labels?).
`dpt.synthetic_weight` scales the added images' loss (issue 21's lever: at 300 per class
they are 97% of a 10-shot labelled batch, and the real labelled images the rest).

The labeller is trained once per (data, training settings, `dpt.labeller_seed`) and its
pseudo-labels cached beside the generators, so runs of several classifier seeds that fix
the labeller seed share one labeller, one generator and one set of images.
"""

from __future__ import annotations

import hashlib
import html
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..choices import Operator
from ..classify import evaluate, fit_classifier
from ..classify.ssl import pseudo_label
from ..config import register_section
from ..data import ImageDataset, concat
from ..errors import SynthaugError
from ..generate.cache import check_generator
from ..generate.stage import generate_stage, generator_stage
from ..plan import conditioned_plan
from ..report import pct
from ..select.metrics import diversity_ratio, memorization_ratio
from ..utils.io import atomic_save_tensors, atomic_write_json, exclusive
from ..utils.keys import key_dict
from ..utils.paths import check_folder
from .registry import RecipeResult, register_recipe, train_and_evaluate
from .synaug import replay


@register_section("dpt")
@dataclass
class DptSection:
    """DPT: the semi-supervised classifier labels the pool, a generator learns from the
    pseudo-labelled pool, and its images join the labelled set."""

    IMAGE_KEYS = ("per_class", "confidence", "labeller_seed", "mode", "embed_dim", "dropout", "replay")

    per_class: int = 500  # images generated per class (the paper: about 1,000)
    # pool images whose pseudo-label is less confident than this train the generator under the null class
    confidence: float = 0.5
    # the seed of the semi-supervised classifier that labels the pool (default: the run's seed); fixed, the
    # runs of several seeds share one labeller, generator and image set
    labeller_seed: int | None = None
    # label-only (the paper), or an AugCond operator on pseudo-labelled images of the class
    mode: Operator = "label-only"
    embed_dim: int = 32  # the generator's image condition (so every mode shares one generator)
    dropout: float = 0.3  # rate of the Dropout operators
    store_dir: str | None = None  # where generated images go (default: <run folder>/synthetic)
    # the control: per_class images per class drawn from the labelled and the confident pseudo-labelled pool
    # images (the generator's own training images) instead of generated ones
    replay: bool = False
    synthetic_weight: float = 1.0  # each added image's loss weight in step 4 (real labelled images: 1)

    def __post_init__(self):
        if not 0 < self.synthetic_weight < float("inf"):
            raise SynthaugError(f"dpt.synthetic_weight must be a finite number > 0, got {self.synthetic_weight}")
        if self.per_class < 1 or self.embed_dim < 1 or not 0 <= self.confidence <= 1 or not 0 <= self.dropout < 1:
            raise SynthaugError("dpt.per_class and dpt.embed_dim must be >= 1, dpt.confidence in [0, 1] and "
                                "dpt.dropout in [0, 1)")
        check_folder(self.store_dir, "dpt.store_dir")


def ssl_config(config):
    """The run's training settings, semi-supervised (FixMatch unless `train.ssl` names another)."""
    return replace(config.train, ssl="fixmatch") if config.train.ssl == "none" else config.train


def labeller_config(config):
    """The labeller's training settings: the run's, semi-supervised, without a head re-fit, and
    with `weight_norm` off (it trains on real images only, unweighted, so the option does nothing
    there and would only split its cache)."""
    return replace(ssl_config(config), refit_head=False, weight_norm=False)


def check(task, config):
    if task.unlabeled is None or len(task.unlabeled) == 0:
        raise SynthaugError("dpt pseudo-labels an unlabelled pool and this split has none: use split.kind=few-shot "
                            "with split.unlabeled_pool=true")
    if config.dpt.replay and config.validate.enabled:
        raise SynthaugError("dpt.replay generates no image, so validate.enabled would do nothing: set "
                            "validate.enabled=false, or dpt.replay=false")
    if not config.dpt.replay:  # the control trains and loads no generator
        check_generator(config.generator, task.train, image_embed_dim=config.dpt.embed_dim)


def labeller_key(task, config) -> str:
    seed = config.seed if config.dpt.labeller_seed is None else config.dpt.labeller_seed
    cfg = key_dict(labeller_config(config))
    payload = {"train": task.train.fingerprint(), "pool": task.unlabeled.fingerprint(), "config": cfg, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pseudo_labels(task, config, cache_root: Path, workdir: Path, *, progress: bool = False) -> dict:
    """Step 1: the labeller's pseudo-label and confidence for every pool image, and its test
    accuracy; trained now (resumably) or read from `cache_root/pseudo-labels/<key>/`."""
    key = labeller_key(task, config)
    folder = cache_root / "pseudo-labels" / key
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(folder.parent / f"{key}.lock"):  # cells side by side that share a labeller train it once
        return _pseudo_labels(task, config, folder, workdir, progress=progress)


def _pseudo_labels(task, config, folder: Path, workdir: Path, *, progress: bool = False) -> dict:
    from safetensors.torch import load_file

    if (folder / "done.json").exists():
        try:
            tensors = load_file(folder / "labels.safetensors")
            return {**json.loads((folder / "done.json").read_text()), **tensors, "cached": True}
        except Exception as e:  # damaged: computed again, and the files replaced whole
            print(f"pseudo-labels in '{folder}' cannot be read ({type(e).__name__}): labelling again", file=sys.stderr)
    seed = config.seed if config.dpt.labeller_seed is None else config.dpt.labeller_seed
    result = fit_classifier(task.train, labeller_config(config), seed=seed,
                            unlabeled=task.unlabeled, checkpoint_dir=workdir / "labeller-checkpoint", progress=progress)
    labels, confidence = pseudo_label(result.model, task.unlabeled.images)
    accuracy = evaluate(result.model, task.test)["accuracy"]
    folder.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(folder / "classifier")
    atomic_save_tensors(folder / "labels.safetensors", {"labels": labels.contiguous(), "confidence": confidence.contiguous()})
    info = {"seed": seed, "test_accuracy": accuracy, "seconds": result.seconds}
    atomic_write_json(folder / "done.json", info)  # last: a folder without it is redone
    return {**info, "labels": labels, "confidence": confidence, "cached": False}


def labelled_pool(task, labels: torch.Tensor, confidence: torch.Tensor, threshold: float
                  ) -> tuple[ImageDataset, ImageDataset | None]:
    """The labelled images with the pool's confident part under its pseudo-labels (the
    generator's labelled data and the conditioning images), and the rest of the pool (the
    generator's null class; None when empty)."""
    confident = confidence >= threshold
    pool = task.unlabeled.subset(torch.nonzero(confident).flatten())
    pool.labels = labels[confident].clone()
    rest = task.unlabeled.subset(torch.nonzero(~confident).flatten()) if int((~confident).sum()) else None
    return concat(task.train, pool), rest


def report(result: RecipeResult, real: ImageDataset) -> str:
    d = result.extra["dpt"]
    counts = ", ".join(f"{html.escape(c)} {n}" for c, n in zip(real.classes, d["pseudo_counts"]))
    weight = d.get("synthetic_weight", 1.0)
    out = [f"<h2>DPT: the pseudo-labelled pool</h2><p>The semi-supervised labeller (seed {d['labeller_seed']}, test "
           f"accuracy {pct(d['labeller_test_accuracy'])}%) labelled {d['pool']} pool images: {d['confident']} at "
           f"confidence ≥ {d['confidence']} trained the generator under their pseudo-labels ({counts}), "
           f"{d['pool'] - d['confident']} under the null class. {d['per_class']} images per class were generated "
           f"({'replayed from the confident pool: the control' if d['replay'] else html.escape(d['mode'])}) and "
           f"joined the labelled set{'' if weight == 1 else f', each at loss weight {weight:g}'}.</p>"]
    return "".join(out)


@register_recipe("dpt", "DPT: the semi-supervised classifier pseudo-labels the pool, a generator trained on the "
                 "pseudo-labelled pool adds labelled images, the classifier retrains semi-supervised", check=check,
                 report=report, shared_store="dpt", ssl=True)
def dpt(task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    check(task, config)
    opts, seconds = config.dpt, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-"))
    cache_root = Path(config.generator.cache_dir or Path(config.output_dir) / "generators")

    # 1. the semi-supervised labeller and its pseudo-labels
    t0 = time.perf_counter()
    labelled = pseudo_labels(task, config, cache_root, workdir, progress=progress)
    seconds["pseudo_label"] = time.perf_counter() - t0
    conditions, rest = labelled_pool(task, labelled["labels"], labelled["confidence"], opts.confidence)

    plan = conditioned_plan(conditions, per_class=opts.per_class, mode=opts.mode, seed=config.generator.plan_seed,
                            dropout=opts.dropout, recipe="dpt")
    if opts.replay:  # the control: the plan's counts filled with confident pseudo-labelled pool images
        synthetic, generator_info = replay(conditions, plan), {"source": "none: pseudo-labelled pool replay"}
        synthetic_info = {"images": len(synthetic), "generated_now": 0, "replay": True}
    else:
        # 2. the generator on the pseudo-labelled pool (image-conditioned, so every mode shares it); every
        # image drawn equally often: the null class's share of a batch is the low-confidence share of the data
        share = round(len(rest) / (len(rest) + len(conditions)), 4) if rest is not None else 0.0
        generator, generator_info = generator_stage(conditions, replace(config, generator=replace(
            config.generator, unlabeled_share=share)), progress=progress, unlabeled=rest, image_embed_dim=opts.embed_dim)
        seconds["generator"] = generator_info.pop("seconds")
        # 3. per_class images per class, each conditioned on the label (and on pseudo-labelled images)
        store_dir = Path(opts.store_dir) if opts.store_dir else workdir / "synthetic"
        # one folder per generator: runs whose labellers differ never mix their images
        synthetic, synthetic_info = generate_stage(plan, generator, config, store_dir / generator.fingerprint()[:16],
                                                   conditions, progress=progress)
        seconds["generate"] = synthetic_info.pop("seconds")

    # 4. the semi-supervised classifier again, the generated images labelled data
    data = concat(task.train, synthetic)
    weights = torch.cat([torch.ones(len(task.train)), torch.full((len(synthetic),), opts.synthetic_weight)])
    result, metrics, spent = train_and_evaluate(data, task, replace(config, train=ssl_config(config)), workdir=workdir,
                                                progress=progress, sample_weights=weights)
    seconds.update(spent)
    heldout = task.val if task.val is not None else task.test
    pseudo_counts = torch.bincount(conditions.labels[len(task.train):], minlength=task.train.num_classes).tolist()
    extra = {
        "dpt": {"labeller_seed": labelled["seed"], "labeller_test_accuracy": labelled["test_accuracy"],
                "labeller_cached": labelled["cached"], "pool": len(task.unlabeled),
                "confident": len(conditions) - len(task.train), "confidence": opts.confidence,
                "pseudo_counts": pseudo_counts, "per_class": opts.per_class, "mode": opts.mode, "replay": opts.replay,
                "synthetic_weight": opts.synthetic_weight, "mean_confidence": float(labelled["confidence"].float().mean())},
        "memorization": memorization_ratio(synthetic, task.train, heldout),
        "diversity_ratio": diversity_ratio(synthetic, task.train),
        "generator": generator_info,
        "synthetic": {**synthetic_info, "counts_after": data.class_counts().tolist()},
    }
    return RecipeResult(metrics=metrics, model=result.model, history=result.history, seconds=seconds, extra=extra,
                        synthetic=None if opts.replay else synthetic, replayed=synthetic if opts.replay else None,
                        curve=result.curve, steps=result.steps)
