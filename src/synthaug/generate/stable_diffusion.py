"""Pretrained Stable Diffusion through diffusers pipelines, behind the same interface as the
embedded generator (`generate`, `generate_rows`, `fingerprint`, `save_pretrained`,
`from_pretrained`), so every recipe runs on it with a config change
(`generator.pretrained=<hub id or folder>`):

- rows with only a label (SYNAuG, UtilGen): text-to-image from the class prompt, with
  prompt modifiers drawn per image by its seed (`StableDiffusionPipeline`);
- rows with a `source` image and a `strength` (TADA): img2img / SDEdit
  (`StableDiffusionImg2ImgPipeline`, DA-Fusion style);
- rows with two `sources` and a `conditioning` mode (AugCond): unCLIP image variation from
  CLIP image embeddings (`StableUnCLIPImg2ImgPipeline`), after the same pixel- and
  embedding-level operators as the embedded generator (`image_condition.py`).

The generation policy is exposed as in the embedded generator: `prompt_embeds` (one
per class and modifier, the vectors the text encoder makes from the prompts; UtilGen moves
them) and the initial latent noise (`noise`). LoRA adapters (peft) carry fine-tuning: on the
user's images (`adapt`, DreamBooth-LoRA style) and UtilGen's Diffusion-DPO. Images come out
at the pipeline's resolution and are resized to the data's size and channels.

On a GPU the pipeline runs in float16 (bfloat16 where supported) with attention slicing;
on a CPU in float32 (slowly). Fine-tuning lives in stable_diffusion_training.py;
`synthaug.testing.tiny_pipeline` writes a random miniature of each pipeline for tests and
offline trials."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, get_args

import torch
import torch.nn.functional as F

from ..choices import Dtype
from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..plan import split_by_kind
from ..utils.io import atomic_save_tensors, atomic_write_json
from ..utils.runtime import progress_bar, resolve_device
from .base import generate_arguments
from .network import SamplerConfig
from .stable_diffusion_training import StableDiffusionTraining

KIND = "stable-diffusion"
DTYPES = get_args(Dtype)


@dataclass
class StableDiffusionConfig:
    pretrained: str  # hub id or folder of a diffusers pipeline (model_index.json + components)
    classes: list[str]
    channels: int = 3  # of the data: images are converted to it
    image_size: int = 32  # of the data: images are resized to it
    prompt: str = "a photo of a {name}"  # {name}: the class name
    modifiers: list[str] = field(default_factory=list)  # appended to the prompt, one per image (SYNAuG's diversity)
    negative_prompt: str = ""
    resolution: int | None = None  # generation size in px (default: the UNet's native size)
    dtype: str = "auto"
    attention_slicing: bool = True  # on a GPU
    noise_level: int = 0  # unCLIP: noise added to the image embedding (more: more varied images)
    lora_rank: int = 0  # > 0 once an adapter was added (adapt or DPO)
    num_groups: ClassVar[int] = 0  # prompts name classes, not groups

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise SynthaugError(f"generator.dtype is '{self.dtype}': use one of {', '.join(DTYPES)}")
        if "{name}" not in self.prompt:
            raise SynthaugError(f"generator.prompt '{self.prompt}' has no {{name}}: write e.g. 'a photo of a {{name}}'")

    def prompts(self, label: int) -> list[str]:
        base = self.prompt.format(name=self.classes[label])
        return [f"{base}, {m}" for m in self.modifiers] or [base]


def require(*modules: str):
    """Fail with the install command when an optional dependency is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SynthaugError(f"Stable Diffusion needs {', '.join(missing)}: pip install 'synthaug[sd]'")


