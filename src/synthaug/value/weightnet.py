"""Task-oriented data valuation (UtilGen, seed 000), learned as in Meta-Weight-Net (Shu et
al. 2019): a small network maps each training sample's loss to a weight in [0, 1]; it is
meta-learned so that a classifier trained with those weights does well on a small, clean,
real validation set. A sample's weight is its utility to the task.

Each training step:
1. Look-ahead: one SGD step of the classifier on the weighted loss, kept differentiable in
   the weight network's parameters (`torch.func.functional_call` on a dict of parameters).
2. Meta step: the look-ahead classifier's loss on a validation batch; its gradient moves the
   weight network.
3. The classifier takes its real step on the loss weighted by the updated weight network.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import RandomSampler

from ..classify.models import Classifier
from ..classify.train import (
    TrainConfig,
    batches,
    build_augmentation,
    new_classifier,
)
from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.loop import Checkpoint, warmup_cosine
from ..utils.runtime import infer, progress_bar, resolve_device


class WeightNet(nn.Module):
    """loss -> weight in [0, 1]: one hidden layer, as in Meta-Weight-Net."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.reshape(-1, 1)).reshape(-1)


@dataclass
class MetaWeightConfig:
    hidden: int = 100
    meta_lr: float = 1e-3  # Adam on the weight network
    meta_weight_decay: float = 1e-4
    val_batch_size: int = 128


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weight_net: WeightNet) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-sample losses times their weights (the weights see the loss values, not
    their gradient, as in Meta-Weight-Net). Returns the loss and the weights."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    weights = weight_net(losses.detach())
    return (weights * losses).mean(), weights


def meta_gradient(model: nn.Module, weight_net: WeightNet, x, y, x_val, y_val, lr: float) -> tuple[list[torch.Tensor], float]:
    """Gradient of the look-ahead classifier's validation loss with respect to the weight
    network's parameters, and that loss. The look-ahead is one SGD step of size `lr` on the
    weighted training loss; batch-norm statistics are updated on copies and thrown away."""
    params = dict(model.named_parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    loss, _ = weighted_loss(functional_call(model, (params, buffers), (x,)), y, weight_net)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    look_ahead = {k: p - lr * g for (k, p), g in zip(params.items(), grads)}
    val_loss = F.cross_entropy(functional_call(model, (look_ahead, buffers), (x_val,)), y_val)
    return list(torch.autograd.grad(val_loss, list(weight_net.parameters()))), float(val_loss.detach())


@torch.no_grad()
def utilities(model: nn.Module, weight_net: WeightNet, data: ImageDataset, batch_size: int = 512) -> torch.Tensor:
    """Each sample's utility: the weight the weight network gives its loss under `model`."""

    def utility(m, x, rows):
        return weight_net(F.cross_entropy(m(x), data.labels[rows].to(x.device), reduction="none"))

    return infer(model, data.images, utility, batch_size=batch_size)


@dataclass
class MetaWeightResult:
    model: Classifier
    weight_net: WeightNet
    history: list[dict]
    seconds: float


def fit_meta_weighted(train: ImageDataset, val: ImageDataset, config: TrainConfig | None = None,
                      meta: MetaWeightConfig | None = None, *, seed: int = 0, domains: torch.Tensor | None = None,
                      checkpoint_dir: str | Path | None = None, progress: bool = False) -> MetaWeightResult:
    """Train a classifier from scratch on `train` with per-sample weights from a weight
    network meta-learned on `val` (both labelled). SGD with the cosine schedule of
    `fit_classifier` and its augmentation; `domains` (0 real, 1 synthetic) only split the
    logged mean weights. The loss is cross-entropy weighted per sample, as in
    Meta-Weight-Net: the config's loss, sampler, mixing, label smoothing and SAM do not apply
    (the weights are the point). Checkpoints each epoch and resumes to the same weights."""
    cfg, meta = config or TrainConfig(), meta or MetaWeightConfig()
    if len(train) == 0 or len(val) == 0:
        raise SynthaugError("meta-weighted training needs training images and a validation split: set split.val_per_class")
    device = resolve_device(cfg.device)
    model = new_classifier(train, cfg, seed=seed, device=device)
    weight_net = WeightNet(meta.hidden).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                nesterov=True)
    meta_optimizer = torch.optim.Adam(weight_net.parameters(), lr=meta.meta_lr, weight_decay=meta.meta_weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_epochs * steps_per_epoch)
    scheduler = warmup_cosine(optimizer, warmup, total)
    domains = torch.zeros(len(train), dtype=torch.int64) if domains is None else torch.as_tensor(domains).long()
    augment = build_augmentation(cfg.augment, train.image_size)
    val_x, val_y = val.images.to(device).float() / 255, val.labels.to(device)

    history, start, spent = [], 0, 0.0
    checkpoint = Checkpoint(checkpoint_dir, {"config": asdict(cfg), "meta": asdict(meta), "seed": seed,
                                             "data": train.fingerprint(), "val": val.fingerprint()})
    stateful = {"model": model, "weight_net": weight_net, "optimizer": optimizer, "meta_optimizer": meta_optimizer,
                "scheduler": scheduler}
    state = checkpoint.restore(**stateful)
    if state is not None:
        history, start, spent = state["history"], state["epoch"], state["seconds"]

    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task("train (meta-weighted)", total=cfg.epochs, completed=start, info="")
        for epoch in range(start, cfg.epochs):
            torch.manual_seed(seed * 100_003 + epoch)
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            model.train()
            sums = {"loss": 0.0, "val_loss": 0.0, "weight_real": 0.0, "weight_synthetic": 0.0, "n_real": 0, "n_synthetic": 0}
            steps = 0
            for idx in batches(RandomSampler(range(len(train)), generator=g), cfg.batch_size):
                x, y, dom = train.images[idx], train.labels[idx], domains[idx]
                x = x if augment is None else augment(x)
                x, y = x.to(device).float().div_(255), y.to(device)
                v = torch.randint(len(val_y), (min(meta.val_batch_size, len(val_y)),), generator=g).to(device)
                # 1-2. look-ahead and meta step of the weight network
                grads, val_loss = meta_gradient(model, weight_net, x, y, val_x[v], val_y[v], scheduler.get_last_lr()[0])
                for p, gr in zip(weight_net.parameters(), grads):
                    p.grad = gr
                meta_optimizer.step()
                meta_optimizer.zero_grad(set_to_none=True)
                # 3. the classifier's step with the updated weights
                loss, weights = weighted_loss(model(x), y, weight_net)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                steps += 1
                sums["loss"] += float(loss.detach())
                sums["val_loss"] += val_loss
                w, real = weights.detach().cpu(), dom == 0
                sums["weight_real"] += float(w[real].sum())
                sums["weight_synthetic"] += float(w[~real].sum())
                sums["n_real"] += int(real.sum())
                sums["n_synthetic"] += int((~real).sum())
            history.append({
                "epoch": epoch + 1, "loss": sums["loss"] / steps, "meta_val_loss": sums["val_loss"] / steps,
                "mean_weight_real": sums["weight_real"] / sums["n_real"] if sums["n_real"] else None,
                "mean_weight_synthetic": sums["weight_synthetic"] / sums["n_synthetic"] if sums["n_synthetic"] else None,
            })
            bar.update(task, advance=1, info=f"loss {history[-1]['loss']:.3f}")
            checkpoint.save({"history": history, "epoch": epoch + 1, "seconds": spent + time.perf_counter() - t0},
                            **stateful)
    return MetaWeightResult(model.eval(), weight_net.eval(), history, spent + time.perf_counter() - t0)
