"""DBG's boundary push (Yang et al., CVPR 2026, "Decision Boundary-aware Generation for
Long-tailed Learning"): a generated image deep inside its class teaches the classifier
little; moved towards the class it is nearest to being confused with, it marks the boundary
where a long tail squeezes the tail classes.

For each generated image x of intended class y, under the scorer f (the classifier trained on
the real split, `select/stage.py`):
1. its margin is m(x) = f_y(x) - max_{k != y} f_k(x), against the highest other logit (DBG's
   rival; DeepFool's own would be the class whose linearised boundary is nearest);
2. DeepFool steps (Moosavi-Dezfooli et al. 2016) move x along -grad m to where the
   linearised margin is (1 - push) m(x0): push 0 leaves x as it is, 1 puts it on the
   boundary; at most `STEPS` steps, pixels kept in [0, 1], then rounded back to uint8;
3. cleaning: an image the scorer reads as another class once pushed (or already did) is kept
   as generated; with its hard label it would teach the rival's region as y's.
Every image keeps its label and its place (DBG relabels with the confusable classes; a hard
label keeps the recipes' losses as they are). The push is done again in each run (it depends
on the scorer, and so on the classifier seed); the store's images stay as generated.
"""

from __future__ import annotations

import torch

from ..classify.models import Classifier

STEPS = 5  # DeepFool steps at most (the linearised target is usually reached in two or three)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's logit of its label minus its largest other logit (< 0: read as another class)."""
    own = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return own - others.max(1).values


def _push_batch(scorer: Classifier, x: torch.Tensor, labels: torch.Tensor, push: float) -> torch.Tensor:
    with torch.no_grad():
        target = (1 - push) * margins(scorer(x), labels)
    moving = target > 0  # an image read as another class already stays as it is
    for _ in range(STEPS):
        x = x.detach().requires_grad_(True)
        margin = margins(scorer(x), labels)
        moving &= margin.detach() > target
        if not moving.any():
            break
        (grad,) = torch.autograd.grad(margin.sum(), x)
        flat = grad.flatten(1)
        norm = flat.pow(2).sum(1)
        moving &= norm > 1e-8  # a flat margin (dead units) would ask for an unbounded step: left as it is
        # the step onto the linearised target: r = (target - m) g / |g|^2
        scale = (target - margin.detach()) / norm.clamp_min(1e-8) * moving
        x = (x.detach() + (scale[:, None] * flat).view_as(x)).clamp(0, 1)
    return x.detach()


def boundary_push(scorer: Classifier, images: torch.Tensor, labels: torch.Tensor, push: float, *,
                  batch_size: int = 256) -> tuple[torch.Tensor, dict]:
    """`images` (uint8) moved towards their nearest rival class by `push` of their margin under
    `scorer`, cleaned (see the module docstring). Returns the images and, per image, its margin
    before and after (`margin_before`, `margin_after`) and whether it was moved (`pushed`)."""
    if not 0 <= push <= 1:
        raise ValueError(f"push must be in [0, 1], got {push}")
    scorer.eval()
    device = next(scorer.parameters()).device
    out, before, after, pushed = [], [], [], []
    for i in range(0, len(images), batch_size):
        original, y = images[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        x0 = original.float() / 255
        moved = (_push_batch(scorer, x0, y, push) * 255).round().to(torch.uint8)
        with torch.no_grad():
            m0, m1 = margins(scorer(x0), y), margins(scorer(moved.float() / 255), y)
        keep = (m1 > 0) & (moved != original).flatten(1).any(1)  # moved, and still read as its class
        out.append(torch.where(keep.view(-1, *[1] * (original.dim() - 1)), moved, original).cpu())
        before.append(m0.cpu())
        after.append(torch.where(keep, m1, m0).cpu())
        pushed.append(keep.cpu())
    if not out:
        return images, {"margin_before": torch.empty(0), "margin_after": torch.empty(0),
                        "pushed": torch.empty(0, dtype=torch.bool)}
    return torch.cat(out), {"margin_before": torch.cat(before), "margin_after": torch.cat(after),
                            "pushed": torch.cat(pushed)}
