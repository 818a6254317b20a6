"""SYNAuG (seed 004): uniformize the classes with generated data, train on real + synthetic
with domain mixup, then re-fit the classifier's head on a class-balanced subsample of the
REAL data.

1. Count real images per class (or per (class, group) cell); fill every cell below the
   largest with n_max - n_c images (with `fill` below 1, up to n_max^fill x n_c^(1-fill)),
   generated conditioned on its class (and group); by default half of each cell's fill is
   its real images drawn again (`replay_share`).
2. Train on the now uniform real + synthetic set with the usual augmentation, plus Mixup
   between real and synthetic images ("domain mixup") to narrow the domain gap.
3. Freeze the features; re-fit only the last layer on real data, each class (with groups,
   each (class, group) cell) cut to the same count: "uniformly subsampled" real data, which
   a class-balanced cut of colour-biased data would not be.

How the synthetic images are used (issue 21's levers): `synthetic_weight` scales their loss;
`target_per_class` sets the volume (above the largest class it over-fills the head too);
`fill` below 1 fills only that share of the imbalance, in log space, and leaves the rest to the
training (`train.loss=balanced-softmax`, whose prior counts the real and added images, shapes the
features; the head re-fit, on by default, balances the head; with groups Balanced Softmax corrects the
classes only, so the cells' remainder needs `train.group_method`);
`replay: true` is the control that puts real images, drawn again from each cell, in place
of all the generated ones (same counts, same training; the share is then moot): a gain that
replay matches is "more steps on the tail", not the generator's. `replay_share` (default 0.5)
fills that share of each cell with real images drawn again and the rest with generated ones,
so generated images add to replay rather than replace it. `unseen: true` is the perfect-generator control: the
images the run would generate are real images of the class that the split left out (the oracle's others), so it
measures what this use of added images could gain with images as good as real ones. `synthetic_augment` gives the added images their own
augmentation (AdaInf: generated images want a weaker one than real images). `translate` makes that share of
each cell's generated images by translating a real image of another class into the cell's class (Diff-Mix,
`plan.translated_rows`), labelled strength^`translate_gamma` on the class and the rest on the source's; with
`translate_from: own` the real image is one of the cell's own (DA-Fusion's variations), labelled as its class.
`relabel` puts that share of each added image's target on how select's scorer reads it (`scorer_for`: Balanced
Softmax on the real split, whose softmax is the balanced posterior; with groups, cross-entropy on cell-balanced batches)
and the rest on its target: an added image that looks like another class is not taught as its own (knowledge
distillation's soft targets, Hinton et al. 2015; DBG relabels its pushed images so). It applies to every added image;
the scorer trained on the replayed images and reads them almost as their class, so for a control of the same targets
on images it never saw, relabel the unseen control. On a translated image it can leave the source's share above its
class's (the sampler still draws it as its class).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..classify import evaluate, fit_classifier, refit_head
from ..classify.evaluate import predict_logits
from ..config import register_section
from ..data import concat
from ..errors import SynthaugError
from ..generate.cache import check_generator, check_store_made
from ..generate.stage import generator_stage
from ..plan import balance_plan, plan_cells, translated_rows, translation_targets
from ..select.metrics import diversity_ratio, memorization_ratio
from ..select.stage import generated_rows, scorer_for, select_stage, stage_seconds
from ..store import SyntheticStore
from ..utils.paths import check_folder
from .registry import RecipeResult, classifier_inputs, register_recipe


@register_section("synaug")
@dataclass
class SynaugSection:
    """SYNAuG: uniformize with generated images, domain mixup, head re-fit on real data."""

    IMAGE_KEYS = ("target_per_class", "fill", "balance_groups", "translate", "translate_strength", "translate_from")  # the options that
    # change the generated images
    ADDED: ClassVar[dict[str, object]] = {"replay_share": 0.0, "synthetic_augment": "same", "translate": 0.0,
                                          "translate_strength": 0.7, "translate_gamma": 0.8, "fill": 1.0,
                                          "translate_from": "other",
                                          "unseen": False, "relabel": 0.0}  # options added since,
    # at their former values

    target_per_class: int | None = None  # images per class after filling (default: the largest class)
    fill: float = 1.0  # the share of the imbalance filled, in log space: a class of n goes to target^fill x n^(1-fill)
    # (1: uniformize; 0.5: the geometric mean, the rest left to train.loss=balanced-softmax, or with groups to
    # train.group_method)
    balance_groups: bool = True  # with groups: fill every (class, group) cell
    domain_mixup: bool = True
    mix_alpha: float = 0.5
    mix_prob: float = 1.0
    refit_head: bool = True
    refit_per_class: str = "min"  # real images per class for the re-fit: 'min' (smallest class) or a number
    store_dir: str | None = None  # where generated images go (default: <run folder>/synthetic); runs with the
    # same generator and plan can share one store
    synthetic_weight: float = 1.0  # each synthetic image's loss weight (real images: 1)
    replay: bool = False  # the real-replay control: real images drawn again in place of generated ones
    unseen: bool = False  # the perfect-generator control: real images the split left out in place of generated ones
    replay_share: float = 0.5  # the share of each cell's fill drawn again from its real images, the rest generated
    # (0.5: the all-generated fill's accuracy at half the generation; at equal optimiser steps Balanced Softmax ties or
    # beats it, BENCHMARKS.md)
    synthetic_augment: str = "same"  # the added images' augmentation: 'same' (train.augment's) or a spec like it
    translate: float = 0.0  # the share of each cell's generated images translated from a real image (translate_from)
    translate_strength: float | list = 0.7  # their SDEdit strength: a number or [low, high] (Diff-Mix's long tail: 0.7)
    translate_gamma: float = 0.8  # their target: strength^gamma on the class, the rest on the source's (0: the class alone)
    # where the real image comes from: another class (other: Diff-Mix), or the row's own class and group (own: DA-Fusion's
    # variations of a real image, Trabucco et al. 2024; its target is the class alone, so translate_gamma is inert)
    translate_from: str = "other"
    relabel: float = 0.0  # the share of each added image's target on the scorer's reading of it, the rest on its class

    def image_keys(self) -> tuple[str, ...]:
        """`IMAGE_KEYS` less the ones these settings leave inert (a strength or source with nothing translated)."""
        return tuple(k for k in self.IMAGE_KEYS if self.translate or k not in ("translate_strength", "translate_from"))

    def __post_init__(self):
        from ..classify.train import check_augmentation, check_per_class

        check_per_class(self.refit_per_class, "synaug.refit_per_class")
        if self.synthetic_augment != "same":
            check_augmentation(self.synthetic_augment, "synaug.synthetic_augment")
        if self.mix_alpha <= 0 or not 0 <= self.mix_prob <= 1:
            raise SynthaugError("synaug.mix_alpha must be > 0 and synaug.mix_prob in [0, 1]")
        if not 0 < self.synthetic_weight < float("inf"):
            raise SynthaugError(f"synaug.synthetic_weight must be a finite number > 0, got {self.synthetic_weight}")
        if self.replay and self.unseen:
            raise SynthaugError("synaug.replay and synaug.unseen both put real images in place of the generated ones: "
                                "set one of them")
        if not 0 <= self.replay_share <= 1:
            raise SynthaugError(f"synaug.replay_share must be in [0, 1] (0: all generated), got {self.replay_share}")
        if self.target_per_class is not None and self.target_per_class < 1:
            raise SynthaugError("synaug.target_per_class must be >= 1 (or unset: the largest class)")
        if not 0 < self.fill <= 1:
            raise SynthaugError(f"synaug.fill must be in (0, 1] (1: every class filled to the target), got {self.fill}")
        check_folder(self.store_dir, "synaug.store_dir")
        from ..plan import SOURCES, strength_range

        if not 0 <= self.translate <= 1:
            raise SynthaugError(f"synaug.translate must be in [0, 1] (0: no translation), got {self.translate}")
        if not 0 <= self.relabel <= 1:
            raise SynthaugError(f"synaug.relabel must be in [0, 1] (0: each added image's class alone), got {self.relabel}")
        low, _ = strength_range(self.translate_strength, "synaug.translate_strength")
        if not 0 <= self.translate_gamma < float("inf"):
            raise SynthaugError(f"synaug.translate_gamma must be a finite number >= 0, got {self.translate_gamma}")
        if self.translate_from not in SOURCES:
            raise SynthaugError(f"synaug.translate_from must be one of {', '.join(SOURCES)} (another class's real image, "
                                f"or one of the row's own class), got '{self.translate_from}'")
        if self.translate_from == "other" and low ** self.translate_gamma <= 0.5:  # the image is sampled and counted as its class: that must lead its target
            raise SynthaugError(f"synaug.translate_strength {low} gives its class {low ** self.translate_gamma:.2f} of the "
                                "target at synaug.translate_gamma "
                                f"{self.translate_gamma}: raise the strength or lower the gamma (above 0.5 on the class)")


def check(task, config):
    """Fail on an impossible plan or generator before anything is written."""
    by_group = config.synaug.balance_groups and task.train.groups is not None
    to_generate = planned(task.train, config)[1]  # an impossible plan fails here
    if by_group and config.synaug.refit_head and config.synaug.refit_per_class == "all":
        raise SynthaugError("synaug.refit_per_class=all re-fits the head on the real data as it is, where the group "
                            "predicts the class: use 'min' or a number (each (class, group) cell cut to that count)")
    if config.synaug.domain_mixup and config.train.group_method == "dro":
        raise SynthaugError("Group DRO weighs each image's own loss and synaug's domain mixup blends two images' "
                            "losses: set synaug.domain_mixup=false to train SYNAuG's images with Group DRO")
    if config.synaug.translate and (config.synaug.replay or config.synaug.replay_share == 1):
        raise SynthaugError("synaug.translate translates generated images and this run generates none: set "
                            "synaug.replay=false and synaug.replay_share below 1, or synaug.translate=0")
    control = "synaug.replay" if config.synaug.replay else "synaug.unseen" if config.synaug.unseen else None
    if control and (config.select.method != "none" or config.select.boundary):
        option = "select.method" if config.select.method != "none" else "select.boundary"
        raise SynthaugError(f"{control} generates no image, so {option} would do nothing: leave select.method=none "
                            f"and select.boundary=0, or set {control}=false")
    if config.validate.enabled and (control or config.synaug.replay_share == 1):
        cause, fix = (control, f"{control}=false") if control else ("synaug.replay_share=1", "synaug.replay_share below 1")
        raise SynthaugError(f"{cause} generates no image, so validate.enabled would do nothing: set validate.enabled=false, "
                            f"or {fix}")
    if config.synaug.unseen:
        if config.synaug.translate:
            raise SynthaugError("synaug.translate translates generated images and synaug.unseen generates none: set "
                                "synaug.translate=0 or synaug.unseen=false")
        draw_unseen(task.unseen(), to_generate, seed=config.generator.plan_seed)
    elif not config.synaug.replay and config.synaug.replay_share < 1:
        check_generator(config.generator, task.train, groups=by_group)
        check_store_made(config.synaug.store_dir, task.train.classes, generated_rows(to_generate, config), config.generator,
                         config.train.device)


def planned(real, config) -> tuple[list[dict], list[dict]]:
    """The plan's rows to fill with real images drawn again and the rows to generate (a share of
    them translated from another class's image, with `translate`)."""
    opts = config.synaug
    plan = balance_plan(real, target_per_class=opts.target_per_class, by_group=opts.balance_groups and real.groups is not None,
                        seed=config.generator.plan_seed, fill=opts.fill)
    to_replay, to_generate = (plan, []) if opts.replay else split_replay(plan, opts.replay_share, real)
    if opts.translate:
        to_generate = translated_rows(to_generate, real, share=opts.translate, strength=opts.translate_strength,
                                      seed=config.generator.plan_seed, source=opts.translate_from)
    return to_replay, to_generate


