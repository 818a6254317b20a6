"""Checks of a synthetic set against the real one (arrays in, numbers out)."""

from __future__ import annotations

import torch

from .data.dataset import ImageDataset


def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """L2 distance (pixel space, [0, 1]) of each query image to its nearest reference image."""
    q = queries.flatten(1).float() / 255
    r = references.flatten(1).float() / 255
    out = [torch.cdist(q[i : i + chunk], r).min(1).values for i in range(0, len(q), chunk)]
    return torch.cat(out) if out else torch.empty(0)


def memorization_ratio(synthetic: ImageDataset, train: ImageDataset, heldout: ImageDataset) -> dict:
    """Per class: median distance of synthetic images to their nearest training image of the
    class, divided by the same for held-out real images. About 1: new images, like fresh
    real ones; well below 1: the generator copies its training images."""
    per_class = {}
    for c, name in enumerate(train.classes):
        syn, ref, held = (ds.images[ds.labels == c] for ds in (synthetic, train, heldout))
        if len(syn) and len(ref) and len(held):
            d_syn = nearest_distances(syn, ref).median()
            d_held = nearest_distances(held, ref).median()
            per_class[name] = float(d_syn / d_held.clamp(min=1e-8))
    values = list(per_class.values())
    return {"per_class": per_class, "min": min(values) if values else None,
            "median": float(torch.tensor(values).median()) if values else None}
