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
from .image_condition import (
    PAIRINGS,
    ConditionEmbedding,
    PCAEncoder,
    condition_embeddings,
    random_shift,
)

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
    # image conditioning (augmentation-conditioned generation): > 0 adds the embedding of a real
    # image from a fixed encoder of this many dimensions (generate/image_condition.py)
    image_embed_dim: int = 0
    image_dropout: float = 0.1  # share of training images whose image condition alone is dropped (a dropped
    # label drops the image too, so guidance's (null class, null image) branch trains at label_dropout)
    image_pairing: str = "self"  # the conditioning image in training: a shifted view of the image itself, or
    # another image of its class ("class"; then image and condition are independent given the class)
    image_shift: int = 2  # px: the view's random shift ("self" pairing)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise SynthaugError(f"unknown generator preset '{self.preset}': use one of {', '.join(PRESETS)}")
        if not 8 <= self.image_size <= 64:
            raise SynthaugError(f"the embedded generator handles 8 to 64 px, got {self.image_size}: set data.image_size")
        preset = PRESETS[self.preset]
        self.block_out_channels = tuple(self.block_out_channels or preset["block_out_channels"])
        self.layers_per_block = self.layers_per_block or preset["layers_per_block"]
        if self.image_embed_dim < 0 or not 0 <= self.image_dropout < 1 or self.image_pairing not in PAIRINGS:
            raise SynthaugError(f"generator image conditioning: image_embed_dim >= 0, image_dropout in [0, 1) and "
                                f"image_pairing one of {', '.join(PAIRINGS)}")
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
        return out


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


def row_kind(row: dict) -> str:
    return "conditioned" if row.get("sources") is not None else "guided" if row.get("source") is not None else "plain"


def split_by_kind(rows: list[dict], make) -> torch.Tensor | None:
    """When `rows` mix kinds (plain, image-guided, image-conditioned), their images made kind
    by kind with `make(rows)` and put back in row order; None when they are of one kind."""
    kinds = [row_kind(r) for r in rows]
    if len(set(kinds)) < 2:
        return None
    out = None
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        images = make([rows[i] for i in idx])
        if out is None:
            out = torch.empty(len(rows), *images.shape[1:], dtype=images.dtype)
        out[idx] = images
    return out


def generate_arguments(rows: list[dict], sources: ImageDataset | None, encoder) -> dict:
    """`generate`'s arguments for plan rows of one kind: labels, seeds and groups; the source
    images and strengths of image-guided rows; the conditioning embeddings (from `encoder`)
    of image-conditioned rows."""
    guided = bool(rows) and rows[0].get("source") is not None
    conditioned = bool(rows) and rows[0].get("sources") is not None
    if (guided or conditioned) and sources is None:
        raise SynthaugError("these plan rows start from real images: pass the dataset their source indices point into")
    embeds = keep = None
    if conditioned:
        pairs = torch.tensor([r["sources"] for r in rows])
        embeds, keep = condition_embeddings(encoder, sources.images[pairs[:, 0]], sources.images[pairs[:, 1]],
                                            [r["conditioning"] for r in rows], [r["seed"] for r in rows],
                                            dropout=rows[0].get("dropout", 0.3))
    return {"labels": [r["label"] for r in rows], "seeds": [r["seed"] for r in rows],
            "groups": [r["group"] for r in rows] if rows and rows[0].get("group") is not None else None,
            "init_images": sources.images[[r["source"] for r in rows]] if guided else None,
            "strength": [r["strength"] for r in rows] if guided else 1.0, "image_embeds": embeds, "image_keep": keep}