def split_replay(plan: list[dict], share: float, real=None) -> tuple[list[dict], list[dict]]:
    """The plan's rows to fill with real images drawn again and the rows to generate: in each
    (class, group) cell the first round(share x its rows) rows are replayed, so every cell gets
    the same mix and the generated rows keep their ids (a store filled for the whole plan serves).
    A cell with no real image of its own in `real` is generated in full: drawing it again would
    copy another group's images."""
    cells = plan_cells(plan)
    if real is not None and real.groups is not None:
        present = set(zip(real.labels.tolist(), real.groups.tolist()))
        cells = {cell: rows for cell, rows in cells.items() if cell[1] is None or cell in present}
    replayed = {row["id"] for rows in cells.values() for row in rows[:round(share * len(rows))]}
    return [r for r in plan if r["id"] in replayed], [r for r in plan if r["id"] not in replayed]


def cell_members(ds, label: int, group) -> torch.Tensor:
    """The indices of `ds`'s images of class `label` and, where it has any, of `group`; else of the class."""
    members = ds.labels == label
    if group is not None and ds.groups is not None and bool((members & (ds.groups == group)).any()):
        members &= ds.groups == group
    return members.nonzero().flatten()


def replay(real, plan: list[dict]):
    """The real-replay control: for each plan row, a real image of the row's class (and group)
    drawn with the row's own seed, so the control adds exactly the plan's counts. A (class,
    group) cell with no real image at all is filled from its class: real data has nothing closer."""
    picks = []
    for row in plan:
        members = cell_members(real, row["label"], row.get("group"))
        g = torch.Generator().manual_seed(int(row["seed"]))
        picks.append(int(members[torch.randint(len(members), (1,), generator=g)]))
    return real.subset(torch.tensor(picks, dtype=torch.long))