def check_pretrained(pretrained: str):
    """What can be told of `generator.pretrained` without loading it: the packages it needs, and
    that a local folder is a diffusers pipeline. Writes nothing."""
    require("diffusers", "transformers", "peft")
    local = Path(pretrained)
    if (local / "generator.json").is_file():  # one that synthaug's save_pretrained wrote (a base and its adapter)
        return
    if (local.exists() or pretrained.startswith((".", "/"))) and not (local / "model_index.json").exists():
        raise SynthaugError(f"'{pretrained}' is not a diffusers pipeline folder (no model_index.json, no generator.json): "
                            "point generator.pretrained at a folder saved by save_pretrained or a hub id")


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_pipeline(pretrained: str, *, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline from a hub id or a local folder (safetensors weights), with a
    clear error when it cannot be had (no folder, no network, not a pipeline)."""
    check_pretrained(pretrained)
    from diffusers import DiffusionPipeline

    try:  # diffusers renamed torch_dtype to dtype
        import diffusers.utils.deprecation_utils as deprecation

        key = "dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype"
        pipe = DiffusionPipeline.from_pretrained(pretrained, use_safetensors=True, **{key: dtype})
    except Exception as e:
        raise SynthaugError(f"cannot load the pipeline '{pretrained}' ({str(e).splitlines()[0][:200]}): download it "
                            "first (huggingface-cli download <id> --local-dir DIR) and set generator.pretrained=DIR") from None
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise SynthaugError(f"the pipeline '{pretrained}' ({type(pipe).__name__}) has no {name}: use a Stable "
                                "Diffusion text-to-image or unCLIP pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


class ClipImageEncoder(torch.nn.Module):
    """uint8 images (N, C, H, W) -> the unCLIP pipeline's CLIP image embeddings, through its
    own image processor: the encoder `image_condition.condition_embeddings` expects."""

    def __init__(self, image_encoder, feature_extractor):
        super().__init__()
        self.image_encoder, self.feature_extractor = image_encoder, feature_extractor

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        pixels = self.feature_extractor(images=list(rgb.cpu()), return_tensors="pt").pixel_values
        p = next(self.image_encoder.parameters())
        return self.image_encoder(pixels.to(p.device, p.dtype)).image_embeds.float()


class StableDiffusionGenerator(StableDiffusionTraining):
    """A Stable Diffusion pipeline as a synthaug generator (see the module docstring)."""

    kind = KIND

    def __init__(self, pipe, config: StableDiffusionConfig):
        self.pipe, self.config = pipe, config
        self.device = pipe.device
        self.unclip = type(pipe).__name__.startswith("StableUnCLIP")
        self.encoder = ClipImageEncoder(pipe.image_encoder, pipe.feature_extractor) if self.unclip else None
        self.resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        if self.resolution % pipe.vae_scale_factor:
            raise SynthaugError(f"generator.resolution {self.resolution} is not a multiple of {pipe.vae_scale_factor}")
        self.prompt_embeds = self.encode_prompts()  # (classes, prompts per class, tokens, dim)
        self.negative_embeds = self._encode([config.negative_prompt])[0]
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.folder: Path | None = None
        self._base_digest: str | None = None
        if pipe.device.type == "cuda" and config.attention_slicing:
            pipe.enable_attention_slicing()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, classes: list[str] | None = None, *, device: str = "auto",
                        **options) -> StableDiffusionGenerator:
        """From a diffusers pipeline (hub id or folder; `classes` required), or from a folder
        written by `save_pretrained` (base pipeline + prompt embeddings + LoRA adapter)."""
        folder = Path(pretrained)
        if (folder / "generator.json").exists():
            return cls._from_saved(folder, device=device)
        if classes is None:
            raise SynthaugError("a Stable Diffusion generator needs the class names to build its prompts")
        if folder.exists():  # workers elsewhere and later loads find it from any working directory
            pretrained = folder.resolve()
        config = StableDiffusionConfig(pretrained=str(pretrained), classes=list(classes), **options)
        dev = resolve_device(device)
        return cls(load_pipeline(str(pretrained), device=dev, dtype=_torch_dtype(config.dtype, dev)), config)

    @classmethod
    def _from_saved(cls, folder: Path, device: str = "auto") -> StableDiffusionGenerator:
        from safetensors.torch import load_file

        meta = json.loads((folder / "generator.json").read_text())
        if meta.get("kind") != KIND:
            raise SynthaugError(f"'{folder}' holds an embedded generator, not a Stable Diffusion one")
        config = StableDiffusionConfig(**meta["config"])
        dev = resolve_device(device)
        gen = cls(load_pipeline(config.pretrained, device=dev, dtype=_torch_dtype(config.dtype, dev)), config)
        state = load_file(folder / "policy.safetensors")
        gen.prompt_embeds = state["prompt_embeds"].to(gen.device, gen.prompt_embeds.dtype)
        if config.lora_rank:
            from peft import set_peft_model_state_dict

            gen._add_lora(config.lora_rank)
            set_peft_model_state_dict(gen.pipe.unet, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        gen.history, gen.train_seconds, gen.folder = meta.get("history", []), meta.get("train_seconds", 0.0), folder
        return gen

    def save_pretrained(self, folder: str | os.PathLike):
        """`generator.json` (the base pipeline's id or folder, prompts, sizes) and
        `policy.safetensors` (prompt embeddings and LoRA weights); the base weights stay where
        they are."""

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"prompt_embeds": self.prompt_embeds.detach().cpu().contiguous()}
        if self.config.lora_rank:
            from peft import get_peft_model_state_dict

            state.update({f"lora.{k}": v.detach().cpu().contiguous()
                          for k, v in get_peft_model_state_dict(self.pipe.unet).items()})
        atomic_save_tensors(folder / "policy.safetensors", state)
        atomic_write_json(folder / "generator.json", {"kind": KIND, "config": asdict(self.config), "history": self.history,
                                                      "train_seconds": self.train_seconds, "fingerprint": self.fingerprint()})
        self.folder = folder

    def check_compatible(self, data: ImageDataset):
        c = self.config
        if c.classes != data.classes:
            raise SynthaugError(f"the generator's prompts name classes {c.classes[:5]}..., the data has "
                                f"{data.classes[:5]}...: build it for this data")
        if c.channels != data.channels or (c.image_size, c.image_size) != tuple(data.image_size):
            raise SynthaugError(f"the generator makes {c.channels}x{c.image_size}px images, the data is "
                                f"{data.channels}x{data.image_size[0]}px: build it for this data")

    def fingerprint(self) -> str:
        """Hash of the config, the base weights (hashed once) and the policy (prompt
        embeddings, LoRA weights): names what generated an image."""
        if self._base_digest is None:
            h = hashlib.sha256()
            for net in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
                for k, v in net.state_dict().items():
                    if "lora_" not in k:  # the same names with or without an adapter
                        h.update(k.replace(".base_layer", "").encode())
                        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
            self._base_digest = h.hexdigest()
        h = hashlib.sha256(json.dumps({**asdict(self.config), "pretrained": None}, sort_keys=True).encode())
        h.update(self._base_digest.encode())
        h.update(self.prompt_embeds.detach().float().cpu().contiguous().numpy().tobytes())
        for k, v in sorted(self.pipe.unet.state_dict().items()):
            if "lora_" in k:
                h.update(k.encode())
                h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def image_embed_dim(self) -> int:
        return self.pipe.image_encoder.config.projection_dim if self.unclip else 0

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def encode_prompts(self) -> torch.Tensor:
        per_class = [self._encode(self.config.prompts(c)) for c in range(len(self.config.classes))]
        return torch.stack(per_class)

    def row_prompt_embeds(self, labels: torch.Tensor, seeds) -> torch.Tensor:
        """Each image's prompt embedding: its class's, with the modifier its seed picks."""
        per = self.prompt_embeds.shape[1]
        return self.prompt_embeds[labels.to(self.prompt_embeds.device), torch.tensor([int(s) % per for s in seeds],
                                                                                     device=self.prompt_embeds.device)]

    # ------------------------------------------------------------------ sampling
    def _latent_shape(self) -> tuple[int, int, int]:
        size = self.resolution // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, size, size)

    def _scheduler(self, sampler: str):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        base = self.pipe.scheduler.config
        if sampler in ("sde-dpm-solver++", "dpm-solver++"):
            return DPMSolverMultistepScheduler.from_config(base, algorithm_type=sampler.replace("-solver", "solver"))
        if sampler == "ddim":
            return DDIMScheduler.from_config(base)
        raise SynthaugError(f"unknown sampler '{sampler}': use one of sde-dpm-solver++, dpm-solver++, ddim")

    def _sibling(self, pipeline_class, scheduler):
        """A pipeline of another kind on the same components (diffusers' `from_pipe`: no copy)."""
        pipe = pipeline_class.from_pipe(self.pipe, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _to_pipeline_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 data images -> float RGB in [0, 1] at the generation resolution."""
        x = images.float().div(255)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False).clamp(0, 1)

    def _to_data_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pipeline output (float RGB in [0, 1]) -> uint8 at the data's size and channels."""
        s = self.config.image_size
        x = F.interpolate(images.float().cpu(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        if self.config.channels == 1:
            from torchvision.transforms.v2.functional import rgb_to_grayscale

            x = rgb_to_grayscale(x)
        return x.clamp(0, 1).mul(255).round().to(torch.uint8)

    @torch.no_grad()
    def generate(self, labels, seeds, groups=None, sampler: SamplerConfig | None = None, *,
                 init_images: torch.Tensor | None = None, strength=1.0, image_embeds: torch.Tensor | None = None,
                 image_keep: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 progress: bool = False) -> torch.Tensor:
        """uint8 images (N, C, H, W) at the data's size; image i from seed `seeds[i]` (its
        initial latent noise and every later random draw), so it does not depend on its batch.
        Arguments as in `DiffusionGenerator.generate`: `init_images` + `strength` for img2img,
        `image_embeds` (+ `image_keep`) for unCLIP, `noise` (N, 4, h, w) for the initial latents."""
        sampling = sampler or SamplerConfig(guidance_scale=7.5, steps=25)
        if sampling.guidance_interval is not None:
            raise SynthaugError("generator.guidance_interval limits the embedded generator's guidance; a Stable Diffusion "
                                "pipeline guides every step: leave generator.guidance_interval unset")
        if groups is not None:
            raise SynthaugError("Stable Diffusion generators are not group-conditioned: set synaug.balance_groups=false")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(labels):
            raise ValueError("one seed per image")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.config.classes)):
            raise SynthaugError(f"labels must be in [0, {len(self.config.classes)}) for this generator")
        if image_embeds is not None and not self.unclip:
            raise SynthaugError(f"'{self.config.pretrained}' is not an unCLIP pipeline: image-conditioned rows (recipe "
                                "augcond) need one, e.g. stabilityai/stable-diffusion-2-1-unclip")
        if self.unclip and image_embeds is None:
            raise SynthaugError(f"'{self.config.pretrained}' is an unCLIP pipeline, which generates from images: use a "
                                "text-to-image pipeline for label-only or image-guided rows")
        if noise is not None and tuple(noise.shape) != (len(labels), *self._latent_shape()):
            raise SynthaugError(f"noise must be ({len(labels)}, {', '.join(map(str, self._latent_shape()))}) latents, "
                                f"got {tuple(noise.shape)}")
        strengths = torch.as_tensor(strength, dtype=torch.float64).expand(len(labels))
        if init_images is not None and len(strengths) and not bool(((strengths > 0) & (strengths <= 1)).all()):
            raise SynthaugError("strength must be in (0, 1]: the share of the sampling steps run from the noised image")
        out = torch.empty(len(labels), self.config.channels, self.config.image_size, self.config.image_size,
                          dtype=torch.uint8)
        with progress_bar(progress) as bar:
            task = bar.add_task("generate", total=len(labels), info="")
            for i in range(0, len(labels), sampling.batch_size):
                batch = torch.arange(i, min(i + sampling.batch_size, len(labels)))
                for value in strengths[batch].unique().tolist():  # img2img takes one strength per call
                    idx = batch[strengths[batch] == value] if init_images is not None else batch
                    out[idx] = self._sample_batch(labels[idx], [seeds[j] for j in idx], sampling,
                                                  init=None if init_images is None else init_images[idx], strength=value,
                                                  image=None if image_embeds is None else (image_embeds[idx], image_keep[idx] if image_keep is not None else None),
                                                  noise=None if noise is None else noise[idx])
                    if init_images is None:
                        break
                bar.advance(task, len(batch))
        return out

    def _sample_batch(self, labels, seeds, sampling: SamplerConfig, *, init=None, strength=1.0, image=None, noise=None):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        streams = [torch.Generator().manual_seed(s) for s in seeds]
        # each stream draws its latent even when `noise` replaces it, so that its later draws (a
        # stochastic sampler's noise) are the same whatever the batch holds
        drawn = torch.stack([torch.randn(self._latent_shape(), generator=g) for g in streams])
        latents = drawn if noise is None else noise
        dtype = self.pipe.unet.dtype
        common = dict(prompt_embeds=self.row_prompt_embeds(labels, seeds).to(dtype),
                      negative_prompt_embeds=self.negative_embeds.expand(len(labels), -1, -1).to(dtype),
                      num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale, generator=streams, output_type="pt")
        scheduler = self._scheduler(sampling.sampler)
        self.pipe.scheduler = scheduler
        if image is not None:
            embeds, keep = image
            if keep is not None:
                embeds = embeds * keep.to(embeds.dtype)[:, None]  # the null image: a zero embedding
            images = self.pipe(image_embeds=embeds.to(self.device, dtype), latents=latents.to(self.device, dtype),
                               noise_level=self.config.noise_level, height=self.resolution, width=self.resolution,
                               **common).images
        elif init is not None:
            pipe = self._sibling(StableDiffusionImg2ImgPipeline, scheduler)
            strength = max(strength, 1.0 / sampling.steps)  # at least one step, as the embedded generator
            images = pipe(image=self._to_pipeline_images(init).to(self.device, dtype), strength=strength, **common).images
        else:
            pipe = self._sibling(StableDiffusionPipeline, scheduler)
            images = pipe(latents=latents.to(self.device, dtype), height=self.resolution, width=self.resolution,
                          **common).images
        return self._to_data_images(images)

    def generate_rows(self, rows: list[dict], sampler: SamplerConfig | None = None,
                      sources: ImageDataset | None = None) -> torch.Tensor:
        """Images for plan rows, as `DiffusionGenerator.generate_rows`."""
        mixed = split_by_kind(rows, lambda part: self.generate_rows(part, sampler, sources))
        if mixed is not None:
            return mixed
        if rows and rows[0].get("sources") is not None and self.encoder is None:
            raise SynthaugError(f"'{self.config.pretrained}' is not an unCLIP pipeline: image-conditioned rows (recipe "
                                "augcond) need one, e.g. stabilityai/stable-diffusion-2-1-unclip")
        arguments = generate_arguments(rows, sources, self.encoder)
        arguments.pop("groups")  # prompts name classes only
        return self.generate(**arguments, sampler=sampler)

    # ------------------------------------------------------------------ fine-tuning
