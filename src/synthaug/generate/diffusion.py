"""The embedded generator: a class-conditional diffusion model trained from scratch on the
user's own images (diffusers `UNet2DModel` + a diffusers noise scheduler), with
classifier-free guidance (labels dropped to a null class in training), EMA weights, and a
fast DPM-Solver++ / DDIM sampler. Each image is drawn from its own seed, so any image can be
regenerated. Training checkpoints and resumes; weights save as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.io import atomic_write_json, load_state, save_state
from ..utils.runtime import progress_bar, resolve_device

# Network sizes. `small` is the size a first trial found good for 28x28 digits on a CPU
# (1.0M parameters, ~0.4-0.6 s per batch of 64 on 2 CPU cores); `tiny` is for tests.
PRESETS = {
    "tiny": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, attention=False),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16, attention=False),
    "base": dict(block_out_channels=(64, 128, 128), layers_per_block=2, norm_num_groups=32, attention=True),
}
SAMPLERS = ("sde-dpm-solver++", "dpm-solver++", "ddim")


@dataclass
class GeneratorConfig:
    """The network and noise schedule: everything `from_pretrained` needs to rebuild it."""

    image_size: int
    channels: int
    classes: list[str]
    num_groups: int = 0  # > 0: also conditioned on a group id (class x group cells)
    preset: str = "small"
    block_out_channels: tuple[int, ...] | None = None  # None: from the preset
    layers_per_block: int | None = None
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    label_dropout: float = 0.1  # share of training labels replaced by the null class (for guidance)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise SynthaugError(f"unknown generator preset '{self.preset}': use one of {', '.join(PRESETS)}")
        if not 8 <= self.image_size <= 64:
            raise SynthaugError(f"the embedded generator handles 8 to 64 px, got {self.image_size}: set data.image_size")
        preset = PRESETS[self.preset]
        self.block_out_channels = tuple(self.block_out_channels or preset["block_out_channels"])
        self.layers_per_block = self.layers_per_block or preset["layers_per_block"]
        downsamples = len(self.block_out_channels) - 1
        if self.image_size % (2**downsamples):
            raise SynthaugError(f"image size {self.image_size} is not divisible by {2**downsamples} "
                                f"({downsamples} downsamplings): pick a size like 8, 16, 28, 32 or 64")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class GeneratorTrainConfig:
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    device: str = "auto"


@dataclass
class SamplerConfig:
    sampler: str = field(default="sde-dpm-solver++", metadata={"choices": SAMPLERS})
    steps: int = 15
    guidance_scale: float = 3.0  # 1 = no guidance; the null-class branch is skipped then
    batch_size: int = 128


def build_unet(config: GeneratorConfig):
    from diffusers import UNet2DModel

    preset = PRESETS[config.preset]
    n = len(config.block_out_channels)
    attn = preset["attention"]
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D" if attn else "DownBlock2D"]
    up = ["AttnUpBlock2D" if attn else "UpBlock2D"] + ["UpBlock2D"] * (n - 1)
    return UNet2DModel(
        sample_size=config.image_size, in_channels=config.channels, out_channels=config.channels,
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=preset["norm_num_groups"],
        add_attention=attn, attention_head_dim=8,
        # one embedding per (class or null) x (group or null) cell
        num_class_embeds=(config.num_classes + 1) * (config.num_groups + 1),
    )


def build_train_scheduler(config: GeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule)


def build_sampler(config: GeneratorConfig, sampler: str):
    """A fast sampler over the training schedule. Measured on MNIST-5k-LT (BENCHMARKS.md):
    the stochastic DPM-Solver++ corrects its own errors and gives clean images where the
    deterministic one leaves a grey, noisy background on part of the samples. Steps are
    spaced to start at the last training step ("trailing", so the first step sees the pure
    noise it starts from), and the predicted clean image is clipped to the data range,
    which keeps the cosine schedule's near-zero signal at t=999 from blowing up."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    train = build_train_scheduler(config).config
    if sampler in ("sde-dpm-solver++", "dpm-solver++"):
        return DPMSolverMultistepScheduler.from_config(
            train, algorithm_type=sampler.replace("-solver", "solver"), timestep_spacing="trailing",
            thresholding=True, sample_max_value=1.0)
    if sampler == "ddim":
        return DDIMScheduler.from_config(train, timestep_spacing="leading", clip_sample=True)
    raise SynthaugError(f"unknown sampler '{sampler}': use one of {', '.join(SAMPLERS)}")


