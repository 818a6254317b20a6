"""In-memory labelled image datasets: uint8 tensors, labels, class names, optional group ids."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

import torch

from ..errors import SynthaugError

UNLABELED = -1


@dataclass
class ImageDataset:
    """Images as a uint8 tensor (N, C, H, W), labels as int64 (N,), `UNLABELED` (-1) for the
    unlabeled pool. `groups` (int64, N) holds a group id per image (a colour, a sensitive
    attribute) when the problem has groups."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    groups: torch.Tensor | None = None
    group_names: list[str] | None = None
    name: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {self.images.shape[1]}")
        check_class_names(self.classes)
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
        if len(self.labels) and int(self.labels.max()) >= len(self.classes):
            raise ValueError(f"label {int(self.labels.max())} out of range for {len(self.classes)} classes")
        if self.groups is not None:
            self.groups = torch.as_tensor(self.groups, dtype=torch.int64)
            if self.groups.shape != self.labels.shape:
                raise ValueError("groups must have one id per image")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def fingerprint(self) -> str:
        """A hash of the images, labels, groups and class names: names this exact data."""
        h = hashlib.sha256()
        for t in (self.images, self.labels, self.groups):
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()

    def image_hashes(self) -> list[str]:
        """A hash of each image's pixels: equal images, equal hashes."""
        return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in self.images]

    def class_counts(self) -> torch.Tensor:
        """Images per class (unlabeled images are not counted)."""
        labelled = self.labels[self.labels >= 0]
        return torch.bincount(labelled, minlength=self.num_classes)

    def cells(self) -> torch.Tensor:
        """Each image's (class, group) cell, numbered class * groups + group (needs groups)."""
        return self.labels * (int(self.groups.max()) + 1) + self.groups

    def subset(self, indices) -> ImageDataset:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return replace(
            self,
            images=self.images[indices],
            labels=self.labels[indices],
            groups=None if self.groups is None else self.groups[indices],
            info=dict(self.info),
        )

    def describe(self) -> dict:
        counts = self.class_counts().tolist()
        out = {
            "images": len(self),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "classes": len(self.classes),
            "class_counts": dict(zip(self.classes, counts)),
        }
        if int((self.labels == UNLABELED).sum()):
            out["unlabeled"] = int((self.labels == UNLABELED).sum())
        if self.groups is not None:
            out["group_names"] = self.group_names
        return out


def check_class_names(classes):
    """Class names are unique, non-empty text (they name folders, plots and reports)."""
    bad = next((c for c in classes if not isinstance(c, str) or not c.strip() or "\0" in c), None)
    if bad is not None or len(set(classes)) != len(classes):
        what = f"class name {bad!r} is empty or not text" if bad is not None else "class names repeat"
        raise SynthaugError(f"{what}: give every class a unique, non-empty name")


def concat(*datasets: ImageDataset) -> ImageDataset:
    """Join datasets with the same classes, channels and size (for example real + synthetic)."""
    first = datasets[0]
    for ds in datasets[1:]:
        if ds.classes != first.classes or ds.images.shape[1:] != first.images.shape[1:]:
            raise ValueError("datasets to join must share classes, channels and image size")
    with_groups = all(ds.groups is not None for ds in datasets)
    return replace(
        first,
        images=torch.cat([ds.images for ds in datasets]),
        labels=torch.cat([ds.labels for ds in datasets]),
        groups=torch.cat([ds.groups for ds in datasets]) if with_groups else None,
        info=dict(first.info),
    )


@dataclass
class LoadedDataset:
    """What `load_dataset` returns: the source's train and test sets."""

    name: str
    train: ImageDataset
    test: ImageDataset
    description: str = ""
    pending: list = field(default_factory=list, repr=False)  # decoded folders not yet written to the cache

    def save_cache(self):
        """Write the decoded folders that `load_dataset(defer_cache=True)` held back."""
        from .sources import save_decoded

        while self.pending:
            save_decoded(*self.pending.pop())

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def describe(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "train": self.train.describe(),
            "test": self.test.describe(),
        }
