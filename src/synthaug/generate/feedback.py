"""Feedback guidance (Askari-Hemmat et al., TMLR 2024, "Feedback-guided Data Synthesis for
Imbalanced Classification"): the classifier's feedback steers the sampler towards images it
finds hard, while the generator's conditioning keeps them in their class.

At a sampling step (every `feedback_every`-th), before the solver moves on:
1. the UNet's conditional noise prediction at x_t (with gradients) gives the predicted clean
   image x0; the classifier sees x0 sqrt(1 - a_t) + x_t (1 - sqrt(1 - a_t)) (a_t: the
   schedule's cumulative alpha; early on mostly x0, late mostly x_t), each image rescaled to
   [0, 1] by its own range (held fixed), as the paper's code does;
2. the criterion, `entropy` of its prediction or its `loss` on the image's class, is
   differentiated with respect to x_t;
3. x_t moves along that gradient, rescaled to `feedback` x |x_t| for each image (the paper's
   code: 0.03, entropy, which did best on ImageNet-LT).
A step whose x_t holds almost no signal (a_t below `MIN_SIGNAL`: the cosine schedule's first
step from pure noise, a_t 2e-9) is left alone: its x0 is the noise amplified thousands of
times, and a gradient of the classifier on it would push in no meaningful direction (the
paper's schedule starts at a_t 0.005).
The classifier is select's scorer (`select.stage.scorer_for`), trained at the generator's seed
so that the images depend on the generator's seeds alone and the classifier seeds share them.
A store records which scorer guided each image (its training key, `feedback_guide`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.runtime import autocast

MIN_SIGNAL = 1e-3  # the least cumulative alpha at which a step takes feedback


def criterion(logits: torch.Tensor, labels: torch.Tensor, name: str) -> torch.Tensor:
    """Each image's feedback: the entropy of the classifier's prediction, or its cross-entropy
    on the image's class (`loss`). Higher is harder; the sampler climbs it."""
    if name == "entropy":
        log_p = logits.float().log_softmax(1)
        return -(log_p.exp() * log_p).sum(1)
    if name == "loss":
        return F.cross_entropy(logits.float(), labels, reduction="none")
    raise ValueError(f"unknown feedback criterion '{name}'")


@torch.enable_grad()
def feedback_step(generator, x: torch.Tensor, t, scheduler, cond: torch.Tensor, cond_map: torch.Tensor | None,
                  labels: torch.Tensor, guide: torch.nn.Module, sampling, dtype=None) -> torch.Tensor:
    """x_t moved by the feedback of `guide` (see the module docstring); `cond` and `cond_map`
    are the UNet's conditioning for the images' own (class, group) cells."""
    alpha = scheduler.alphas_cumprod[int(t)].item()
    if alpha < MIN_SIGNAL:
        return x
    x_in = x.detach().requires_grad_(True)
    with autocast(x.device, dtype):
        eps = generator.predict_noise(scheduler.scale_model_input(x_in, t), t, cond, cond_map).float()
    x0 = (x_in - (1 - alpha) ** 0.5 * eps) / alpha**0.5
    fac = (1 - alpha) ** 0.5
    seen = (x0 * fac + x_in * (1 - fac)).flatten(1)
    low, high = seen.min(1, keepdim=True).values.detach(), seen.max(1, keepdim=True).values.detach()
    image = ((seen - low) / (high - low).clamp_min(1e-8)).view_as(x_in)
    device = next(guide.parameters()).device
    was_training = guide.training
    guide.eval()  # its reading of an image must not depend on the batch (batch norm), nor update its statistics
    try:
        value = criterion(guide(image.to(device)), labels.to(device), sampling.feedback_criterion)
    finally:
        guide.train(was_training)  # the caller's module is left as it came
    (grad,) = torch.autograd.grad(value.sum(), x_in)
    shape = (-1,) + (1,) * (x.dim() - 1)
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
    return x.detach() + sampling.feedback * grad / norm * x.detach().flatten(1).norm(dim=1).view(shape)
