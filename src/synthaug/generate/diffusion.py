"""The embedded generator: a class-conditional diffusion model trained from scratch on the
user's own images (diffusers `UNet2DModel` + a diffusers noise scheduler), with
classifier-free guidance (labels dropped to a null class in training), EMA weights, and a
fast DPM-Solver++ / DDIM sampler. Each image is drawn from its own seed, so any image can be
regenerated. Training checkpoints and resumes; weights save as safetensors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..plan import split_by_kind
from ..utils.io import atomic_save_tensors, atomic_write_json, atomic_write_text, not_a_link
from ..utils.runtime import autocast, fast_dtype, progress_bar, resolve_device
from .base import generate_arguments
from .feedback import feedback_step
from .image_condition import ConditionEmbedding, PCAEncoder
from .network import (
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
    build_sampler,
    build_unet,
    guided_steps,
)


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
        n_groups = self.config.num_groups
        groups = torch.full_like(labels, n_groups) if groups is None or n_groups == 0 else groups
        return labels * (n_groups + 1) + groups

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

    # ------------------------------------------------------------------ training (training.py)
    @classmethod
    def fit(cls, data: ImageDataset, config: GeneratorConfig | None = None, train: GeneratorTrainConfig | None = None,
            **options) -> DiffusionGenerator:
        """A generator trained on `data` (`training.fit_generator`: seed, checkpoint_dir,
        progress, unlabeled)."""
        from .training import fit_generator

        return fit_generator(data, config, train, **options)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, image_embeds: torch.Tensor | None = None,
                 image_keep: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 guide: torch.nn.Module | None = None, progress: bool = False) -> torch.Tensor:
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
        optimised initial noise); a stochastic sampler still draws its later noise from them.

        `guide`, a classifier of the images (float in [0, 1]), steers the sampling where
        `sampler.feedback` > 0 (feedback guidance, `feedback.py`)."""
        sampling = sampler or SamplerConfig()
        if bool(sampling.feedback) != (guide is not None):
            raise SynthaugError("feedback guidance needs both sampler.feedback > 0 and a guiding classifier (guide)")
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
            starts = sampling.steps - (strength * sampling.steps).round().long().clamp(min=1)
        out = torch.empty(len(labels), c, s, s, dtype=torch.uint8)
        with progress_bar(progress) as bar:
            task = bar.add_task("generate", total=len(labels), info="")
            for i in range(0, len(labels), sampling.batch_size):
                batch = torch.arange(i, min(i + sampling.batch_size, len(labels)))
                for start in starts[batch].unique().tolist():  # images starting at the same step go together
                    idx = batch[starts[batch] == start]
                    out[idx] = self._sample_batch(
                        labels[idx], [seeds[j] for j in idx], None if groups is None else groups[idx], sampling,
                        init=None if init_images is None else init_images[idx], start=start,
                        image=None if image_embeds is None else (image_embeds[idx], image_keep[idx]),
                        noise=None if noise is None else noise[idx], guide=guide)
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
                      sources: ImageDataset | None = None, guide: torch.nn.Module | None = None) -> torch.Tensor:
        """Images for plan rows (`label`, `seed`, optional `group`): what a store's `fill`
        calls. Image-guided rows also have `source` (an index into `sources`) and `strength`;
        image-conditioned rows `sources` (two indices into `sources`, same class) and a
        conditioning mode in `conditioning` (see `image_condition.OPERATORS`). Rows of
        different kinds may come mixed. `guide`: feedback guidance's classifier (see `generate`)."""
        mixed = split_by_kind(rows, lambda part: self.generate_rows(part, sampler, sources, guide))
        if mixed is not None:
            return mixed
        if rows and rows[0].get("sources") is not None and self.encoder is None:
            raise SynthaugError("these plan rows need image conditioning but this generator is not image-conditioned: "
                                "train one with image_embed_dim > 0 (recipe augcond does)")
        return self.generate(**generate_arguments(rows, sources, self.encoder), sampler=sampler, guide=guide)

    def _sample_batch(self, labels, seeds, groups, sampling: SamplerConfig, init=None, start: int = 0,
                      image=None, noise=None, guide=None) -> torch.Tensor:
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
        own = cond  # each image's own (class, group) cell: what feedback guidance differentiates
        composed = self.config.composed and groups is not None
        guided = sampling.guidance_scale != 1.0 or composed
        if guided:
            null_groups = None if groups is None else torch.full_like(groups, self.config.num_groups)
            uncond = self.class_input(self.condition_ids(torch.full_like(labels, self.null_class), null_groups).to(device))
            both = None if cond_map is None else torch.cat([cond_map, torch.zeros_like(cond_map)])
        if composed:  # the class's and the group's guidance, each against (null, null)
            cond = torch.cat([self.class_input(self.condition_ids(labels, null_groups).to(device)),
                              self.class_input(self.condition_ids(torch.full_like(labels, self.null_class), groups).to(device))])
        scheduler = build_sampler(self.config, sampling.sampler)
        scheduler.set_timesteps(sampling.steps)
        timesteps = scheduler.timesteps[start:]
        guiding = guided_steps(scheduler, timesteps, sampling.guidance_interval) if guided else [False] * len(timesteps)
        if init is None:
            x = x * scheduler.init_noise_sigma
        else:  # SDEdit: the real image noised to the first timestep run, as diffusers' img2img does
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            x = scheduler.add_noise(init.to(device).float() / 127.5 - 1, x, timesteps[:1].repeat(len(x)))
        dtype = fast_dtype(sampling.precision, device)  # the UNet in bfloat16 where native; the solver in float32
        for step, t in enumerate(timesteps):
            model_in = scheduler.scale_model_input(x, t)
            with autocast(device, dtype):
                if composed:
                    eps = self.predict_noise(torch.cat([model_in] * 3), t, torch.cat([cond, uncond]), None).float()
                elif guiding[step]:
                    eps = self.predict_noise(torch.cat([model_in, model_in]), t, torch.cat([cond, uncond]), both).float()
                else:
                    eps = self.predict_noise(model_in, t, cond, cond_map).float()
            if composed:
                eps_class, eps_group, eps_uncond = eps.chunk(3)
                w, w_group = sampling.guidance_scale, sampling.group_guidance_scale
                if not guiding[step]:  # outside the interval each term at scale 1 at most (a group's 0 stays 0)
                    w, w_group = 1.0, None if w_group is None else min(w_group, 1.0)
                if w_group is None or w_group == w:  # one scale (the images made before the split, bit for bit)
                    eps = eps_uncond + w * (eps_class + eps_group - 2 * eps_uncond)
                else:
                    eps = eps_uncond + w * (eps_class - eps_uncond) + w_group * (eps_group - eps_uncond)
            elif guiding[step]:
                eps_cond, eps_uncond = eps.chunk(2)
                eps = eps_uncond + sampling.guidance_scale * (eps_cond - eps_uncond)
            if guide is not None and step % sampling.feedback_every == 0:  # moves x_t; the solver steps from there
                x = feedback_step(self, x, t, scheduler, own, cond_map, labels, guide, sampling, dtype)
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

        folder = Path(folder)
        # the UNet's folder as diffusers' save_pretrained lays it out, each file written through
        # temp_for (diffusers' own writer would follow a link planted at its file names)
        unet_dir = not_a_link(folder / "unet")
        unet_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(unet_dir / "config.json", self.unet.to_json_string())
        atomic_save_tensors(unet_dir / "diffusion_pytorch_model.safetensors",
                            {k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}, {"format": "pt"})
        if self.condition is not None:
            extra = {k: v.detach().cpu().contiguous() for k, v in self._state().items() if k.split(".")[0] in ("condition", "encoder")}
            atomic_save_tensors(folder / "image_condition.safetensors", extra)
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

