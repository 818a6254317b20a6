"""One plain PyTorch training loop for the classifier, with the options the baselines and
recipes need: sampler, loss, augmentation, Mixup/CutMix, SAM, per-sample weights, cRT
(re-fit the head on class-balanced real data), and semi-supervised training on an
unlabelled pool (FixMatch, FreeMatch: `ssl.py`). Resumable from per-epoch checkpoints."""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import ClassVar, get_args

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import RandomSampler, WeightedRandomSampler
from torchvision.transforms import v2

from ..choices import ClassSampler, GroupMethod, Loss, Mix, Precision, SslMethod, check_choices
from ..data.dataset import UNLABELED, ImageDataset
from ..errors import SynthaugError
from ..utils.keys import key_dict
from ..utils.loop import Checkpoint, warmup_cosine
from ..utils.runtime import (
    autocast,
    check_device,
    fast_dtype,
    infer,
    progress_bar,
    resolve_device,
    send,
)
from .evaluate import predict_logits
from .losses import SAM, GroupDRO, mix_batch, soft_cross_entropy
from .models import Classifier, create_model
from .ssl import Alignment, make_threshold, unlabelled_loss

SAMPLERS, LOSSES, MIXES = get_args(ClassSampler), get_args(Loss), get_args(Mix)
AUGMENTATIONS = ("none", "crop", "flip", "randaugment", "trivialaugment", "autoaugment", "cutout")