class DiffusionGenerator:
    """Class- (and group-) conditional diffusion model. `fit` trains it on an ImageDataset,
    `generate` draws images for given labels and per-image seeds."""

    kind = "embedded"

    def __init__(self, config: GeneratorConfig, unet=None):
        self.config = config
        self.unet = unet if unet is not None else build_unet(config)
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.condition = self.encoder = None
        if config.image_embed_dim:
            cells = (config.num_classes + 1) * (config.num_groups + 1)
            self.condition = ConditionEmbedding(cells, config.image_embed_dim, config.block_out_channels[0] * 4)
            self.encoder = PCAEncoder(config.channels * config.image_size**2, config.image_embed_dim)

    def networks(self) -> list[torch.nn.Module]:
        return [self.unet] + ([self.condition] if self.condition is not None else [])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for net in self.networks() for p in net.parameters()]

    def class_input(self, cells: torch.Tensor, image_embeds: torch.Tensor | None = None,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
        """What the UNet takes as `class_labels`: cell ids, or with image conditioning the
        condition vectors (no image embedding: the null image)."""
        if self.condition is None:
            return cells
        return self.condition(cells, image_embeds, keep)

    def condition_map(self, n: int, image_embeds: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                       device=None) -> torch.Tensor | None:
        """The image condition decoded back to pixels (the encoder's low-rank reconstruction,
        zeros for the null image), given to an image-conditioned UNet as extra input channels:
        through the timestep embedding alone a condition can only shift whole channels, so
        the network would learn the class from it but hardly the image's shape."""
        if self.condition is None:
            return None
        c, s = self.config.channels, self.config.image_size
        if image_embeds is None:
            return torch.zeros(n, c, s, s, device=device)
        maps = self.encoder.decode(image_embeds.to(self.encoder.mean.device)).reshape(n, c, s, s).clamp(-1, 1)
        if keep is not None:
            maps = maps * keep.to(maps.device)[:, None, None, None]
        return maps.to(device)

    def predict_noise(self, x: torch.Tensor, t, class_input: torch.Tensor, condition_map: torch.Tensor | None) -> torch.Tensor:
        """The UNet's noise prediction (the condition map, if any, joins the input channels)."""
        if condition_map is not None:
            x = torch.cat([x, condition_map], dim=1)
        return self.unet(x, t, class_labels=class_input).sample

    # ------------------------------------------------------------------ conditioning
    def condition_ids(self, labels: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding index of each (class, group) cell; `num_classes` / `num_groups` mean null."""
        g = self.config.num_groups
        groups = torch.full_like(labels, g) if groups is None or g == 0 else groups
        return labels * (g + 1) + groups

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """The shape of one image's initial noise."""
        return (self.config.channels, self.config.image_size, self.config.image_size)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    @property
    def image_embed_dim(self) -> int:
        """Dimensions of the image condition (0: class-conditional only)."""
        return self.config.image_embed_dim

    # ------------------------------------------------------------------ UtilGen's policy handles (policy.py, dpo.py)
    def embedding_table(self) -> torch.nn.Embedding:
        """The table whose rows are the (class, group) cells' vectors."""
        return self.condition.cells if self.condition is not None else self.unet.class_embedding

    def policy_embeddings(self) -> torch.Tensor:
        """The vectors the instance-level policy moves: the cells' embedding table."""
        return self.embedding_table().weight

    def optimise_policy_embeddings(self, images: torch.Tensor, labels: torch.Tensor, **options) -> dict:
        """Textual inversion of the class vectors on high-utility images (`policy.optimise_class_embeddings`)."""
        from .policy import optimise_class_embeddings

        return optimise_class_embeddings(self, images, labels, **options)

    def invert_noise(self, images: torch.Tensor, labels, **options) -> torch.Tensor:
        """DDIM inversion of images to their initial noise (`policy.invert_noise`)."""
        from .policy import invert_noise

        return invert_noise(self, images, labels, **options)

    def finetune_dpo(self, preferred: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, **options) -> list[dict]:
        """Diffusion-DPO on (preferred, rejected) pairs of a class (`dpo.finetune_dpo`)."""
        from .dpo import finetune_dpo

        return finetune_dpo(self, preferred, rejected, labels, **options)

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, data: ImageDataset, config: GeneratorConfig | None = None, train: GeneratorTrainConfig | None = None,
            *, seed: int = 0, checkpoint_dir: str | Path | None = None, progress: bool = False,
            unlabeled: ImageDataset | None = None) -> DiffusionGenerator:
        """A generator trained on `data`; with `unlabeled` (a pool of unlabelled images of the
        same kind), also on those under the null class (see `train`)."""
        config = config or GeneratorConfig(image_size=data.image_size[0], channels=data.channels, classes=data.classes)
        for ds in (data, unlabeled):
            if ds is not None and ((config.image_size, config.image_size) != tuple(ds.image_size) or config.channels != ds.channels):
                raise SynthaugError(f"generator is {config.channels}x{config.image_size}px but the data is "
                                    f"{ds.channels}x{ds.image_size[0]}x{ds.image_size[1]}: set data.image_size")
        torch.manual_seed(seed)
        gen = cls(config)
        if gen.encoder is not None:  # the fixed image encoder, fitted once on every training image
            pool = data.images if unlabeled is None else torch.cat([data.images, unlabeled.images])
            gen.encoder.fit(pool, seed=seed)
        gen.train(data, train or GeneratorTrainConfig(), seed=seed, checkpoint_dir=checkpoint_dir, progress=progress,
                  unlabeled=unlabeled)
        return gen

    def train(self, data: ImageDataset, cfg: GeneratorTrainConfig, *, seed: int = 0,
              checkpoint_dir: str | Path | None = None, progress: bool = False, unlabeled: ImageDataset | None = None):
        """The denoising objective: predict the noise added at a random timestep. Each step
        draws its batch, noise and timesteps from a generator seeded by (seed, step), so a
        resumed run continues exactly where it stopped.

        `unlabeled` images train under the null class and make up `cfg.unlabeled_share` of
        each batch: the generator learns what images of this kind look like from the pool and
        what each class looks like from the few labelled images (the few-shot protocol's
        stand-in for a generator pretrained on the world's images).
        With image conditioning, each image is denoised given the embedding of a shifted view
        of itself (or of another image of its class), dropped at `image_dropout`."""
        from diffusers.training_utils import EMAModel

        if int((data.labels < 0).sum()):
            raise SynthaugError("the generator trains on labelled images: pass the unlabeled pool as `unlabeled`")
        device = resolve_device(cfg.device)
        nets = [net.to(device).train() for net in self.networks()]
        unet = nets[0]
        params = self.trainable_parameters()
        ema = EMAModel(params, decay=cfg.ema_decay)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
        noise_scheduler = build_train_scheduler(self.config)
        images = data.images
        labels = data.labels
        groups = data.groups if (self.config.num_groups and data.groups is not None) else None
        n_labelled, n_pool = len(labels), 0 if unlabeled is None else len(unlabeled)
        if n_pool:
            images = torch.cat([images, unlabeled.images])
            labels = torch.cat([labels, torch.full((n_pool,), self.null_class)])
            groups = None if groups is None else torch.cat([groups, torch.full((n_pool,), self.config.num_groups)])
        images = images.float().div(127.5).sub(1.0)  # [-1, 1]
        by_class = [torch.nonzero(data.labels == c).flatten() for c in range(self.config.num_classes)]

        start, history, spent = 0, [], 0.0
        # a checkpoint is resumed only by the same training (network, settings, seed, data size)
        train_settings = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "device")}
        if not n_pool:
            train_settings.pop("unlabeled_share")
        key = {"config": self.config.key(), "train": train_settings, "seed": seed, "data": data.fingerprint()}
        if n_pool:
            key["unlabeled"] = unlabeled.fingerprint()
        run_key = json.dumps(key)
        state = load_state(checkpoint_dir) if checkpoint_dir else None
        if state is not None and state.get("run_key") == run_key:
            unet.load_state_dict(state["unet"])
            if self.condition is not None:
                self.condition.load_state_dict(state["condition"])
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
                if n_pool:
                    from_pool = torch.rand(cfg.batch_size, generator=g) < cfg.unlabeled_share
                    idx = torch.where(from_pool, n_labelled + torch.randint(n_pool, (cfg.batch_size,), generator=g),
                                      torch.randint(n_labelled, (cfg.batch_size,), generator=g))
                else:
                    idx = torch.randint(n_labelled, (cfg.batch_size,), generator=g)
                x0 = images[idx].to(device)
                cond_labels = labels[idx].clone()
                drop = torch.rand(len(idx), generator=g) < self.config.label_dropout
                cond_labels[drop] = self.null_class
                # the group is dropped on its own too, so (class, any group) cells are trained
                drop_group = drop | (torch.rand(len(idx), generator=g) < self.config.label_dropout)
                cond_groups = None if groups is None else torch.where(drop_group, self.config.num_groups, groups[idx])
                cond = self.condition_ids(cond_labels, cond_groups).to(device)
                embeds = keep = None
                if self.condition is not None:
                    embeds, keep = self._training_image_condition(images, idx, labels, by_class, g)
                    # guidance contrasts (class, image) with (null, null): a dropped label drops the
                    # image too, so that pair is trained as often as a dropped label
                    keep = keep & ~drop
                    embeds, keep = embeds.to(device), keep.to(device)
                noise = torch.randn(x0.shape, generator=g).to(device)
                t = torch.randint(self.config.num_train_timesteps, (len(idx),), generator=g).to(device)
                noisy = noise_scheduler.add_noise(x0, noise, t)
                cond_map = self.condition_map(len(idx), embeds, keep, device=device)
                loss = F.mse_loss(self.predict_noise(noisy, t, self.class_input(cond, embeds, keep), cond_map), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                ema.step(params)
                window.append(float(loss.detach()))
                done = step + 1
                if done % 50 == 0 or done == cfg.steps:
                    history.append({"step": done, "loss": sum(window) / len(window)})
                    window = []
                    bar.update(task, completed=done, info=f"loss {history[-1]['loss']:.4f}")
                if checkpoint_dir and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                    state = {
                        "unet": unet.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "step": done, "history": history,
                        "seconds": spent + time.perf_counter() - t0, "run_key": run_key,
                    }
                    if self.condition is not None:
                        state["condition"] = self.condition.state_dict()
                    save_state(checkpoint_dir, state)
        ema.copy_to(params)  # sample with the EMA weights
        for net in nets:
            net.eval()
        self.history = history
        self.train_seconds = spent + time.perf_counter() - t0
        return self

    def _training_image_condition(self, images, idx, labels, by_class, g) -> tuple[torch.Tensor, torch.Tensor]:
        """Each training image's conditioning embedding (a shifted view of itself, or another
        labelled image of its class) and whether it is kept (dropped at `image_dropout`)."""
        partner = idx.clone()
        if self.config.image_pairing == "class":
            for i, c in enumerate(labels[idx].tolist()):
                if c != self.null_class:  # pool images have no class: they pair with themselves
                    members = by_class[c]
                    partner[i] = members[torch.randint(len(members), (1,), generator=g)]
        view = random_shift(images[partner], self.config.image_shift, g)
        keep = torch.rand(len(idx), generator=g) >= self.config.image_dropout
        return self.encoder(view), keep

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, image_embeds: torch.Tensor | None = None,
                 image_keep: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 progress: bool = False) -> torch.Tensor:
        """uint8 images (N, C, H, W), image i drawn from initial noise seeded by `seeds[i]`:
        the same (label, group, seed, sampler settings) gives the same image again.

        With `init_images` (uint8, one per label), image-guided generation (SDEdit): each
        real image is noised to `strength` (0 < strength <= 1, one value or one per image;
        the share of the sampler's steps that are run) and denoised under its label.

        An image-conditioned generator takes `image_embeds` (N, image_embed_dim), e.g. from
        `image_condition.condition_embeddings`, and `image_keep` (False: the null image);
        without them it generates from the class alone. Guidance contrasts (class, image)
        with (null class, null image).

        `noise` (N, C, H, W) replaces the initial noise drawn from the seeds (UtilGen's
        optimised initial noise); a stochastic sampler still draws its later noise from them."""
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
        if noise is not None and tuple(noise.shape) != (len(labels), self.config.channels, self.config.image_size,
                                                         self.config.image_size):
            raise SynthaugError(f"noise must be ({len(labels)}, C, H, W) like the images, got {tuple(noise.shape)}")
        if image_embeds is not None:
            if self.condition is None:
                raise SynthaugError("this generator is not image-conditioned: train one with image_embed_dim > 0 (recipe augcond does)")
            if tuple(image_embeds.shape) != (len(labels), self.config.image_embed_dim):
                raise SynthaugError(f"image_embeds must be ({len(labels)}, {self.config.image_embed_dim}), "
                                    f"got {tuple(image_embeds.shape)}")
            if image_keep is None:
                image_keep = torch.ones(len(labels), dtype=torch.bool)
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
                        init=None if init_images is None else init_images[idx], start=start,
                        image=None if image_embeds is None else (image_embeds[idx], image_keep[idx]),
                        noise=None if noise is None else noise[idx])
                bar.advance(task, len(batch))
        return out

    def variants(self, images: torch.Tensor, labels, strengths, seed: int = 0,
                 sampler: SamplerConfig | None = None) -> torch.Tensor:
        """Image-guided variants of each image at several strengths, in one call: uint8
        (N, len(strengths), C, H, W). Variant (i, j) is drawn from seed `seed + i * len(strengths) + j`."""
        n, k = len(images), len(strengths)
        out = self.generate(torch.as_tensor(labels).repeat_interleave(k), [seed + i for i in range(n * k)], sampler=sampler,
                            init_images=images.repeat_interleave(k, dim=0), strength=list(strengths) * n)
        return out.reshape(n, k, *out.shape[1:])

    def generate_rows(self, rows: list[dict], sampler: SamplerConfig | None = None,
                      sources: ImageDataset | None = None) -> torch.Tensor:
        """Images for plan rows (`label`, `seed`, optional `group`): what a store's `fill`
        calls. Image-guided rows also have `source` (an index into `sources`) and `strength`;
        image-conditioned rows `sources` (two indices into `sources`, same class) and a
        conditioning mode in `conditioning` (see `image_condition.OPERATORS`). Rows of
        different kinds may come mixed."""
        mixed = split_by_kind(rows, lambda part: self.generate_rows(part, sampler, sources))
        if mixed is not None:
            return mixed
        if rows and rows[0].get("sources") is not None and self.encoder is None:
            raise SynthaugError("these plan rows need image conditioning but this generator is not image-conditioned: "
                                "train one with image_embed_dim > 0 (recipe augcond does)")
        return self.generate(**generate_arguments(rows, sources, self.encoder), sampler=sampler)

    def _sample_batch(self, labels, seeds, groups, sc: SamplerConfig, init=None, start: int = 0,
                      image=None, noise=None) -> torch.Tensor:
        device = next(self.unet.parameters()).device
        c, s = self.config.channels, self.config.image_size
        # one random stream per image (its initial noise, then a stochastic sampler's noise),
        # so an image does not depend on the batch it was drawn in
        streams = [torch.Generator().manual_seed(sd) for sd in seeds]
        x = torch.stack([torch.randn(c, s, s, generator=g) for g in streams]).to(device)
        if noise is not None:
            x = noise.to(device, x.dtype)
        embeds, keep = (None, None) if image is None else (image[0].to(device), image[1].to(device))
        cond = self.class_input(self.condition_ids(labels, groups).to(device), embeds, keep)
        cond_map = self.condition_map(len(labels), embeds, keep, device=device)
        guided = sc.guidance_scale != 1.0
        if guided:
            null_groups = None if groups is None else torch.full_like(groups, self.config.num_groups)
            uncond = self.class_input(self.condition_ids(torch.full_like(labels, self.null_class), null_groups).to(device))
            both = None if cond_map is None else torch.cat([cond_map, torch.zeros_like(cond_map)])
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
                eps_cond, eps_uncond = self.predict_noise(torch.cat([model_in, model_in]), t, torch.cat([cond, uncond]),
                                                 both).chunk(2)
                eps = eps_uncond + sc.guidance_scale * (eps_cond - eps_uncond)
            else:
                eps = self.predict_noise(model_in, t, cond, cond_map)
            x = scheduler.step(eps, t, x, generator=streams).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    # ------------------------------------------------------------------ persistence
    def fingerprint(self) -> str:
        """A short hash of config and weights: names what generated an image."""
        h = hashlib.sha256(json.dumps(self.config.key(), sort_keys=True).encode())
        for k, v in sorted(self._state().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _state(self) -> dict[str, torch.Tensor]:
        """Every weight: the UNet's, then (image conditioning) the condition embedding's and
        the fixed encoder's under `condition.` / `encoder.`."""
        state = dict(self.unet.state_dict())
        if self.condition is not None:
            state.update({f"condition.{k}": v for k, v in self.condition.state_dict().items()})
            state.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        return state

    def save_pretrained(self, folder: str | os.PathLike):
        """`generator.json` + `unet/` (diffusers config.json + safetensors weights), and with
        image conditioning `image_condition.safetensors` (condition embedding + encoder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if self.condition is not None:
            extra = {k: v.detach().cpu().contiguous() for k, v in self._state().items() if k.split(".")[0] in ("condition", "encoder")}
            tmp = folder / ".image_condition.safetensors.tmp"
            save_file(extra, tmp)
            os.replace(tmp, folder / "image_condition.safetensors")
        atomic_write_json(folder / "generator.json", {
            "config": self.config.key(), "history": self.history, "train_seconds": self.train_seconds,
            "fingerprint": self.fingerprint(),
        })

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "auto") -> DiffusionGenerator:
        from diffusers import UNet2DModel

        folder = Path(folder)
        for f in ("generator.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
            if not (folder / f).exists():
                raise SynthaugError(f"generator folder '{folder}' has no {f}: point at a folder written by save_pretrained")
        try:
            meta = json.loads((folder / "generator.json").read_text())
            config = GeneratorConfig(**meta["config"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise SynthaugError(f"generator folder '{folder}': generator.json is not a generator config "
                                f"({type(e).__name__}: {str(e).splitlines()[0]}): delete the folder and retrain, or "
                                "point at a folder written by save_pretrained") from None
        try:
            unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
        except Exception as e:
            raise SynthaugError(f"cannot load the generator in '{folder}' ({str(e).splitlines()[0]}): retrain it") from None
        expected = config.channels * (2 if config.image_embed_dim else 1)  # + the decoded condition map
        if unet.config.in_channels != expected:
            raise SynthaugError(f"the UNet in '{folder}' takes {unet.config.in_channels} input channels, this generator "
                                f"needs {expected} (saved by an older synthaug?): delete the folder and retrain it")
        gen = cls(config, unet.to(resolve_device(device)).eval())
        if gen.condition is not None:
            from safetensors.torch import load_file

            path = folder / "image_condition.safetensors"
            if not path.exists():
                raise SynthaugError(f"generator folder '{folder}' has no image_condition.safetensors: retrain it")
            try:
                state = load_file(path)
                gen.condition.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("condition.")})
                gen.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
            except Exception as e:
                raise SynthaugError(f"cannot load '{path}' ({str(e).splitlines()[0]}): retrain the generator") from None
            gen.condition.to(next(gen.unet.parameters()).device).eval()
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

