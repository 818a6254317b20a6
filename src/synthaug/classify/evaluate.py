"""Evaluation: arrays in, a dict of metrics out (overall and balanced accuracy, per class,
many/medium/few-shot groups, worst class and worst group, confusion matrix)."""

from __future__ import annotations

import torch

from ..data.dataset import ImageDataset
from ..data.splits import shot_thresholds
from ..utils.runtime import infer
from .models import Classifier


def predict_logits(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's logits for uint8 images."""
    return infer(model, images, batch_size=batch_size)


def example_losses(model: Classifier, data: ImageDataset) -> torch.Tensor:
    """Each example's cross-entropy under `model` (no augmentation): how well it is learned."""
    logits = predict_logits(model, data.images)
    return torch.nn.functional.cross_entropy(logits, data.labels, reduction="none")


def classification_metrics(
    predictions: torch.Tensor,
    labels: torch.Tensor,
    *,
    class_names: list[str],
    train_counts: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    many_threshold: float | None = None,
    few_threshold: float | None = None,
) -> dict:
    """Metrics of predicted classes against true labels.

    `train_counts` (images per class in training) gives the many/medium/few-shot split:
    many > many_threshold, few < few_threshold (defaults: 20% and 4% of the largest class,
    see `shot_thresholds`). `groups` gives each (class, group) cell's accuracy and the worst and mean of them."""
    predictions, labels = torch.as_tensor(predictions), torch.as_tensor(labels)
    num_classes = len(class_names)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(1)
    per_class = confusion.diag().float() / support.clamp(min=1)
    present = support > 0
    out = {
        "accuracy": float((predictions == labels).float().mean()),
        "balanced_accuracy": float(per_class[present].mean()),
        "worst_class_accuracy": float(per_class[present].min()),
        "per_class_accuracy": {c: float(a) for c, a, p in zip(class_names, per_class, present) if p},
        "confusion_matrix": confusion.tolist(),
    }
    if train_counts is not None:
        train_counts = torch.as_tensor(train_counts)
        many, few = shot_thresholds(int(train_counts.max()), many_threshold, few_threshold)
        shots = {
            "many": train_counts > many,
            "medium": (train_counts <= many) & (train_counts >= few),
            "few": train_counts < few,
        }
        out["shot_thresholds"] = {"many_above": many, "few_below": few}
        for name, mask in shots.items():
            mask = mask & present
            out[f"{name}_shot_accuracy"] = float(per_class[mask].mean()) if mask.any() else None
            out[f"{name}_shot_classes"] = int(mask.sum())
    if groups is not None:
        groups = torch.as_tensor(groups)
        cells = {}
        for c, g in torch.unique(torch.stack([labels, groups], 1), dim=0).tolist():
            mask = (labels == c) & (groups == g)
            cells[(c, g)] = float((predictions[mask] == c).float().mean())
        worst = min(cells, key=cells.get)
        out["worst_group_accuracy"] = cells[worst]
        out["worst_group"] = {"class": class_names[worst[0]], "group": int(worst[1])}
        out["mean_group_accuracy"] = sum(cells.values()) / len(cells)
        per_group: dict[str, dict[str, float]] = {}  # class -> group -> accuracy, every cell the test holds
        for (c, g), a in cells.items():
            per_group.setdefault(class_names[c], {})[str(g)] = a
        out["group_accuracy"] = per_group
    return out


def evaluate(
    model: Classifier,
    test: ImageDataset,
    *,
    train_counts: torch.Tensor | None = None,
    posthoc_tau: float = 0.0,
    many_threshold: float | None = None,
    few_threshold: float | None = None,
) -> dict:
    """Metrics of `model` on `test`. `posthoc_tau` > 0 applies post-hoc logit adjustment
    (subtract tau * log prior of `train_counts`; Menon et al. 2021) before the argmax."""
    logits = predict_logits(model, test.images)
    if posthoc_tau:
        if train_counts is None:
            raise ValueError("post-hoc logit adjustment needs train_counts")
        prior = torch.as_tensor(train_counts).float().clamp(min=1)
        logits = logits - posthoc_tau * torch.log(prior / prior.sum())
    return classification_metrics(
        logits.argmax(1), test.labels, class_names=test.classes, train_counts=train_counts, groups=test.groups,
        many_threshold=many_threshold, few_threshold=few_threshold,
    )