@dataclass
class TrainConfig:
    """Everything that decides how a classifier is trained. Defaults suit 28x28 images on a CPU."""

    # options added later, with the values caches had before them: left out of cache keys at those (utils/keys.py)
    ADDED: ClassVar[dict[str, object]] = {"drw_start": 1.0, "group_dro_balanced": False, "weight_norm": False,
                                          "data_on_device": True}  # speed only: the same training either way

    model: str = "small-cnn"
    epochs: int = 15
    # optimiser steps in all: when set, epochs = ceil(steps / steps per epoch), so methods that
    # train on more or fewer images get the same optimiser budget (benchmarks compare at equal steps)
    steps: int | None = None
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    sampler: ClassSampler = "uniform"
    loss: Loss = "ce"
    tau: float = 1.0  # logit-adjustment strength (balanced-softmax fixes it to 1)
    # deferred re-weighting (DRW, Cao et al. 2019): from this share of the epochs on, each image's loss is
    # weighted by its class's effective-number weight (Cui et al. 2019, beta 0.9999); 1: never, 0: from the start
    drw_start: float = 1.0
    # each batch's per-image loss weights divided by their mean: weights then set the balance between
    # the batch's images (real against synthetic) without scaling its loss against the unlabelled term
    weight_norm: bool = False
    label_smoothing: float = 0.0
    augment: str = field(default="crop", metadata={"help": "'+'-joined: " + ", ".join(AUGMENTATIONS)})
    mix: Mix = "none"
    mix_alpha: float = 1.0
    mix_prob: float = 1.0
    sam_rho: float = 0.0  # > 0 turns on SAM
    # with groups (a coloured split): each (class, group) cell drawn equally often, its images' loss
    # weighted by 1 / its size, or Group DRO over the cells (step size group_dro_eta)
    group_method: GroupMethod = "none"
    group_dro_eta: float = 0.01
    # Group DRO's batches draw each cell equally often, as the paper's runs do (--reweight_groups
    # --robust in its reference code; recipe group-dro sets it); false: uniform batches
    group_dro_balanced: bool = False
    # semi-supervised on the split's unlabelled pool (few-shot with split.unlabeled_pool): FixMatch, or
    # FreeMatch's self-adaptive threshold. An epoch is then one pass over the pool, ssl_mu x batch_size a step
    ssl: SslMethod = "none"
    ssl_threshold: float = 0.95  # fixmatch: the weak view's confidence that makes its label a pseudo-label
    ssl_mu: int = 7  # unlabelled images per labelled image in each step
    ssl_weight: float = 1.0  # weight of the unlabelled loss (lambda_u)
    ssl_align: bool = False  # distribution alignment of the weak view's prediction to uniform (ReMixMatch)
    ssl_weak: str = "flip+crop"  # the view that pseudo-labels ('+'-joined augmentations)
    ssl_strong: str = "flip+crop+randaugment+cutout"  # the view trained on the pseudo-label
    ssl_ema: float = 0.999  # with ssl, the model kept is an EMA of the weights with this decay (0: off)
    refit_head: bool = False  # cRT: re-fit the head on class-balanced real data after training
    refit_per_class: str = field(default="all", metadata={"help": "'all' (class-balanced weights over all images), 'min' or a number"})
    refit_epochs: int = 10
    refit_lr: float = 0.05
    device: str = "auto"
    precision: Precision = "auto"  # bfloat16 autocast (float32 weights) where the hardware computes it natively
    channels_last: bool = True  # the convolutions' memory layout (faster with oneDNN and cuDNN)
    # on a GPU, the training images (and an unlabelled pool) kept there when they fit in a quarter of its
    # free memory and no augmentation is a policy (randaugment, ...), so each batch is
    # indexed, cropped and flipped there; false: indexed and augmented on the CPU
    data_on_device: bool = True

    def __post_init__(self):
        check_choices(self, "train.")
        for name in ("augment", "ssl_weak", "ssl_strong"):
            check_augmentation(getattr(self, name), f"train.{name}")
        if self.epochs < 1 or self.batch_size < 1 or self.refit_epochs < 1 or (self.steps is not None and self.steps < 1):
            raise SynthaugError("train.epochs, train.steps, train.batch_size and train.refit_epochs must be >= 1")
        if self.mix_alpha <= 0:
            raise SynthaugError(f"train.mix_alpha must be > 0, got {self.mix_alpha}")
        for name in ("mix_prob", "label_smoothing", "drw_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise SynthaugError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SynthaugError(f"train.{f.name} is {value}: give a finite number")
        if self.group_method == "dro" and (self.mix != "none" or self.sam_rho > 0):
            raise SynthaugError("train.group_method=dro works on each image's own loss: set train.mix=none and "
                                "train.sam_rho=0")
        if self.group_method == "balanced-sampling" and self.sampler != "uniform":
            raise SynthaugError("train.group_method=balanced-sampling is a sampler: leave train.sampler=uniform")
        if self.ssl != "none" and (self.sam_rho > 0 or self.group_method == "dro"):
            raise SynthaugError(f"train.ssl={self.ssl} does not combine with SAM or Group DRO: set train.sam_rho=0 "
                                "and train.group_method to another method")
        if not 0 < self.ssl_threshold <= 1 or self.ssl_mu < 1 or self.ssl_weight < 0 or not 0 <= self.ssl_ema < 1:
            raise SynthaugError("train.ssl_threshold must be in (0, 1], ssl_mu >= 1, ssl_weight >= 0 and ssl_ema in [0, 1)")
        if self.group_dro_eta <= 0:
            raise SynthaugError(f"train.group_dro_eta must be > 0, got {self.group_dro_eta}")
        if self.sam_rho < 0 or self.lr <= 0 or self.refit_lr <= 0:
            raise SynthaugError("train.sam_rho must be >= 0 and train.lr, train.refit_lr > 0")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.tau < 0:
            raise SynthaugError("train.momentum must be in [0, 1), train.weight_decay, warmup_epochs and tau >= 0")
        check_per_class(self.refit_per_class, "train.refit_per_class")
        check_device(self.device, "train.device")


def check_augmentation(spec: str, key: str):
    """Fail on an augmentation spec with a part that is not one of AUGMENTATIONS."""
    for part in spec.split("+"):
        if part not in AUGMENTATIONS:
            raise SynthaugError(f"{key}: unknown augmentation '{part}': use '+'-joined names from "
                                f"{', '.join(AUGMENTATIONS)}")


def check_per_class(value, key: str):
    if value in ("all", "min") or (str(value).isdigit() and int(value) > 0):
        return
    raise SynthaugError(f"{key} is '{value}': use 'all', 'min' or a positive number")


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict]
    seconds: float
    config: dict
    curve: list[dict] = field(default_factory=list)  # test accuracy every `monitor_every` steps (fit_classifier)
    steps: int = 0  # optimiser steps taken (the schedule's, up to `stop_after_epochs`)


POLICIES = {"randaugment": v2.RandAugment, "trivialaugment": v2.TrivialAugmentWide, "autoaugment": v2.AutoAugment}


