"""Semi-supervised training on an unlabelled pool: the pieces `fit_classifier` adds to each
step when `train.ssl` is set.

FixMatch (Sohn et al. 2020): each unlabelled image is seen twice, a weak view (flip + crop)
and a strong view (RandAugment + Cutout). The weak view's prediction, where its confidence
reaches the threshold (0.95), is the hard pseudo-label the strong view is trained on; the
other images add nothing. `mu` unlabelled images per labelled image; the model evaluated is
an EMA of the weights.

FreeMatch (Wang et al. 2023), self-adaptive thresholding only: the threshold follows the
model's confidence, globally (an EMA of the mean top probability) and per class (an EMA of
the mean class probabilities, max-normalised), so early training already learns from the
pool and a class the model is unsure of gets a lower bar. (FreeMatch's fairness term is not
implemented.)

Distribution alignment (ReMixMatch, Berthelot et al. 2020; `train.ssl_align`): the weak
view's probabilities are multiplied by target / (an EMA of the model's mean prediction on the
pool) and renormalised before the threshold, the target being uniform, so the classes the
model over-predicts early do not take over the pseudo-labels (confirmation bias)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Threshold(nn.Module):
    """FixMatch's fixed confidence threshold. `forward(probs)` returns the pseudo-labels and
    the mask of the images whose confidence reaches the threshold; it updates no state."""

    def __init__(self, num_classes: int, threshold: float = 0.95):
        super().__init__()
        self.num_classes, self.threshold = num_classes, threshold

    def bar(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full(labels.shape, self.threshold, device=labels.device)

    def update(self, probs: torch.Tensor):
        pass

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.update(probs)
        confidence, labels = probs.max(1)
        return labels, confidence >= self.bar(labels)


class AdaptiveThreshold(Threshold):
    """FreeMatch's self-adaptive threshold: class c's bar is tau * p(c) / max p, with tau an
    EMA (`momentum`) of the batches' mean top probability and p an EMA of their mean class
    probabilities, both starting at 1 / classes. Buffers, so checkpoints keep them."""

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__(num_classes)
        self.momentum = momentum
        self.register_buffer("tau", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_probs", torch.full((num_classes,), 1.0 / num_classes))

    def bar(self, labels: torch.Tensor) -> torch.Tensor:
        return (self.tau * self.class_probs / self.class_probs.max())[labels]

    def update(self, probs: torch.Tensor):
        m = self.momentum
        self.tau.mul_(m).add_((1 - m) * probs.max(1).values.mean())
        self.class_probs.mul_(m).add_((1 - m) * probs.mean(0))


class Alignment(nn.Module):
    """Distribution alignment: probs * target / running mean of probs, renormalised. The
    running mean (EMA, `momentum`) is a buffer, so checkpoints keep it."""

    def __init__(self, num_classes: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("running", torch.full((num_classes,), 1.0 / num_classes))

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        self.running.mul_(self.momentum).add_((1 - self.momentum) * probs.mean(0))
        aligned = probs * self.target / self.running.clamp(min=1e-6)
        return aligned / aligned.sum(1, keepdim=True)


def make_threshold(kind: str, num_classes: int, threshold: float) -> Threshold:
    return AdaptiveThreshold(num_classes) if kind == "freematch" else Threshold(num_classes, threshold)


def unlabelled_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: Threshold,
                    align: Alignment | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FixMatch's consistency loss: cross-entropy of the strong view against the weak view's
    hard pseudo-label, over the images whose weak confidence (after `align`, if given)
    reaches the threshold, averaged over the whole unlabelled batch (as the paper). Returns
    the loss, the pseudo-labels and the mask."""
    probs = torch.softmax(weak_logits.detach().float(), dim=1)
    labels, mask = threshold(probs if align is None else align(probs))
    per_image = F.cross_entropy(strong_logits.float(), labels, reduction="none")
    return (per_image * mask).mean(), labels, mask


@torch.no_grad()
def pseudo_label(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's label and confidence (top softmax probability) for each uint8 image, in
    eval mode, without augmentation: how DPT labels the pool. Reads no label of `images`."""
    from ..utils.runtime import infer

    probs = infer(model, images, lambda m, x, rows: torch.softmax(m(x).float(), dim=1), batch_size=batch_size)
    confidence, labels = probs.max(1)
    return labels, confidence
