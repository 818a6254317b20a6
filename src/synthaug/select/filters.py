"""Data selection (the survey's "data selection" module): which synthetic samples to keep.
Arrays in, per-sample scores or boolean masks out, so each filter works on its own.

A *selector* (registered with `@register_selector(name)`) gets the candidates and how many
to keep per class, and returns (mask, scores). The built-in ones:
- `random`: the control at equal size.
- `confidence`: top-k per class by the scorer's probability of the intended label (Wang et
  al. 2023 keep the top samples of an EDM this way).
- `agreement`: drop samples whose predicted class disagrees with the intended one or whose
  confidence is below a threshold (the survey's CLIP-style filter, with the task's own
  scorer), then keep a random k per class among those left.
- `realism`: top-k per class by Kynkaanniemi et al.'s realism score against the real
  images of the class, in feature space.
- `cluster`: k-means per class in feature space, k kept across every cluster (in
  proportion to its size, nearest its centre first): diversity over fidelity.
- `diffult`: DiffuLT's filter (Shao et al. 2024): the class centre of the real images'
  features, d_f the largest real distance to it; candidates farther than 2 d_f are out of
  distribution and dropped, k kept at random among the rest. `diffult-band` keeps only the
  "approximately in distribution" band (d_f, 2 d_f], the images DiffuLT found most useful.
- `prototype`: cleaning by prototypes: a candidate nearer another class's real prototype
  (mean feature) than its own is dropped, k kept at random among the rest.
- `hard`: the hard, right examples: among the candidates the scorer reads as their class, the k
  per class it is least sure of (generated images are easier for a classifier than fresh real
  ones, and what a classifier learns from are the hard ones it still gets right).
- `novel`: what the real images do not already show: among the candidates the scorer reads as
  their class, greedy k-centre per class (Sener & Savarese 2018's core set) started from the
  class's real images, so each kept image is the one farthest from every real image and every
  image kept before it (a near-copy of a real tail image adds nothing that replaying it does not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..utils.registry import Registry
from .metrics import realism_scores


def confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The probability each sample's scorer gives its intended label."""
    return probs[torch.arange(len(labels)), labels]


def agreement(probs: torch.Tensor, labels: torch.Tensor, *, threshold: float = 0.5) -> torch.Tensor:
    """Mask: the predicted class is the intended one, with at least `threshold` confidence."""
    return (probs.argmax(1) == labels) & (confidence(probs, labels) >= threshold)


