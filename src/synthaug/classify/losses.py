"""Loss, batch mixing and SAM: the pieces the training loop composes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits, targets, *, log_prior=None, tau: float = 0.0, weights=None, reduce: bool = True):
    """Cross-entropy against soft targets (N, C), per-sample `weights` (N,) optional.

    With `log_prior` (log class frequencies) and `tau` > 0 this is the logit-adjusted loss of
    Menon et al. 2021: train on logits + tau * log prior, predict with the plain logits. At
    tau = 1 it equals Balanced Softmax (Ren et al. 2020)."""
    if log_prior is not None and tau:
        logits = logits + tau * log_prior
    per_sample = -(targets * F.log_softmax(logits, dim=1)).sum(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean() if reduce else per_sample


class GroupDRO(torch.nn.Module):
    """Group DRO (Sagawa et al. 2020): a distribution q over the groups, moved towards the
    groups with the highest loss (exponentiated gradient ascent, step `eta`); the training loss
    is the q-weighted mean of the groups' losses. q is a buffer, so it is checkpointed with the
    model's training state."""

    def __init__(self, groups: int, eta: float = 0.01):
        super().__init__()
        self.eta = eta
        self.register_buffer("q", torch.full((groups,), 1.0 / groups))

    def forward(self, per_sample: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        n = len(self.q)
        sums = torch.zeros(n, device=per_sample.device).index_add(0, group, per_sample)
        counts = torch.zeros(n, device=per_sample.device).index_add(0, group, torch.ones_like(per_sample))
        group_loss = sums / counts.clamp(min=1)
        with torch.no_grad():  # a group absent from the batch has loss 0, so its q is multiplied by exactly 1
            self.q *= torch.exp(self.eta * group_loss.detach()).to(self.q)
            self.q /= self.q.sum()
        return (self.q.to(group_loss) * group_loss).sum()


def mix_batch(x, targets, weights=None, *, mode: str = "mixup", alpha: float = 1.0, partner=None):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with `partner` (a
    permutation of the batch, random by default). Returns mixed images, soft targets and
    per-sample weights. Written out, rather than torchvision's v2.MixUp/CutMix, because the
    recipes need to choose the pairs (real with synthetic: SYNAuG's domain mixup) and to mix
    sample weights too. Randomness comes from torch's global generator."""
    n = x.shape[0]
    if partner is None:
        partner = torch.randperm(n, device=x.device)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    if mode == "mixup-cutmix":
        mode = "mixup" if torch.rand(()) < 0.5 else "cutmix"
    if mode == "mixup":
        x = lam * x + (1 - lam) * x[partner]
    elif mode == "cutmix":
        h, w = x.shape[2:]
        cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[partner][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        raise ValueError(f"unknown mix mode {mode}")
    targets = lam * targets + (1 - lam) * targets[partner]
    if weights is not None:
        weights = lam * weights + (1 - lam) * weights[partner]
    return x, targets, weights


class SAM:
    """Sharpness-Aware Minimization (Foret et al. 2021) around any optimizer: `first_step`
    moves the weights to the worst case within an L2 ball of radius `rho`, `second_step`
    restores them and steps the base optimizer with the gradient taken there."""

    def __init__(self, params, base_optimizer: torch.optim.Optimizer, rho: float = 0.05):
        self.params = [p for p in params if p.requires_grad]
        self.base, self.rho = base_optimizer, rho
        self._eps: list[torch.Tensor | None] = []

    @torch.no_grad()
    def first_step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2) if grads else torch.tensor(0.0)
        scale = self.rho / (norm + 1e-12)
        self._eps = []
        for p in self.params:
            eps = None if p.grad is None else p.grad * scale
            if eps is not None:
                p.add_(eps)
            self._eps.append(eps)
        self.base.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self):
        for p, eps in zip(self.params, self._eps):
            if eps is not None:
                p.sub_(eps)
        self.base.step()
