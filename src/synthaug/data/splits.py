"""Splits that define the problem: long-tailed, few-shot (+ unlabeled pool), coloured
(group imbalance / spurious correlation), and a small class-balanced validation split.

Every split is a pure function of (dataset, parameters, seed)."""

from __future__ import annotations

import math

import torch

from ..errors import SynthaugError
from .dataset import UNLABELED, ImageDataset

# Colours of the coloured split: (name, RGB in [0, 1]); class c's "spurious" colour is COLOURS[c].
COLOURS = [
    ("red", (1.0, 0.1, 0.1)), ("green", (0.1, 1.0, 0.1)), ("blue", (0.2, 0.3, 1.0)), ("yellow", (1.0, 1.0, 0.1)),
    ("magenta", (1.0, 0.1, 1.0)), ("cyan", (0.1, 1.0, 1.0)), ("orange", (1.0, 0.55, 0.0)), ("purple", (0.55, 0.2, 1.0)),
    ("white", (1.0, 1.0, 1.0)), ("pink", (1.0, 0.6, 0.7)),
]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def long_tail_counts(n_max: int, num_classes: int, ratio: float, profile: str = "exp", minority_fraction: float = 0.5) -> list[int]:
    """Images per class, head first. `exp`: n_i = n_max * ratio^(-i/(C-1)) (Cao et al. 2019);
    `step`: the last `minority_fraction` of the classes get n_max / ratio."""
    if ratio < 1:
        raise SynthaugError(f"imbalance ratio must be >= 1, got {ratio}: use e.g. ratio=100 (head/tail size)")
    if profile == "exp":
        return [max(1, int(n_max * ratio ** (-i / max(num_classes - 1, 1)))) for i in range(num_classes)]
    if profile == "step":
        n_minority = int(num_classes * minority_fraction)
        return [n_max] * (num_classes - n_minority) + [max(1, int(n_max / ratio))] * n_minority
    raise SynthaugError(f"unknown long-tail profile '{profile}': use 'exp' or 'step'")