def top_k_per_class(scores: torch.Tensor, labels: torch.Tensor, keep: dict[int, int],
                    allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the `keep[c]` highest-scoring samples of each class c (among `allowed`)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c, k in keep.items():
        members = torch.nonzero((labels == c) & (allowed if allowed is not None else True)).flatten()
        order = torch.argsort(scores[members], descending=True, stable=True)
        mask[members[order[:k]]] = True
    return mask


def cluster_representatives(features: torch.Tensor, labels: torch.Tensor, keep: dict[int, int], *,
                            clusters: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: k-means with `clusters` centres (fewer for small classes), then `keep[c]`
    samples spread over the clusters in proportion to their sizes (every cluster gets one
    while the budget lasts), each cluster's samples nearest its centre first. Returns the
    mask and each sample's distance to its centre, negated (higher: more typical)."""
    from sklearn.cluster import KMeans

    mask = torch.zeros(len(labels), dtype=torch.bool)
    scores = torch.zeros(len(labels))
    for c, k in keep.items():
        members = torch.nonzero(labels == c).flatten()
        if k <= 0 or len(members) == 0:
            continue
        x = features[members].double().numpy()
        n_clusters = max(1, min(clusters, k, len(members)))
        km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(x)
        distance = np.linalg.norm(x - km.cluster_centers_[km.labels_], axis=1)
        scores[members] = torch.as_tensor(-distance, dtype=torch.float32)
        sizes = np.bincount(km.labels_, minlength=n_clusters)
        quota = _spread(k, sizes)
        for j in range(n_clusters):
            in_cluster = np.flatnonzero(km.labels_ == j)
            chosen = in_cluster[np.argsort(distance[in_cluster], kind="stable")[: quota[j]]]
            mask[members[torch.as_tensor(chosen, dtype=torch.long)]] = True
    return mask, scores


def _spread(k: int, sizes: np.ndarray) -> np.ndarray:
    """Split a budget of k over clusters: one each while it lasts, the rest in proportion
    to size (largest remainders), never more than a cluster holds."""
    quota = np.zeros(len(sizes), dtype=int)
    for j in np.argsort(-sizes, kind="stable")[: min(k, len(sizes))]:
        quota[j] = min(1, sizes[j])  # k-means can leave a cluster empty
    while quota.sum() < min(k, sizes.sum()):
        room = sizes - quota
        share = (k * sizes / sizes.sum()) - quota
        share[room <= 0] = -np.inf
        quota[int(np.argmax(share))] += 1
    return quota


@dataclass
class Candidates:
    """What a selector sees: the synthetic candidates, the scorer's view of them, and the real
    images' features for the feature-space selectors (computed only when a selector needs them)."""

    labels: torch.Tensor  # (N,) intended class
    probs: Callable[[], torch.Tensor]  # () -> (N, C) the scorer's class probabilities
    features: Callable[[], torch.Tensor]  # () -> (N, D)
    real_features: Callable[[], torch.Tensor]  # () -> (R, D)
    real_labels: torch.Tensor  # (R,)


SELECTORS: Registry[Callable] = Registry("selection method")


def register_selector(name: str):
    """Register `fn(candidates, keep, *, threshold, k, clusters, seed) -> (mask, scores)`."""
    return SELECTORS.register(name)


def _random_scores(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


@register_selector("random")
def select_random(c: Candidates, keep, *, seed=0, **_):
    scores = _random_scores(len(c.labels), seed)
    return top_k_per_class(scores, c.labels, keep), scores


@register_selector("confidence")
def select_confidence(c: Candidates, keep, **_):
    scores = confidence(c.probs(), c.labels)
    return top_k_per_class(scores, c.labels, keep), scores


@register_selector("agreement")
def select_agreement(c: Candidates, keep, *, threshold=0.5, seed=0, **_):
    probs = c.probs()
    passed = agreement(probs, c.labels, threshold=threshold)
    return top_k_per_class(_random_scores(len(c.labels), seed), c.labels, keep, allowed=passed), confidence(probs, c.labels)


@register_selector("hard")
def select_hard(c: Candidates, keep, **_):
    probs = c.probs()
    hardness = 1 - confidence(probs, c.labels)
    return top_k_per_class(hardness, c.labels, keep, allowed=probs.argmax(1) == c.labels), hardness


@register_selector("realism")
def select_realism(c: Candidates, keep, *, k=3, **_):
    features, real, real_labels = c.features(), c.real_features(), c.real_labels
    scores = torch.zeros(len(c.labels))
    for cls in keep:
        members = c.labels == cls
        reference = real[real_labels == cls]
        if len(reference) <= k:  # too few real images of the class for a k-NN manifold: use them all
            reference = real
        if members.any():
            scores[members] = realism_scores(reference, features[members], k=k)
    return top_k_per_class(scores, c.labels, keep), scores


@register_selector("cluster")
def select_cluster(c: Candidates, keep, *, clusters=10, seed=0, **_):
    return cluster_representatives(c.features(), c.labels, keep, clusters=clusters, seed=seed)


def centre_distances(features: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each candidate's distance to its class's real centre, over that class's d_f (the
    largest real distance to the centre); and the number of candidates whose class has no
    real image (their ratio is inf)."""
    ratio = torch.full((len(labels),), float("inf"))
    for cls in labels.unique().tolist():
        reference = real[real_labels == cls]
        if not len(reference):
            continue
        centre = reference.mean(0)
        d_f = (reference - centre).norm(dim=1).max().clamp_min(1e-8)
        members = labels == cls
        ratio[members] = (features[members] - centre).norm(dim=1) / d_f
    return ratio, int(torch.isinf(ratio).sum())


@register_selector("diffult")
def select_diffult(c: Candidates, keep, *, seed=0, **_):
    ratio, _ = centre_distances(c.features(), c.labels, c.real_features(), c.real_labels)
    allowed = ratio <= 2
    return top_k_per_class(_random_scores(len(c.labels), seed), c.labels, keep, allowed=allowed), -ratio


@register_selector("diffult-band")
def select_diffult_band(c: Candidates, keep, *, seed=0, **_):
    ratio, _ = centre_distances(c.features(), c.labels, c.real_features(), c.real_labels)
    allowed = (ratio > 1) & (ratio <= 2)
    return top_k_per_class(_random_scores(len(c.labels), seed), c.labels, keep, allowed=allowed), -ratio


def prototype_margins(features: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor
                      ) -> torch.Tensor:
    """Distance to the nearest other class's real prototype minus distance to its own (> 0:
    nearer its own class)."""
    classes = real_labels.unique()
    prototypes = torch.stack([real[real_labels == k].mean(0) for k in classes.tolist()])
    d = torch.cdist(features, prototypes)
    own = (labels[:, None] == classes[None, :])
    mine = torch.where(own, d, torch.full_like(d, float("inf"))).min(1).values
    others = torch.where(own, torch.full_like(d, float("inf")), d).min(1).values
    return others - mine


@register_selector("prototype")
def select_prototype(c: Candidates, keep, *, seed=0, **_):
    margin = prototype_margins(c.features(), c.labels, c.real_features(), c.real_labels)
    return top_k_per_class(_random_scores(len(c.labels), seed), c.labels, keep, allowed=margin > 0), margin


def novelty_picks(features: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, real_labels: torch.Tensor,
                  keep: dict[int, int], allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c, greedy k-centre among the `allowed` candidates: `keep[c]` times, keep the one
    farthest from its class's real images and the ones kept so far. Each candidate's score is that
    distance when it was kept, or at the end if it was not, so among the allowed candidates of a
    class a kept one never scores below a dropped one (a disallowed one may score anything)."""
    mask = torch.zeros(len(labels), dtype=torch.bool)
    scores = torch.zeros(len(labels))
    for c, k in keep.items():
        members = torch.nonzero(labels == c).flatten()
        if not len(members):
            continue
        x = features[members].double()
        reference = real[real_labels == c].double()
        if not len(reference):  # a class without real images: start from its candidates' centre
            reference = x.mean(0, keepdim=True)
        nearest = torch.cdist(x, reference).min(1).values
        free = allowed[members].clone()
        for _ in range(min(k, int(free.sum()))):
            j = int(torch.where(free, nearest, torch.tensor(-1.0, dtype=torch.float64)).argmax())
            scores[members[j]] = float(nearest[j])
            mask[members[j]], free[j] = True, False
            nearest = torch.minimum(nearest, (x - x[j]).norm(dim=1))
        dropped = ~mask[members]
        scores[members[dropped]] = nearest[dropped].float()
    return mask, scores


@register_selector("novel")
def select_novel(c: Candidates, keep, **_):
    readable = c.probs().argmax(1) == c.labels
    return novelty_picks(c.features(), c.labels, c.real_features(), c.real_labels, keep, readable)


def get_selector(name: str) -> Callable:
    return SELECTORS.lookup(name, also=("none",))