class DiffusionGenerator:
    """Class- (and group-) conditional diffusion model. `fit` trains it on an ImageDataset,
    `generate` draws images for given labels and per-image seeds."""

    def __init__(self, config: GeneratorConfig, unet=None):
        self.config = config
        self.unet = unet if unet is not None else build_unet(config)
        self.history: list[dict] = []
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ conditioning
    def condition_ids(self, labels: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding index of each (class, group) cell; `num_classes` / `num_groups` mean null."""
        g = self.config.num_groups
        groups = torch.full_like(labels, g) if groups is None or g == 0 else groups
        return labels * (g + 1) + groups

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, data: ImageDataset, config: GeneratorConfig | None = None, train: GeneratorTrainConfig | None = None,
            *, seed: int = 0, checkpoint_dir: str | Path | None = None, progress: bool = False) -> DiffusionGenerator:
        config = config or GeneratorConfig(image_size=data.image_size[0], channels=data.channels, classes=data.classes)
        if (config.image_size, config.image_size) != tuple(data.image_size) or config.channels != data.channels:
            raise SynthaugError(f"generator is {config.channels}x{config.image_size}px but the data is "
                                f"{data.channels}x{data.image_size[0]}x{data.image_size[1]}: set data.image_size")
        torch.manual_seed(seed)
        gen = cls(config)
        gen.train(data, train or GeneratorTrainConfig(), seed=seed, checkpoint_dir=checkpoint_dir, progress=progress)
        return gen

    def train(self, data: ImageDataset, cfg: GeneratorTrainConfig, *, seed: int = 0,
              checkpoint_dir: str | Path | None = None, progress: bool = False):
        """The denoising objective: predict the noise added at a random timestep. Each step
        draws its batch, noise and timesteps from a generator seeded by (seed, step), so a
        resumed run continues exactly where it stopped."""
        from diffusers.training_utils import EMAModel

        if int((data.labels < 0).sum()):
            raise SynthaugError("the generator trains on labelled images: drop the unlabeled pool or label it")
        device = resolve_device(cfg.device)
        unet = self.unet.to(device).train()
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        noise_scheduler = build_train_scheduler(self.config)
        images = data.images.float().div(127.5).sub(1.0)  # [-1, 1]
        labels = data.labels
        groups = data.groups if (self.config.num_groups and data.groups is not None) else None

        start, history, spent = 0, [], 0.0
        # a checkpoint is resumed only by the same training (network, settings, seed, data size)
        train_settings = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "device")}
        run_key = json.dumps({"config": asdict(self.config), "train": train_settings, "seed": seed, "images": len(labels)})
        state = load_state(checkpoint_dir) if checkpoint_dir else None
        if state is not None and state.get("run_key") == run_key:
            unet.load_state_dict(state["unet"])
            ema.load_state_dict(state["ema"])
            ema.to(device)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            start, history, spent = state["step"], state["history"], state["seconds"]

        t0, window = time.perf_counter(), []
        with progress_bar(progress) as bar:
            task = bar.add_task("train generator", total=cfg.steps, completed=start, info="")
            for step in range(start, cfg.steps):
                g = torch.Generator().manual_seed(seed * 1_000_003 + step)
                idx = torch.randint(len(labels), (cfg.batch_size,), generator=g)
                x0 = images[idx].to(device)
                cond_labels = labels[idx].clone()
                drop = torch.rand(len(idx), generator=g) < self.config.label_dropout
                cond_labels[drop] = self.null_class
                # the group is dropped on its own too, so (class, any group) cells are trained
                drop_group = drop | (torch.rand(len(idx), generator=g) < self.config.label_dropout)
                cond_groups = None if groups is None else torch.where(drop_group, self.config.num_groups, groups[idx])
                cond = self.condition_ids(cond_labels, cond_groups).to(device)
                noise = torch.randn(x0.shape, generator=g).to(device)
                t = torch.randint(self.config.num_train_timesteps, (len(idx),), generator=g).to(device)
                noisy = noise_scheduler.add_noise(x0, noise, t)
                loss = F.mse_loss(unet(noisy, t, class_labels=cond).sample, noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                ema.step(unet.parameters())
                window.append(float(loss.detach()))
                done = step + 1
                if done % 50 == 0 or done == cfg.steps:
                    history.append({"step": done, "loss": sum(window) / len(window)})
                    window = []
                    bar.update(task, completed=done, info=f"loss {history[-1]['loss']:.4f}")
                if checkpoint_dir and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    save_state(checkpoint_dir, {
                        "unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": done, "history": history,
                        "seconds": spent + time.perf_counter() - t0, "run_key": run_key,
                    })
        ema.copy_to(unet.parameters())  # sample with the EMA weights
        self.unet = unet.eval()
        self.history = history
        self.train_seconds = spent + time.perf_counter() - t0
        return self

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, progress: bool = False) -> torch.Tensor:
        """uint8 images (N, C, H, W), image i drawn from initial noise seeded by `seeds[i]`:
        the same (label, group, seed, sampler settings) gives the same image again.

        With `init_images` (uint8, one per label), image-guided generation (SDEdit): each
        real image is noised to `strength` (0 < strength <= 1, one value or one per image;
        the share of the sampler's steps that are run) and denoised under its label."""
        sc = sampler or SamplerConfig()
        labels = torch.as_tensor(labels, dtype=torch.int64)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(labels):
            raise ValueError("one seed per image")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
            raise SynthaugError(f"labels must be in [0, {self.config.num_classes}) for this generator")
        groups = None if groups is None else torch.as_tensor(groups, dtype=torch.int64)
        if groups is not None and len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= max(1, self.config.num_groups)):
            raise SynthaugError(f"groups must be in [0, {self.config.num_groups}) for this generator")
        c, s = self.config.channels, self.config.image_size
        # first sampler step of each image: 0 from pure noise, later for image-guided generation
        starts = torch.zeros(len(labels), dtype=torch.int64)
        if init_images is not None:
            if init_images.dtype != torch.uint8 or tuple(init_images.shape) != (len(labels), c, s, s):
                raise SynthaugError(f"init_images must be uint8 of shape ({len(labels)}, {c}, {s}, {s}), "
                                    f"got {init_images.dtype} {tuple(init_images.shape)}")
            strength = torch.as_tensor(strength, dtype=torch.float64).expand(len(labels))
            if len(strength) and not bool(((strength > 0) & (strength <= 1)).all()):
                raise SynthaugError("strength must be in (0, 1]: the share of the sampling steps run from the noised image")
            starts = sc.steps - (strength * sc.steps).round().long().clamp(min=1)
        out = torch.empty(len(labels), c, s, s, dtype=torch.uint8)
        with progress_bar(progress) as bar:
            task = bar.add_task("generate", total=len(labels), info="")
            for i in range(0, len(labels), sc.batch_size):
                batch = torch.arange(i, min(i + sc.batch_size, len(labels)))
                for start in starts[batch].unique().tolist():  # images starting at the same step go together
                    idx = batch[starts[batch] == start]
                    out[idx] = self._sample_batch(
                        labels[idx], [seeds[j] for j in idx], None if groups is None else groups[idx], sc,
                        init=None if init_images is None else init_images[idx], start=start)
                bar.advance(task, len(batch))
        return out

    def generate_rows(self, rows: list[dict], sampler: SamplerConfig | None = None,
                      sources: ImageDataset | None = None) -> torch.Tensor:
        """Images for plan rows (`label`, `seed`, optional `group`; image-guided rows also
        `source`, an index into `sources`, and `strength`): what a store's `fill` calls."""
        groups = [r["group"] for r in rows] if rows and rows[0].get("group") is not None else None
        guided = bool(rows) and rows[0].get("source") is not None
        if guided and sources is None:
            raise SynthaugError("these plan rows are image-guided: pass the dataset their `source` indices point into")
        return self.generate([r["label"] for r in rows], [r["seed"] for r in rows], groups=groups, sampler=sampler,
                             init_images=sources.images[[r["source"] for r in rows]] if guided else None,
                             strength=[r["strength"] for r in rows] if guided else 1.0)

    def _sample_batch(self, labels, seeds, groups, sc: SamplerConfig, init=None, start: int = 0) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        c, s = self.config.channels, self.config.image_size
        # one random stream per image (its initial noise, then a stochastic sampler's noise),
        # so an image does not depend on the batch it was drawn in
        streams = [torch.Generator().manual_seed(sd) for sd in seeds]
        x = torch.stack([torch.randn(c, s, s, generator=g) for g in streams]).to(device)
        cond = self.condition_ids(labels, groups).to(device)
        guided = sc.guidance_scale != 1.0
        if guided:
            null_groups = None if groups is None else torch.full_like(groups, self.config.num_groups)
            uncond = self.condition_ids(torch.full_like(labels, self.null_class), null_groups).to(device)
        scheduler = build_sampler(self.config, sc.sampler)
        scheduler.set_timesteps(sc.steps)
        timesteps = scheduler.timesteps[start:]
        if init is None:
            x = x * scheduler.init_noise_sigma
        else:  # SDEdit: the real image noised to the first timestep run, as diffusers' img2img does
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            x = scheduler.add_noise(init.to(device).float() / 127.5 - 1, x, timesteps[:1].repeat(len(x)))
        for t in timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if guided:
                eps_cond, eps_uncond = self.unet(torch.cat([model_in, model_in]), t,
                                                 class_labels=torch.cat([cond, uncond])).sample.chunk(2)
                eps = eps_uncond + sc.guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = self.unet(model_in, t, class_labels=cond).sample
            x = scheduler.step(eps, t, x, generator=streams).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        """A short hash of config and weights: names what generated an image."""
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        for k, v in sorted(self.unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save_pretrained(self, folder: str | os.PathLike):
        """`generator.json` + `unet/` (diffusers config.json + safetensors weights)."""
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        atomic_write_json(folder / "generator.json", {
            "config": asdict(self.config), "history": self.history, "train_seconds": self.train_seconds,
            "fingerprint": self.fingerprint(),
        })

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "auto") -> DiffusionGenerator:
        from diffusers import UNet2DModel

        folder = Path(folder)
        for f in ("generator.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
            if not (folder / f).exists():
                raise SynthaugError(f"generator folder '{folder}' has no {f}: point at a folder written by save_pretrained")
        meta = json.loads((folder / "generator.json").read_text())
        config = GeneratorConfig(**meta["config"])
        try:
            unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
        except Exception as e:
            raise SynthaugError(f"cannot load the generator in '{folder}' ({str(e).splitlines()[0]}): retrain it") from None
        gen = cls(config, unet.to(resolve_device(device)).eval())
        gen.history, gen.train_seconds = meta.get("history", []), meta.get("train_seconds", 0.0)
        return gen

    def check_compatible(self, data: ImageDataset):
        """Raise if this generator cannot make images for `data` (classes, channels, size)."""
        c = self.config
        if c.classes != data.classes:
            raise SynthaugError(f"the generator knows classes {c.classes[:5]}..., the data has {data.classes[:5]}...: "
                                "train a generator on this data")
        if c.channels != data.channels or (c.image_size, c.image_size) != tuple(data.image_size):
            raise SynthaugError(f"the generator makes {c.channels}x{c.image_size}px images, the data is "
                                f"{data.channels}x{data.image_size[0]}px: set data.image_size / data.channels to match")


def parameter_count(gen: DiffusionGenerator) -> int:
    return sum(p.numel() for p in gen.unet.parameters())