def long_tail(ds: ImageDataset, ratio: float, *, profile: str = "exp", seed: int = 0, n_max: int | None = None,
              minority_fraction: float = 0.5) -> ImageDataset:
    """A long-tailed subset: class i (in class order) keeps `long_tail_counts(...)[i]` images,
    drawn at random with `seed`. `n_max` defaults to the smallest class's size, so every class
    can supply its quota."""
    counts = ds.class_counts()
    n_max = int(counts.min()) if n_max is None else int(n_max)
    if n_max > int(counts.min()):
        small = ds.classes[int(counts.argmin())]
        raise SynthaugError(f"n_max={n_max} exceeds class '{small}' ({int(counts.min())} images): lower n_max")
    quota = long_tail_counts(n_max, ds.num_classes, ratio, profile, minority_fraction)
    g = _generator(seed)
    keep = []
    for c, n in enumerate(quota):
        idx = torch.nonzero(ds.labels == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    out = ds.subset(torch.cat(keep).sort().values)
    out.info.update(split="long-tail", profile=profile, ratio=ratio, seed=seed)
    return out


def few_shot(ds: ImageDataset, k: int, *, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """`k` labelled images per class, and the rest as an unlabeled pool (labels set to -1)."""
    counts = ds.class_counts()
    if k < 1:
        raise SynthaugError(f"few-shot k must be >= 1, got {k}")
    if k > int(counts.min()):
        small = ds.classes[int(counts.argmin())]
        raise SynthaugError(f"k={k} is larger than class '{small}' ({int(counts.min())} images): lower k")
    g = _generator(seed)
    chosen = torch.zeros(len(ds), dtype=torch.bool)
    for c in range(ds.num_classes):
        idx = torch.nonzero(ds.labels == c).flatten()
        chosen[idx[torch.randperm(len(idx), generator=g)[:k]]] = True
    labelled = ds.subset(torch.nonzero(chosen).flatten())
    labelled.info.update(split="few-shot", k=k, seed=seed)
    pool = ds.subset(torch.nonzero(~chosen).flatten())
    pool.labels = torch.full_like(pool.labels, UNLABELED)
    pool.info.update(split="unlabeled-pool", seed=seed)
    return labelled, pool


def colored(ds: ImageDataset, *, agreement: float | None, seed: int = 0) -> ImageDataset:
    """Colour each (grayscale) image. With probability `agreement` the colour is its class's
    own colour, otherwise one of the other colours at random; `agreement=None` draws every
    colour uniformly (colour carries no information). The colour is the group id, so
    (class, colour) cells define the groups for worst-group accuracy."""
    _check_colours(ds)
    if agreement is not None and not 0.0 <= agreement <= 1.0:
        raise SynthaugError(f"colour agreement must be in [0, 1], got {agreement}")
    n_colours = ds.num_classes
    g = _generator(seed)
    n = len(ds)
    if agreement is None:
        colour = torch.randint(n_colours, (n,), generator=g)
    else:
        other = (ds.labels + 1 + torch.randint(n_colours - 1, (n,), generator=g)) % n_colours
        keep = torch.rand(n, generator=g) < agreement
        colour = torch.where(keep, ds.labels.clamp(min=0), other)
    out = _paint(ds, torch.arange(n), colour)
    out.info.update(split="colored", agreement=agreement, seed=seed)
    return out


def every_colour(ds: ImageDataset) -> ImageDataset:
    """Each image once in every colour (colour-major): the coloured test set without the
    draw of one colour per image, so a (class, colour) cell holds all of the class's images,
    not the tenth that drew that colour (the exact mean over the random colouring)."""
    _check_colours(ds)
    n, n_colours = len(ds), ds.num_classes
    out = _paint(ds, torch.arange(n).repeat(n_colours), torch.arange(n_colours).repeat_interleave(n))
    out.info.update(split="colored", agreement=None, every_colour=True)
    return out


def _check_colours(ds: ImageDataset):
    if ds.num_classes > len(COLOURS):
        raise SynthaugError(f"the coloured split supports up to {len(COLOURS)} classes, dataset has {ds.num_classes}")


def _paint(ds: ImageDataset, index: torch.Tensor, colour: torch.Tensor) -> ImageDataset:
    """Images `index` of `ds` (grayscale) painted in `colour` (one per image), the colour as group."""
    out = ds.subset(index)
    gray = out.images.float().mean(1, keepdim=True)
    rgb = torch.tensor([COLOURS[i][1] for i in range(ds.num_classes)])[colour]  # (N, 3)
    out.images = (gray * rgb[:, :, None, None]).round().clamp(0, 255).to(torch.uint8)
    out.groups = colour
    out.group_names = [COLOURS[i][0] for i in range(ds.num_classes)]
    return out


def balanced_validation(ds: ImageDataset, per_class: int, *, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Carve `per_class` images of every class out of `ds`: returns (rest, validation)."""
    counts = ds.class_counts()
    if per_class >= int(counts.min()):
        small = ds.classes[int(counts.argmin())]
        raise SynthaugError(
            f"val_per_class={per_class} would leave class '{small}' ({int(counts.min())} images) without "
            "training images: lower val_per_class"
        )
    g = _generator(seed + 7919)
    val = torch.zeros(len(ds), dtype=torch.bool)
    for c in range(ds.num_classes):
        idx = torch.nonzero(ds.labels == c).flatten()
        val[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = True
    rest, held = ds.subset(torch.nonzero(~val).flatten()), ds.subset(torch.nonzero(val).flatten())
    held.info.update(split="validation", per_class=per_class)
    return rest, held


def class_balanced_subsample(ds: ImageDataset, per_class: int | None = None, *, seed: int = 0,
                             by_group: bool = False) -> ImageDataset:
    """Every class cut to the same count (the smallest class's size by default); with
    `by_group`, every non-empty (class, group) cell cut to the same count instead, so a
    colour that agrees with the label in most images no longer does."""
    units = ds.cells() if by_group else ds.labels
    counts = torch.bincount(units)
    present = counts[counts > 0]
    n = int(present.min()) if per_class is None else min(int(per_class), int(present.min()))
    g = _generator(seed)
    keep = []
    for unit in torch.nonzero(counts).flatten().tolist():
        idx = torch.nonzero(units == unit).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return ds.subset(torch.cat(keep).sort().values)


def shot_thresholds(n_max: int, many: float | None = None, few: float | None = None) -> tuple[float, float]:
    """Many-shot (> many) and few-shot (< few) thresholds. The field's convention (>100, <20
    images, set on CIFAR-100-LT whose head has 500) scales here to 20% and 4% of the largest
    class, so small datasets get meaningful groups. Explicit numbers override."""
    many = 0.2 * n_max if many is None else many
    few = 0.04 * n_max if few is None else few
    return float(many), float(math.ceil(few) if few > 1 else few)