def relabelled(targets: torch.Tensor, added, real, config, store_dir: Path, *, parts: dict[str, int],
               progress: bool = False) -> tuple[torch.Tensor, dict]:
    """`targets` of the `added` images with `synaug.relabel` of each moved onto the scorer's
    reading of the image (its softmax), and how the scorer read each of `parts` (`{kind: count}`,
    in `added`'s order): the share it reads as their class and its mean probability of it."""
    SyntheticStore(store_dir, real.classes).claim()  # the scorer is kept in the store: one even where nothing is generated
    scorer = scorer_for(real, config, store_dir / "scorers", progress=progress)
    reading = predict_logits(scorer, added.images).float().softmax(1).cpu()
    share = config.synaug.relabel
    on_class = reading[torch.arange(len(added)), added.labels]
    agrees = reading.argmax(1) == added.labels
    info, start = {"relabel": share}, 0
    for kind, count in parts.items():
        if count:
            part = slice(start, start + count)
            info[kind] = {"read_as_class": float(agrees[part].float().mean()),
                          "class_probability": float(on_class[part].mean())}
            start += count
    return (1 - share) * targets + share * reading, info


def draw_unseen(pool, plan: list[dict], *, seed: int):
    """The perfect-generator control: for each plan row, a real image of its class (and group)
    from `pool`, the images the split left out (`Task.unseen`); a cell whose group the pool lacks
    draws from its class. Each cell's rows take, in plan order, a permutation of its pool images
    seeded by `seed` and the cell, so there are no repeats while the pool lasts (then it starts
    over; `info["distinct"]` counts the images drawn) and a partial fill's images are the full fill's first."""
    picks, taken = [], {}
    for row in plan:
        cell = (row["label"], row.get("group"))
        if cell not in taken:
            members = cell_members(pool, *cell)
            if not len(members):
                raise SynthaugError(f"synaug.unseen: class '{pool.classes[row['label']]}' needs images and the oracle "
                                    "holds none that the split left out: set synaug.unseen=false")
            g = torch.Generator().manual_seed(seed * 1_000_003 + row["label"] * 1_009 + (cell[1] or 0))  # one per cell
            taken[cell] = [members[torch.randperm(len(members), generator=g)], 0]
        order, k = taken[cell]
        picks.append(int(order[k % len(order)]))
        taken[cell][1] = k + 1
    drawn = pool.subset(torch.tensor(picks, dtype=torch.long))
    drawn.info["distinct"] = len(set(picks))
    return drawn


