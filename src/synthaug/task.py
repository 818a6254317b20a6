"""The problem a run solves: a split of a dataset into the training set the user has, a
balanced test set, optional validation and unlabeled pool, and the oracle (the full
balanced training set) that bounds what generated data can recover."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SplitSection
from .data import (
    ImageDataset,
    LoadedDataset,
    balanced_validation,
    colored,
    every_colour,
    few_shot,
    long_tail,
)
from .errors import SynthaugError


@dataclass
class Task:
    train: ImageDataset
    test: ImageDataset
    oracle: ImageDataset
    val: ImageDataset | None = None
    unlabeled: ImageDataset | None = None

    def describe(self) -> dict:
        out = {"train": self.train.describe(), "test": {"images": len(self.test)}, "oracle": {"images": len(self.oracle)}}
        if self.val is not None:
            out["val"] = {"images": len(self.val)}
        if self.unlabeled is not None:
            out["unlabeled"] = {"images": len(self.unlabeled)}
        out["split"] = dict(self.train.info)
        return out

    def unseen(self) -> ImageDataset:
        """The oracle's images that neither the training split nor the validation split holds:
        real images of the true distribution that the run has no label for (synaug.unseen, the
        perfect-generator control; a few-shot split's unlabelled pool is among them). Matched by
        content, so the oracle must hold the training images as they are (a long-tailed or
        few-shot split; a coloured split repaints them)."""
        oracle = self.oracle.image_hashes()
        held = set(oracle)
        seen = set()
        for ds in (self.train, self.val):
            if ds is not None:
                mine = ds.image_hashes()
                if not all(d in held for d in mine):
                    raise SynthaugError("synaug.unseen draws the oracle's images that the split left out, and this "
                                        "split's training images are not the oracle's (a coloured split repaints "
                                        "them): use a long-tail or few-shot split, or synaug.unseen=false")
                seen.update(mine)
        keep = [i for i, d in enumerate(oracle) if d not in seen]
        return self.oracle.subset(torch.tensor(keep, dtype=torch.long))


def make_task(data: LoadedDataset, split: SplitSection) -> Task:
    full, test = data.train, data.test
    unlabeled = None
    if split.kind == "colored":
        full = colored(data.train, agreement=None, seed=split.seed)  # oracle: colour independent of class
        train = colored(data.train, agreement=split.agreement, seed=split.seed)
        test = (every_colour(data.test) if split.test_colours == "every"
                else colored(data.test, agreement=None, seed=split.seed + 1))
    elif split.kind == "long-tail":
        train = long_tail(data.train, split.ratio, profile=split.profile, seed=split.seed, n_max=split.n_max)
    elif split.kind == "few-shot":
        train, pool = few_shot(data.train, split.k, seed=split.seed)
        unlabeled = pool if split.unlabeled_pool else None
    else:
        train = data.train
    val = None
    if split.val_per_class:
        train, val = balanced_validation(train, split.val_per_class, seed=split.seed)
    return Task(train=train, test=test, oracle=full, val=val, unlabeled=unlabeled)
