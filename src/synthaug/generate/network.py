"""The embedded generator's parts and settings: the network (a diffusers `UNet2DModel`,
class- and group-conditional, optionally image-conditioned), its training noise schedule and
its samplers (DPM-Solver++, stochastic or not, and DDIM)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, get_args

from ..choices import (
    CbdmDraw,
    ClassSampler,
    FeedbackCriterion,
    GroupGuidance,
    GroupSampler,
    Pairing,
    Precision,
    Preset,
    Sampler,
    check_choices,
)
from ..errors import SynthaugError

# Network sizes. `small` is the size a first trial found good for 28x28 digits on a CPU
# (1.0M parameters, ~0.4-0.6 s per batch of 64 on 2 CPU cores); `tiny` is for tests.
PRESETS = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention=False),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, attention=False),
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32, attention=True),
}
SAMPLERS = get_args(Sampler)
assert set(PRESETS) == set(get_args(Preset)), "choices.Preset names the presets"


@dataclass
class GeneratorConfig:
    """The network and noise schedule: everything `from_pretrained` needs to rebuild it."""

    image_size: int
    channels: int
    classes: list[str]
    num_groups: int = 0  # > 0: also conditioned on a group id (class x group cells)
    preset: Preset = "small"
    block_out_channels: tuple[int, ...] | None = None  # None: from the preset
    layers_per_block: int | None = None
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    label_dropout: float = 0.1  # share of training labels replaced by the null class (for guidance)
    # image conditioning (augmentation-conditioned generation): > 0 adds the embedding of a real
    # image from a fixed encoder of this many dimensions (generate/image_condition.py)
    image_embed_dim: int = 0
    image_dropout: float = 0.1  # share of training images whose image condition alone is dropped (a dropped
    # label drops the image too, so guidance's (null class, null image) branch trains at label_dropout)
    image_pairing: Pairing = "self"  # the conditioning image in training: a shifted view of the image itself, or
    # another image of its class ("class"; then image and condition are independent given the class)
    image_shift: int = 2  # px: the view's random shift ("self" pairing)
    # with groups, how guidance reaches a (class, group) cell. "composed" (synthaug's generators
    # since issue 21): the class and the group are also trained apart, and sampling adds their
    # two guidance directions (composable diffusion, Liu et al. 2022), so a cell with few or no
    # training images (a digit in a colour it rarely has) gets the class's shape and the group's
    # look; "joint": one embedding per cell guides alone (generators saved before)
    group_guidance: GroupGuidance = "joint"

    def __post_init__(self):
        check_choices(self, "generator.")
        if not 8 <= self.image_size <= 64:
            raise SynthaugError(f"the embedded generator handles 8 to 64 px, got {self.image_size}: set data.image_size")
        preset = PRESETS[self.preset]
        self.block_out_channels = tuple(self.block_out_channels or preset["block_out_channels"])
        self.layers_per_block = self.layers_per_block or preset["layers_per_block"]
        if self.image_embed_dim < 0 or not 0 <= self.image_dropout < 1:
            raise SynthaugError("generator image conditioning: image_embed_dim >= 0, image_dropout in [0, 1)")
        if self.group_guidance == "composed" and self.image_embed_dim:
            raise SynthaugError("composed group guidance has no image condition: use group_guidance 'joint' with "
                                "image_embed_dim")
        downsamples = len(self.block_out_channels) - 1
        if self.image_size % (2**downsamples):
            raise SynthaugError(f"image size {self.image_size} is not divisible by {2**downsamples} "
                                f"({downsamples} downsamplings): pick a size like 8, 16, 28, 32 or 64")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def key(self) -> dict:
        """The config as it names a network: image-conditioning fields only when used, so the
        names of generators made before image conditioning existed stay the same."""
        out = asdict(self)
        if not self.image_embed_dim:
            for k in ("image_embed_dim", "image_dropout", "image_pairing", "image_shift"):
                out.pop(k)
        if out["group_guidance"] == "joint":  # as generators were named before the choice existed
            out.pop("group_guidance")
        return out

    @property
    def composed(self) -> bool:
        """Class and group guide as two terms (`group_guidance`), on a group-conditioned network."""
        return self.num_groups > 0 and self.group_guidance == "composed"


def check_levers(settings):
    """The tail levers' values (`GeneratorTrainConfig.ADDED`), on the run config's generator
    section and on the training config alike."""
    if settings.min_snr_gamma < 0 or settings.cbdm_weight < 0 or not 0 <= settings.ema_half_life <= 1:
        raise SynthaugError("generator.min_snr_gamma and generator.cbdm_weight must be >= 0, "
                            "generator.ema_half_life in [0, 1] (0: use generator.ema_decay)")
    if not 0 <= settings.augment <= 1:
        raise SynthaugError(f"generator.augment is a probability in [0, 1] (0: off), got {settings.augment}")
    if settings.cbdm_draw != "frequency" and not settings.cbdm_weight:
        raise SynthaugError("generator.cbdm_draw sets how CBDM draws its other class: set generator.cbdm_weight > 0 "
                            "too, or leave cbdm_draw out")


@dataclass
class GeneratorTrainConfig:
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    unlabeled_share: float = 0.5  # share of each batch drawn from an unlabeled pool, when one is given
    device: str = "auto"
    precision: Precision = "auto"  # bfloat16 autocast (float32 weights and optimiser) where native
    # levers for a long-tailed training set (issue 21), with the values generators had before them:
    # left out of checkpoint keys at those (utils/keys.py)
    ADDED: ClassVar[dict[str, object]] = {"class_sampler": "uniform", "min_snr_gamma": 0.0, "cbdm_weight": 0.0,
                                          "ema_half_life": 0.0, "group_sampler": "uniform", "augment": 0.0,
                                          "cbdm_draw": "frequency"}
    class_sampler: ClassSampler = "uniform"  # how the labelled images are drawn: per image, per sqrt(n_c), per class
    # with groups: how each class's share is split over its (class, group) cells: per image, per sqrt(n_cg),
    # per cell (balanced: a class's minority colours drawn as often as its majority colour)
    group_sampler: GroupSampler = "uniform"
    # > 0: each timestep's loss weighted min(SNR, gamma) / SNR (Hang et al. 2023); 5 since it won on
    # MNIST-5k-LT (BENCHMARKS.md, issue 21); 0: the plain loss
    min_snr_gamma: float = 5.0
    cbdm_weight: float = 0.0  # > 0: CBDM's class-balancing regulariser at this strength tau (Qin et al. 2023)
    # the other class y' it pulls towards: drawn by the training set's class frequencies (the reference code's
    # training) or uniformly over the classes (its fine-tuning), so the tail is pulled towards every class alike
    cbdm_draw: CbdmDraw = "frequency"
    ema_half_life: float = 0.0  # > 0: a constant EMA decay with this half-life, as a share of the steps
    # > 0: non-leaking augmentation (generate/augment.py): each transform applied with this probability and
    # the network told its parameters; sampled untold (CBDM's code: 0.12)
    augment: float = 0.0

    def __post_init__(self):
        check_choices(self, "generator.")
        check_levers(self)

    @property
    def decay(self) -> float:
        """The EMA's decay per step: `ema_decay`, or the one that halves a weight's share in
        `ema_half_life` x `steps` steps."""
        return 0.5 ** (1 / max(1.0, self.ema_half_life * self.steps)) if self.ema_half_life else self.ema_decay



@dataclass
class SamplerConfig:
    sampler: Sampler = "sde-dpm-solver++"
    steps: int = 15
    guidance_scale: float = 3.0  # 1 = no guidance; the null-class branch is skipped then
    # composed (class, group) guidance: the group's term at this scale (None: guidance_scale)
    group_guidance_scale: float | None = None
    batch_size: int = 128
    precision: Precision = "auto"  # the UNet's arithmetic: bfloat16 autocast where native (utils/runtime.fast_dtype)
    # feedback guidance (generate/feedback.py): x_t moved by this share of its norm up the guiding classifier's
    # criterion, every `feedback_every`-th step (0: off)
    feedback: float = 0.0
    feedback_criterion: FeedbackCriterion = "entropy"
    feedback_every: int = 1
    # (low, high): classifier-free guidance only at the steps whose noise level sigma lies in (low, high], the class's
    # prediction alone at the others (Kynkaanniemi et al. 2024; `guided_steps`); None: at every step
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self):
        check_choices(self, "sampling.")
        self.guidance_interval = check_interval(self.guidance_interval, "sampling.guidance_interval")


def check_interval(interval, key: str) -> tuple[float, float] | None:
    """`interval` as (low, high) with 0 <= low < high (high may be inf), or None; else one line."""
    if interval is None:
        return None
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not 0 <= low < high:  # also refuses nan
        raise SynthaugError(f"{key} is two noise levels [low, high] with 0 <= low < high (e.g. [0.28, 5.42]; "
                            f"unset: guidance at every step), got {interval}")
    return low, high


def build_unet(config: GeneratorConfig):
    from diffusers import UNet2DModel

    preset = PRESETS[config.preset]
    n = len(config.block_out_channels)
    attn = preset["attention"]
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attn else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(
        # an image-conditioned UNet also sees the condition decoded back to pixels (extra input channels)
        sample_size=config.image_size, in_channels=config.channels * (2 if config.image_embed_dim else 1),
        out_channels=config.channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=preset["norm_num_groups"],
        add_attention=attn, attention_head_dim=8,
        # one embedding per (class or null) x (group or null) cell; with image conditioning the
        # cell embedding + image embedding is computed outside (ConditionEmbedding) and passed in
        num_class_embeds=None if config.image_embed_dim else (config.num_classes + 1) * (config.num_groups + 1),
        class_embed_type="identity" if config.image_embed_dim else None,
    )


def build_train_scheduler(config: GeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule)


def build_sampler(config: GeneratorConfig, sampler: str):
    """A fast sampler over the training schedule. Measured on MNIST-5k-LT (BENCHMARKS.md):
    the stochastic DPM-Solver++ corrects its own errors and gives clean images where the
    deterministic one leaves a grey, noisy background on part of the samples. DPM-Solver++
    steps are spaced to start at the last training step ("trailing", so the first step sees
    the pure noise it starts from), and the predicted clean image is clipped to the data
    range, which keeps the cosine schedule's near-zero signal at t=999 from blowing up. DDIM
    keeps diffusers' "leading" spacing (first step at 1000 - 1000 // steps), which its
    inverse (`policy.invert_noise`) mirrors step for step."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    train = build_train_scheduler(config).config
    if sampler in ("sde-dpm-solver++", "dpm-solver++"):
        return DPMSolverMultistepScheduler.from_config(
            train, algorithm_type=sampler.replace("-solver", "solver"), timestep_spacing="trailing",
            thresholding=True, sample_max_value=1.0)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train, timestep_spacing="leading", clip_sample=True)
    raise SynthaugError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")


def guided_steps(scheduler, timesteps, interval: tuple[float, float] | None) -> list[bool]:
    """Which of `timesteps` apply classifier-free guidance: every one, or with `interval` (low, high)
    those whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in (low, high]
    (Kynkaanniemi et al. 2024: guided at high noise, the images crowd into a few modes of their class;
    at low noise guidance changes little). At 10 steps of the embedded generator's cosine schedule,
    (0.28, 5.42] leaves the first two steps and the last unguided."""
    import torch

    if interval is None:
        return [True] * len(timesteps)
    low, high = interval
    alpha_bar = scheduler.alphas_cumprod[torch.as_tensor(timesteps).long().cpu()].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    return [low < s <= high for s in sigma.tolist()]