@register_recipe("synaug", "SYNAuG: uniformize classes (or groups) with generated images, domain mixup, head re-fit on real data",
                 check=check, shared_store="synaug", ssl=True, selects=True)
def synaug(task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    opts, seconds = config.synaug, {}
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="synthaug-"))
    store_dir = Path(opts.store_dir) if opts.store_dir else workdir / "synthetic"
    real = task.train
    by_group = opts.balance_groups and real.groups is not None

    # 1. generator (trained on the real training split, or cached / given), plan, generate
    to_replay, to_generate = planned(real, config)
    replayed, generated, targets = replay(real, to_replay), None, None  # real images drawn again (the control, or the share)
    unseen = None
    # the perfect-generator control: real images the run never sees in place of generated ones (with nothing
    # to generate, replay_share 1, the run is real replay)
    if opts.unseen and to_generate:
        unseen = draw_unseen(task.unseen(), to_generate, seed=config.generator.plan_seed)
        generator_info = {"source": "none: real images the split left out"}
        synthetic_info = {"images": 0, "generated_now": 0, "replay": False, "replayed": len(replayed),
                          "unseen": len(unseen), "unseen_distinct": unseen.info["distinct"]}
    elif not to_generate:  # the control (the plan's counts filled with real images drawn again), or a plan with
        # nothing to generate (balanced data, a small fill): no generator
        generator_info = {"source": "none: real replay" if to_replay else "none: nothing to add"}
        synthetic_info = {"images": len(replayed), "generated_now": 0, "replay": bool(to_replay)}
    else:
        generator, generator_info = generator_stage(real, config, progress=progress, unlabeled=task.unlabeled)
        seconds["generator"] = generator_info.pop("seconds")
        if by_group and generator.config.num_groups == 0:
            raise SynthaugError("the generator is not conditioned on groups: train one on this split or set "
                                "synaug.balance_groups=false")
        generated, synthetic_info = select_stage(to_generate, generator, config, store_dir, real, progress=progress)
        seconds.update(stage_seconds(synthetic_info))
        synthetic_info["replayed"] = len(replayed)
        if opts.translate and len(generated):  # each generated image's target: its class, less a translation's source share
            targets = translation_targets(generated.info["rows"], real, opts.translate_gamma)
            translated = torch.tensor([r.get("source") is not None for r in generated.info["rows"]])
            synthetic_info["translated"] = int(translated.sum())
            on_class = targets[torch.arange(len(generated)), generated.labels][translated]
            synthetic_info["translated_target"] = float(on_class.mean()) if len(on_class) else None
    added = [d for d in (replayed, unseen, generated) if d is not None and len(d)]
    added = concat(*added) if added else replayed  # every image trained on besides the real set, in the plan's counts

    # 2. train on real + added, with mixup between a real and an added image
    data = concat(real, added) if len(added) else real
    domains = torch.cat([torch.zeros(len(real)), torch.ones(len(added))]).long()
    weights = torch.cat([torch.ones(len(real)), torch.full((len(added),), opts.synthetic_weight)])
    soft = None
    if targets is not None or (opts.relabel and len(added)):  # else every image's class alone
        soft = F.one_hot(data.labels, real.num_classes).float()
        if targets is not None:  # the translated images' (generated come last)
            soft[len(data) - len(targets):] = targets
        if opts.relabel and len(added):
            t0 = time.perf_counter()
            parts = {kind: len(d) if d is not None else 0
                     for kind, d in (("replayed", replayed), ("unseen", unseen), ("generated", generated))}
            soft[len(real):], synthetic_info["relabel"] = relabelled(soft[len(real):], added, real, config, store_dir,
                                                                     parts=parts, progress=progress)
            seconds["relabel"] = time.perf_counter() - t0
    train_cfg = config.train
    if opts.domain_mixup:
        train_cfg = replace(train_cfg, mix="domain-mixup", mix_alpha=opts.mix_alpha, mix_prob=opts.mix_prob)
    result = fit_classifier(data, replace(train_cfg, refit_head=False), seed=config.seed, domains=domains,
                            sample_weights=weights, soft_targets=soft, checkpoint_dir=workdir / "checkpoint", progress=progress,
                            synthetic_augment=None if opts.synthetic_augment == "same" else opts.synthetic_augment,
                            **classifier_inputs(task, config))
    seconds["train"] = result.seconds
    model = result.model

    # 3. re-fit the head on a class-balanced (with groups: cell-balanced) subsample of the real data
    if opts.refit_head:
        t0 = time.perf_counter()
        refit_head(model, real, per_class=opts.refit_per_class, epochs=config.train.refit_epochs,
                   lr=config.train.refit_lr, seed=config.seed, by_group=by_group)
        seconds["refit_head"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metrics = evaluate(model, task.test, train_counts=real.class_counts(), many_threshold=config.eval.many_threshold,
                       few_threshold=config.eval.few_threshold)
    seconds["evaluate"] = time.perf_counter() - t0
    # memorisation check: are synthetic images as far from the training images as fresh real ones?
    heldout = task.val if task.val is not None else task.test
    generated = generated if generated is not None and len(generated) else None
    real_added = [d for d in (replayed, unseen) if d is not None and len(d)]  # the report's real images added
    replayed = concat(*real_added) if real_added else None
    extra = {
        "memorization": memorization_ratio(generated, real, heldout) if generated is not None else None,
        "diversity_ratio": diversity_ratio(generated, real) if generated is not None else None,
        "generator": generator_info,
        "synthetic": {**synthetic_info, "counts_after": data.class_counts().tolist()},
    }
    return RecipeResult(metrics=metrics, model=model, history=result.history, seconds=seconds, extra=extra,
                        steps=result.steps, synthetic=generated, replayed=replayed, curve=result.curve)