class Augmentation:
    """Training augmentation of a uint8 batch, from a spec like 'crop+flip+randaugment'
    (applied in that order). Crop (zero padding of 1/8 of the side, as `v2.RandomCrop`) and
    flip draw per image in tensor ops over the whole batch, from the CPU's random generator
    wherever the batch is (a batch on a GPU is augmented as it would be on the CPU); the
    policies draw per image as torchvision v2's transforms do and run each operation once on all
    the images that drew it (`BatchedPolicy`)."""

    def __init__(self, spec: str, image_size: tuple[int, int]):
        self.padding = max(1, image_size[0] // 8)
        self.steps = []
        for part in spec.split("+"):
            if part == "crop":
                self.steps.append(self.crop)
            elif part == "flip":
                self.steps.append(flip)
            elif part == "cutout":
                self.steps.append(cutout)
            elif part in POLICIES:
                self.steps.append(BatchedPolicy(POLICIES[part]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        top, left = torch.randint(0, 2 * p + 1, (n,)), torch.randint(0, 2 * p + 1, (n,))
        rows = send((top[:, None] + torch.arange(h))[:, None, :, None], x.device)
        cols = send((left[:, None] + torch.arange(w))[:, None, None, :], x.device)
        # the rows, then the columns: two gathers (half the time of one 4-index lookup on a CPU)
        return padded.gather(2, rows.expand(n, c, h, w + 2 * p)).gather(3, cols.expand(n, c, h, w))


def flip(x: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    return torch.where(send((torch.rand(len(x)) < 0.5)[:, None, None, None], x.device), x.flip(-1), x)


def cutout(x: torch.Tensor) -> torch.Tensor:
    """Cutout as FixMatch's strong view uses it: per image, a gray square of side uniform in
    [1, side / 2] at a uniform centre (clipped at the border)."""
    n, _, h, w = x.shape
    size = torch.randint(1, max(2, min(h, w) // 2 + 1), (n,))
    cy, cx = torch.randint(0, h, (n,)), torch.randint(0, w, (n,))
    rows, cols = torch.arange(h)[None, :], torch.arange(w)[None, :]
    inside_r = (rows >= (cy - size // 2)[:, None]) & (rows < (cy - size // 2 + size)[:, None])
    inside_c = (cols >= (cx - size // 2)[:, None]) & (cols < (cx - size // 2 + size)[:, None])
    square = send((inside_r[:, :, None] & inside_c[:, None, :])[:, None], x.device)
    gray = 128 if x.dtype == torch.uint8 else 0.5
    return torch.where(square, torch.full_like(x, gray), x)


class BatchedPolicy:
    """A torchvision v2 auto-augment policy (RandAugment, TrivialAugmentWide, AutoAugment) over a
    batch: each image draws its operations as the policy's own `forward` would, from the same random
    stream in the same order, and each operation then runs once on all the images that drew it.
    The result is the policy applied image by image (its operations are deterministic given their
    magnitude, and each acts on every image of a batch alone) at a few dozen calls a batch instead
    of one or two per image."""

    def __init__(self, policy_class: type):
        policy, drawn = policy_class(), []

        class Recorder(policy_class):  # the policy's own draws, its operations noted instead of applied
            def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
                drawn.append((transform_id, magnitude))
                return image

        self.recorder, self.drawn = Recorder(), drawn
        self.apply = lambda x, op, magnitude: policy._apply_image_or_video_transform(
            x, op, magnitude, interpolation=policy.interpolation, fill=policy._fill)

    def draw(self, n: int, shape: tuple[int, ...]) -> list[list[tuple[str, float]]]:
        """The operations of each of n images, in order."""
        blank, ops = torch.zeros(shape, dtype=torch.uint8), []
        for _ in range(n):
            self.drawn.clear()
            self.recorder(blank)
            ops.append(list(self.drawn))
        return ops

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.draw(len(x), tuple(x.shape[1:]))
        x = x.clone()
        for layer in range(max(map(len, ops), default=0)):
            groups: dict[tuple[str, float], list[int]] = {}
            for i, image_ops in enumerate(ops):
                if layer < len(image_ops) and image_ops[layer][0] != "Identity":
                    groups.setdefault(image_ops[layer], []).append(i)
            for (op, magnitude), rows in groups.items():
                rows = send(torch.tensor(rows), x.device)
                x[rows] = self.apply(x[rows], op, magnitude)
        return x


def by_domain(real: Augmentation | None, synthetic: Augmentation | None):
    """augment(x, domains): each image of a uint8 batch through its domain's augmentation
    (0 real, 1 synthetic; None leaves it as it is)."""
    def augment(x: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for transform, mask in ((real, domains == 0), (synthetic, domains != 0)):
            if transform is not None and bool(mask.any()):  # `domains` on the CPU: no wait for a GPU
                rows = send(torch.nonzero(mask).flatten(), x.device)
                x[rows] = transform(x[rows])
        return x
    return augment


def build_augmentation(spec: str, image_size: tuple[int, int]) -> Augmentation | None:
    """The batch augmentation for a spec like 'crop+flip' (None for 'none')."""
    augmentation = Augmentation(spec, image_size)
    return augmentation if augmentation.steps else None


def batches(sampler, batch_size: int):
    """The sampler's indices in batches of `batch_size` (the last one smaller): one
    indexing per batch instead of a DataLoader's one call per image."""
    order = torch.as_tensor(list(sampler), dtype=torch.int64)
    return order.split(batch_size)


def cross_domain_partners(domains: torch.Tensor) -> torch.Tensor:
    """For each sample, a random partner from the other domain (real <-> synthetic) in the
    batch: SYNAuG's domain mixup. Samples with no other-domain sample in the batch pair at random."""
    n = len(domains)
    partner = torch.randperm(n, device=domains.device)
    for d in domains.unique():
        mine, others = torch.nonzero(domains == d).flatten(), torch.nonzero(domains != d).flatten()
        if len(others):
            partner[mine] = others[torch.randint(len(others), (len(mine),), device=domains.device)]
    return partner


def class_weights(kind: str, counts: torch.Tensor) -> torch.Tensor:
    """Each image's draw weight, by its class: 1 (uniform), 1/n_c (class-balanced), 1/sqrt(n_c)."""
    counts = counts.float().clamp(min=1)
    return {"uniform": torch.ones_like(counts), "class-balanced": 1.0 / counts, "sqrt": 1.0 / counts.sqrt()}[kind]


def effective_number_weights(counts: torch.Tensor, beta: float = 0.9999) -> torch.Tensor:
    """Cui et al. 2019's class weights, (1 - beta) / (1 - beta^n_c), scaled to mean 1 over the
    classes (empty classes get the weight of a class of one image)."""
    counts = counts.double().clamp(min=1)
    weights = (1 - beta) / (1 - beta**counts)
    return (weights * len(counts) / weights.sum()).float()


def presented_prior(kind: str, counts: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor:
    """The class distribution the sampler presents to the loss. Logit adjustment and Balanced
    Softmax correct for this prior, not the dataset's counts: with class-balanced sampling it
    is uniform, so they do not correct the imbalance a second time. `mass` (each class's sum of
    loss weights, default its count) counts an image weighted 0.3 as 0.3 of an image."""
    mass = torch.where(counts > 0, counts if mass is None else mass, 1).float().clamp(min=1e-6)
    presented = mass * class_weights(kind, counts)
    return presented / presented.sum()


def group_cells(train: ImageDataset) -> torch.Tensor:
    """Each image's (class, group) cell, numbered class * groups + group."""
    if train.groups is None:
        raise SynthaugError("train.group_method needs a split with groups (split.kind=colored, or a source with "
                            "groups): set train.group_method=none")
    return train.cells()


def make_sampler(kind: str, labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                 cells: torch.Tensor | None = None):
    """Batches' draw: `kind` over the classes, or (with `cells`) each cell equally often."""
    if cells is not None:
        per_cell = 1.0 / torch.bincount(cells).double().clamp(min=1)
        return WeightedRandomSampler(per_cell[cells], num_samples=len(labels), replacement=True, generator=generator)
    if kind == "uniform":
        return RandomSampler(range(len(labels)), generator=generator)
    per_class = class_weights(kind, torch.bincount(labels, minlength=num_classes))
    return WeightedRandomSampler(per_class[labels].double(), num_samples=len(labels), replacement=True, generator=generator)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = images[:: max(1, len(images) // 20000)].float() / 255  # a strided sample covers class-sorted data
    return x.mean((0, 2, 3)), x.std((0, 2, 3))


def new_classifier(train: ImageDataset, cfg: TrainConfig, *, seed: int, device) -> Classifier:
    """A freshly initialised classifier (from `seed`) for `train`'s classes and images,
    normalising with `train`'s channel statistics, on `device`."""
    torch.manual_seed(seed)
    model = create_model(cfg.model, num_classes=train.num_classes, in_channels=train.channels, image_size=train.image_size)
    model.set_normalization(*channel_stats(train.images))
    return model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def epochs_for(steps: int, images: int, batch_size: int) -> int:
    """Whole epochs that make at least `steps` optimiser steps over `images` images."""
    return max(1, math.ceil(steps / math.ceil(images / batch_size)))


def check_pool(unlabeled: ImageDataset | None, train: ImageDataset, cfg: TrainConfig):
    """The unlabelled pool semi-supervised training needs: present, of the training set's kind,
    and unlabelled (its labels are never read; a pool that carries them is refused)."""
    if unlabeled is None or len(unlabeled) == 0:
        raise SynthaugError(f"train.ssl={cfg.ssl} trains on an unlabelled pool and this split has none: use "
                            "split.kind=few-shot with split.unlabeled_pool=true, or set train.ssl=none")
    if int((unlabeled.labels != UNLABELED).sum()):
        raise SynthaugError("the unlabelled pool carries labels: pass it with labels set to UNLABELED (-1)")
    if unlabeled.images.shape[1:] != train.images.shape[1:]:
        raise SynthaugError(f"the unlabelled pool's images are {tuple(unlabeled.images.shape[1:])}, the training "
                            f"set's {tuple(train.images.shape[1:])}: load both at the same size")


def training_key(train: ImageDataset, cfg: TrainConfig, *, seed: int) -> dict:
    """What names a training on `train` and its result: the settings (the precision as "auto"
    resolves here), the seed and the data. A saved result is reused only under the same key."""
    key = {"config": key_dict(cfg), "seed": seed, "data": train.fingerprint()}
    key["config"]["precision"] = str(fast_dtype(cfg.precision, resolve_device(cfg.device)) or torch.float32)
    return key


def fit_classifier(
    train: ImageDataset,
    config: TrainConfig | None = None,
    *,
    seed: int = 0,
    sample_weights: torch.Tensor | None = None,
    domains: torch.Tensor | None = None,
    soft_targets: torch.Tensor | None = None,
    synthetic_augment: str | None = None,
    unlabeled: ImageDataset | None = None,
    monitor: ImageDataset | None = None,
    monitor_every: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train a classifier from scratch on `train` (SGD, cosine schedule with warmup).

    `stop_after_epochs` stops early on the schedule of the full `epochs` (TADA's early
    checkpoint: the model as it is a few epochs into its normal training).

    `sample_weights` scale each image's loss; `domains` (0 real, 1 synthetic) pair real with
    synthetic images when `mix="domain-mixup"`; `soft_targets` (N, classes; rows summing to 1)
    stand in for the labels' one-hot ones (a translated image's share of its source class,
    `plan.translation_targets`): Balanced Softmax's prior counts each image by them (the
    sampler draws it by its label, and DRW's class weights use the labels); `synthetic_augment` (a spec like `cfg.augment`)
    augments the synthetic images in its place (AdaInf: generated images want weaker augmentation).

    With `cfg.ssl`, each step also trains on `ssl_mu` x `batch_size` images of `unlabeled`
    (FixMatch's consistency loss, `ssl.py`); an epoch is then one pass over the pool, the
    labelled batches drawn from the sampler as often as it takes, and the model returned is
    the EMA of the weights (`ssl_ema`).

    `monitor` (a test set) is scored every `monitor_every` steps: the accuracy-against-steps
    curve of `TrainResult.curve`, for reports only (nothing is chosen by it).

    Each epoch re-seeds from (seed, epoch), so a run resumed from `checkpoint_dir` after an
    interruption ends with the same weights as one that never stopped."""
    cfg = config or TrainConfig()
    if len(train) == 0:
        raise SynthaugError("the training set is empty: check the split parameters")
    if int((train.labels < 0).sum()):
        raise SynthaugError("the training set has unlabeled images: train on the labelled split only")
    ssl = cfg.ssl != "none"
    if ssl:
        check_pool(unlabeled, train, cfg)
    device = resolve_device(cfg.device)
    model = new_classifier(train, cfg, seed=seed, device=device)

    weights = torch.ones(len(train)) if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float32).cpu()
    if weights.shape != (len(train),):
        raise SynthaugError(f"sample_weights has {len(weights)} entries for {len(train)} images")
    if soft_targets is not None:
        soft_targets = torch.as_tensor(soft_targets, dtype=torch.float32).cpu()
        if soft_targets.shape != (len(train), train.num_classes):
            raise SynthaugError(f"soft_targets must be ({len(train)}, {train.num_classes}), got {tuple(soft_targets.shape)}")
        if bool((soft_targets < 0).any()) or not torch.allclose(soft_targets.sum(1), torch.ones(len(train))):
            raise SynthaugError("soft_targets must have non-negative rows that sum to 1")
    # each class's share of the loss, the prior Balanced Softmax corrects for (the caller's weights, before any group's)
    mass = None if sample_weights is None else torch.zeros(train.num_classes).index_add(0, train.labels, weights)
    if soft_targets is not None:  # an image counts to each class by its target, and is drawn as its label's class
        draw = class_weights(cfg.sampler, train.class_counts())
        mass = (weights * draw[train.labels]) @ soft_targets / draw
    domains = torch.zeros(len(train), dtype=torch.int64) if domains is None else torch.as_tensor(domains, dtype=torch.int64)
    if domains.shape != (len(train),):
        raise SynthaugError(f"domains has {len(domains)} entries for {len(train)} images")
    cells = group_cells(train) if cfg.group_method != "none" else None
    if cfg.group_method == "reweighted":  # each image's loss weighted by 1 / its cell's size, mean 1
        inverse = 1.0 / torch.bincount(cells).float()[cells]
        weights = weights * inverse / inverse.mean()
    augment = build_augmentation(cfg.augment, train.image_size)
    if synthetic_augment is not None:  # augment(x, domains): each image through its domain's augmentation
        check_augmentation(synthetic_augment, "synthetic_augment")
        augment = by_domain(augment, build_augmentation(synthetic_augment, train.image_size))
    elif augment is not None:
        augment = lambda x, domains, one=augment: one(x)  # noqa: E731
    pool_batch = cfg.ssl_mu * cfg.batch_size
    epoch_images, epoch_batch = (len(unlabeled), pool_batch) if ssl else (len(train), cfg.batch_size)  # an epoch: the pool's, with ssl
    steps_per_epoch = math.ceil(epoch_images / epoch_batch)
    if cfg.steps is not None:
        cfg = replace(cfg, epochs=epochs_for(cfg.steps, epoch_images, epoch_batch))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    scheduler = warmup_cosine(optimizer, warmup, total_steps)
    sam = SAM(params, optimizer, cfg.sam_rho) if cfg.sam_rho > 0 else None

    log_prior = presented_prior(cfg.sampler, train.class_counts(), mass)
    drw_epoch = round(cfg.drw_start * cfg.epochs) if cfg.drw_start < 1 else None
    drw_weights = effective_number_weights(train.class_counts()).to(device)
    balanced_cells = cfg.group_method == "balanced-sampling" or (cfg.group_method == "dro" and cfg.group_dro_balanced)
    if balanced_cells:  # each class as often as it has non-empty cells
        per_class = torch.zeros(train.num_classes).index_add(0, torch.unique(cells) // (int(train.groups.max()) + 1),
                                                             torch.ones(len(torch.unique(cells))))
        log_prior = per_class.clamp(min=1e-6) / per_class.sum()
    log_prior = log_prior.log().to(device)
    dro = GroupDRO(int(cells.max()) + 1, cfg.group_dro_eta).to(device) if cfg.group_method == "dro" else None
    tau = 1.0 if cfg.loss == "balanced-softmax" else (cfg.tau if cfg.loss == "logit-adjusted" else 0.0)
    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **({"dro": dro} if dro is not None else {})}
    ema = None
    if ssl:
        weak, strong = build_augmentation(cfg.ssl_weak, train.image_size), build_augmentation(cfg.ssl_strong, train.image_size)
        threshold = make_threshold(cfg.ssl, train.num_classes, cfg.ssl_threshold).to(device)
        stateful["threshold"] = threshold
        align = Alignment(train.num_classes).to(device) if cfg.ssl_align else None
        if align is not None:
            stateful["align"] = align
        if cfg.ssl_ema > 0:
            ema = WeightEMA(model, cfg.ssl_ema)
            stateful["ema"] = ema
    kept = lambda: ema.module if ema is not None else model  # noqa: E731  the model evaluated and returned

    history, curve, start_epoch, spent = [], [], 0, 0.0
    # a checkpoint is resumed only by the same training (config, seed, data, weights, domains, pool)
    extras = [hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest() for t in (weights, domains)]
    if soft_targets is not None:
        extras.append(hashlib.sha256(soft_targets.numpy().tobytes()).hexdigest())
    dtype = fast_dtype(cfg.precision, device)
    key = {**training_key(train, cfg, seed=seed), "extras": extras}
    if ssl:
        key["unlabeled"] = unlabeled.fingerprint()
    if synthetic_augment is not None:
        key["synthetic_augment"] = synthetic_augment
    if mass is not None and cfg.loss in ("logit-adjusted", "balanced-softmax"):
        key["prior"] = "weighted"  # the prior counts each image by its weight (before: by one)
    if monitor is not None and monitor_every:
        key["monitor"] = [monitor.fingerprint(), monitor_every]
    checkpoint = Checkpoint(checkpoint_dir, key)
    state = checkpoint.restore(lambda s: s["epoch"] <= (stop_after_epochs or cfg.epochs), **stateful)
    if state is not None:
        history, start_epoch, spent, curve = state["history"], state["epoch"], state["seconds"], state.get("curve", [])

    def loss_of(x, targets, w, cell=None, pool=None):
        """The batch's loss, its labelled logits and the unlabelled part's statistics; with
        `pool` (weak and strong views) FixMatch's unlabelled loss is added, every view through
        one forward pass (batch norm sees them together, as in the paper)."""
        n = len(x)
        with autocast(device, dtype):
            logits = model(x if pool is None else torch.cat([x, *pool]))
        logits, unlabelled = logits[:n].float(), logits[n:]
        if dro is not None:  # the q-weighted mean of the cells' losses
            per_sample = soft_cross_entropy(logits, targets, log_prior=log_prior, tau=tau, weights=w, reduce=False)
            return dro(per_sample, cell), logits, None
        loss = soft_cross_entropy(logits, targets, log_prior=log_prior, tau=tau, weights=w)
        if pool is None:
            return loss, logits, None
        loss_u, _, mask = unlabelled_loss(*unlabelled.chunk(2), threshold, align)
        return loss + cfg.ssl_weight * loss_u, logits, (loss_u.detach(), mask.sum(), len(mask))

    def to_device(x):
        x = send(x, device).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x

    # the images each batch is indexed from: on the GPU when they fit, so indexing and augmentation run there
    # (not with a policy: its operations on a GPU would not be the CPU's arithmetic, so a run would
    # depend on where its batch is)
    specs = [cfg.augment, synthetic_augment or "none", *((cfg.ssl_weak, cfg.ssl_strong) if ssl else ())]
    batchwise = not any(part in POLICIES for spec in specs for part in spec.split("+"))
    images, pool_images = resident(train.images, unlabeled.images if ssl else None, device, cfg.data_on_device and batchwise)

    def score(step: int):
        accuracy = float((predict_logits(kept(), monitor.images).argmax(1) == monitor.labels).float().mean())
        curve.append({"step": step, "accuracy": accuracy})
        model.train()

    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        last_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, stop_after_epochs)
        task = bar.add_task("train classifier", total=last_epoch, completed=min(start_epoch, last_epoch), info="")
        for epoch in range(start_epoch, last_epoch):
            torch.manual_seed(seed * 100_003 + epoch)
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            model.train()
            # the epoch's statistics stay on the device and are read once at its end (a read per step waits for the GPU)
            total_loss, seen = torch.zeros((), dtype=torch.float64, device=device), 0
            correct = torch.zeros((), dtype=torch.int64, device=device)
            epoch_start = time.perf_counter()
            draw = lambda g=g: make_sampler(cfg.sampler, train.labels, train.num_classes, g,  # noqa: E731
                                        cells if balanced_cells else None)
            if ssl:  # a pass over the pool; the labelled batches drawn from as many passes as it takes
                labelled = labelled_batches(draw, steps_per_epoch, cfg.batch_size)
                pool_batches = torch.randperm(len(unlabeled), generator=g).split(pool_batch)
                loss_u, confident, drawn = torch.zeros_like(total_loss), torch.zeros_like(correct), 0
            else:
                labelled, pool_batches = batches(draw(), cfg.batch_size), itertools.repeat(None)
            for idx, pool_idx in zip(labelled, pool_batches):
                x, y, w, dom = images[send(idx, images.device)], train.labels[idx], weights[idx], domains[idx]
                x = x if augment is None else augment(x, dom)
                x, y, w = to_device(x), send(y, device), send(w, device)
                targets = F.one_hot(y, train.num_classes).float() if soft_targets is None else send(soft_targets[idx], device)
                if cfg.label_smoothing:
                    targets = targets * (1 - cfg.label_smoothing) + cfg.label_smoothing / train.num_classes
                if cfg.mix == "domain-mixup" and torch.rand(()) < cfg.mix_prob:
                    x, targets, w = mix_batch(x, targets, w, mode="mixup", alpha=cfg.mix_alpha,
                                              partner=send(cross_domain_partners(dom), device))
                elif cfg.mix != "none" and torch.rand(()) < cfg.mix_prob:
                    x, targets, w = mix_batch(x, targets, w, mode=cfg.mix, alpha=cfg.mix_alpha)
                if drw_epoch is not None and epoch >= drw_epoch:
                    # DRW: the class weight of each (mixed) target, a weighted mean as in the paper's loss
                    class_w = targets @ drw_weights
                    w = w * class_w / class_w.mean()
                if cfg.weight_norm:
                    w = w / w.mean().clamp_min(1e-12)
                pool = None
                if pool_idx is not None:
                    u = pool_images[send(pool_idx, pool_images.device)]
                    pool = [to_device(u if view is None else view(u)) for view in (weak, strong)]
                loss, logits, stats = loss_of(x, targets, w, send(cells[idx], device) if dro is not None else None, pool)
                loss.backward()
                if sam is not None:
                    sam.first_step()
                    loss_of(x, targets, w)[0].backward()
                    sam.second_step()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                if stats is not None:
                    loss_u, confident, drawn = loss_u + stats[0].double() * stats[2], confident + stats[1], drawn + stats[2]
                total_loss += loss.detach().double() * len(y)
                correct += (logits.argmax(1) == targets.argmax(1)).sum()
                seen += len(y)
                if monitor is not None and monitor_every and scheduler.last_epoch % monitor_every == 0:
                    score(scheduler.last_epoch)
            total_loss, correct = float(total_loss), int(correct)
            entry = {"epoch": epoch + 1, "loss": total_loss / seen, "train_acc": correct / seen,
                     "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - epoch_start}
            if ssl:  # the pool's share above the threshold, and its loss (mean per unlabelled image)
                loss_u, confident = float(loss_u), int(confident)
                entry.update(pseudo_labelled=confident / drawn, unlabelled_loss=loss_u / drawn)
            history.append(entry)
            bar.update(task, advance=1, info=f"loss {total_loss / seen:.3f}"
                       + (f", pseudo-labelled {confident / drawn:.0%}" if ssl else ""))
            checkpoint.save({"history": history, "epoch": epoch + 1, "seconds": spent + time.perf_counter() - t0,
                             "curve": curve}, **stateful)
    seconds = spent + time.perf_counter() - t0
    model = kept()
    if monitor is not None and monitor_every and (not curve or curve[-1]["step"] != scheduler.last_epoch):
        score(scheduler.last_epoch)
    result = TrainResult(model.eval(), history, seconds, asdict(cfg), curve, steps=steps_per_epoch * last_epoch)
    if cfg.refit_head:
        t1 = time.perf_counter()
        refit_head(model, train, per_class=cfg.refit_per_class, epochs=cfg.refit_epochs, lr=cfg.refit_lr, seed=seed)
        result.seconds += time.perf_counter() - t1
    return result


def resident(images: torch.Tensor, pool: torch.Tensor | None, device: torch.device,
             allowed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`images` and `pool` (an unlabelled pool, or None) on `device` where that is a CUDA GPU
    with room for both in a quarter of its free memory (`allowed`: train.data_on_device), else
    both as they are."""
    if not allowed or device.type != "cuda":
        return images, pool
    need = images.nbytes + (0 if pool is None else pool.nbytes)
    free, _ = torch.cuda.mem_get_info(device)
    if need > free // 4:
        return images, pool
    return images.to(device), None if pool is None else pool.to(device)


class WeightEMA(AveragedModel):
    """The model's weights and buffers averaged with a decay that warms up as
    min(decay, (1 + n) / (10 + n)) after n updates, so a short run's average is not dominated
    by the initial weights (0.999^2000 still leaves 14% of them). Its state is AveragedModel's;
    its update count stays on the CPU (AveragedModel's own update copies it to the GPU every
    step, which waits for the GPU)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module):
        n = int(self.n_averaged)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        floats = [torch.is_floating_point(t) for t in mine]
        if n == 0:
            torch._foreach_copy_(mine, theirs)
        else:  # counters (batch norm's batches seen) are copied
            d = min(self.decay, (1 + n) / (10 + n))
            torch._foreach_lerp_([a for a, f in zip(mine, floats) if f], [b for b, f in zip(theirs, floats) if f], 1 - d)
            torch._foreach_copy_([a for a, f in zip(mine, floats) if not f], [b for b, f in zip(theirs, floats) if not f])
        self.n_averaged += 1


def labelled_batches(draw, steps: int, batch_size: int) -> list[torch.Tensor]:
    """`steps` batches of `batch_size` labelled indices, from successive passes of the
    sampler `draw()` makes (a labelled set smaller than the steps need is drawn again)."""
    order, need = [], steps * batch_size
    while sum(map(len, order)) < need:
        order.append(torch.as_tensor(list(draw()), dtype=torch.int64))
    return list(torch.cat(order)[:need].split(batch_size))


def extract_features(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features of uint8 images, in eval mode."""
    return infer(model, images, lambda m, x, rows: m.forward_features(x), batch_size=batch_size)


def fit_head(model: Classifier, feats: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
             class_balanced: bool = False, epochs: int = 10, lr: float = 0.05, batch_size: int = 256,
             weight_decay: float = 5e-4, seed: int = 0, min_steps: int = 200, reset: bool = True) -> Classifier:
    """Train the head alone on given features (SGD, cosine schedule; class-balanced loss
    weights with `class_balanced`), at least `min_steps` steps; from a re-initialised head,
    or (`reset=False`) from the trained one."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    class_weight = (counts.sum() / (len(counts) * counts)) if class_balanced else torch.ones_like(counts)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the re-initialised head depends on the seed alone
    if reset:
        model.head.reset_parameters()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(labels) / batch_size)
    epochs = max(epochs, math.ceil(min_steps / steps_per_epoch))
    scheduler = warmup_cosine(optimizer, 0, epochs * steps_per_epoch)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).split(batch_size):
            idx = idx.to(feats.device)
            loss = F.cross_entropy(model.head(feats[idx]), labels[idx], weight=class_weight.to(feats.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


def refit_head(
    model: Classifier,
    data: ImageDataset,
    *,
    per_class: str | int = "all",
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 256,
    weight_decay: float = 5e-4,
    seed: int = 0,
    min_steps: int = 200,
    by_group: bool = False,
) -> Classifier:
    """cRT (Kang et al. 2020): freeze the features, re-initialise the head and train it
    class-balanced. `per_class="all"` uses every image with class-balanced loss weights;
    "min" or a number subsamples each class (with `by_group`, each (class, group) cell) to
    the same count first (SYNAuG's re-fit). Runs `epochs` passes but at least `min_steps`
    steps, so a small re-fit set (8 images per class) still trains the head to convergence."""
    from ..data.splits import class_balanced_subsample

    if by_group and per_class == "all":
        raise SynthaugError("a re-fit balanced by group subsamples the cells: give per_class 'min' or a number")
    if per_class != "all":
        n = None if per_class == "min" else int(per_class)
        data = class_balanced_subsample(data, n, seed=seed, by_group=by_group)
    device = next(model.parameters()).device
    feats = extract_features(model, data.images).to(device)
    fit_head(model, feats, data.labels.to(device), data.num_classes, class_balanced=per_class == "all", epochs=epochs,
             lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed, min_steps=min_steps)
    return model.eval()
