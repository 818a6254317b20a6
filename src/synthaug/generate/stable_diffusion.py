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
on a CPU in float32 (slowly). `tiny_pipeline` writes a random miniature of each pipeline
for tests and offline trials."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.io import atomic_write_json
from ..utils.runtime import progress_bar, resolve_device
from .diffusion import SamplerConfig, generate_arguments, split_by_kind

KIND = "stable-diffusion"
DTYPES = ("auto", "float32", "float16", "bfloat16")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TRAIN_BATCH = 8  # at most this many images per fine-tuning step (memory at 512 px)


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


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


def load_pipeline(pretrained: str, *, device: torch.device, dtype: torch.dtype):
    """A diffusers pipeline from a hub id or a local folder (safetensors weights), with a
    clear error when it cannot be had (no folder, no network, not a pipeline)."""
    from diffusers import DiffusionPipeline

    require("transformers", "peft")
    local = Path(pretrained)
    if (local.exists() or pretrained.startswith((".", "/"))) and not (local / "model_index.json").exists():
        raise SynthaugError(f"'{pretrained}' is not a diffusers pipeline folder (no model_index.json): point "
                            "generator.pretrained at a folder saved by save_pretrained or a hub id")
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


class StableDiffusionGenerator:
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
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {"prompt_embeds": self.prompt_embeds.detach().cpu().contiguous()}
        if self.config.lora_rank:
            from peft import get_peft_model_state_dict

            state.update({f"lora.{k}": v.detach().cpu().contiguous()
                          for k, v in get_peft_model_state_dict(self.pipe.unet).items()})
        tmp = folder / ".policy.safetensors.tmp"
        save_file(state, tmp)
        os.replace(tmp, folder / "policy.safetensors")
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
        """A pipeline of another kind on the same components (no copy, no dtype cast)."""
        import inspect

        params = inspect.signature(pipeline_class.__init__).parameters
        parts = {k: v for k, v in self.pipe.components.items() if k in params}
        parts.update({k: None for k, p in params.items() if k not in parts and k != "self" and p.default is p.empty})
        if "requires_safety_checker" in params:
            parts["requires_safety_checker"] = parts.get("safety_checker") is not None
        pipe = pipeline_class(**{**parts, "scheduler": scheduler})
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
        sc = sampler or SamplerConfig(guidance_scale=7.5, steps=25)
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
            for i in range(0, len(labels), sc.batch_size):
                batch = torch.arange(i, min(i + sc.batch_size, len(labels)))
                for value in strengths[batch].unique().tolist():  # img2img takes one strength per call
                    idx = batch[strengths[batch] == value] if init_images is not None else batch
                    out[idx] = self._sample_batch(labels[idx], [seeds[j] for j in idx], sc,
                                                  init=None if init_images is None else init_images[idx], strength=value,
                                                  image=None if image_embeds is None else (image_embeds[idx], image_keep[idx] if image_keep is not None else None),
                                                  noise=None if noise is None else noise[idx])
                    if init_images is None:
                        break
                bar.advance(task, len(batch))
        return out

    def _sample_batch(self, labels, seeds, sc: SamplerConfig, *, init=None, strength=1.0, image=None, noise=None):
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        streams = [torch.Generator().manual_seed(s) for s in seeds]
        # each stream draws its latent even when `noise` replaces it, so that its later draws (a
        # stochastic sampler's noise) are the same whatever the batch holds
        drawn = torch.stack([torch.randn(self._latent_shape(), generator=g) for g in streams])
        latents = drawn if noise is None else noise
        dtype = self.pipe.unet.dtype
        common = dict(prompt_embeds=self.row_prompt_embeds(labels, seeds).to(dtype),
                      negative_prompt_embeds=self.negative_embeds.expand(len(labels), -1, -1).to(dtype),
                      num_inference_steps=sc.steps, guidance_scale=sc.guidance_scale, generator=streams, output_type="pt")
        scheduler = self._scheduler(sc.sampler)
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
            strength = max(strength, 1.0 / sc.steps)  # at least one step, as the embedded generator
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
    def _add_lora(self, rank: int, seed: int = 0):
        """A LoRA adapter on the UNet's attention projections (none if there is one), its
        random initial weights drawn from `seed`."""
        from peft import LoraConfig

        unet = self.pipe.unet
        if "default" not in getattr(unet, "peft_config", {}):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=LORA_TARGETS))
            for name, param in unet.named_parameters():
                if "lora_" in name:  # LoRA weights live in float32 (mixed precision on a GPU)
                    param.data = param.data.float()
        self.config.lora_rank = unet.peft_config["default"].r

    @contextlib.contextmanager
    def _training(self):
        """Context for the steps that backpropagate through the UNet: on a GPU, plain SDPA
        attention (slicing would keep every attention map for the backward pass) and
        gradient checkpointing; slicing comes back afterwards."""
        unet, gpu = self.pipe.unet, self.device.type == "cuda"
        if gpu:
            unet.set_default_attn_processor()
            unet.enable_gradient_checkpointing()
        try:
            yield unet
        finally:
            if gpu:
                unet.disable_gradient_checkpointing()
                if self.config.attention_slicing:
                    self.pipe.enable_attention_slicing()

    def latents_of(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE's (scaled) latent means of uint8 data images."""
        x = self._to_pipeline_images(images).mul(2).sub(1).to(self.device, self.pipe.vae.dtype)
        with torch.no_grad():
            return self.pipe.vae.encode(x).latent_dist.mean * self.pipe.vae.config.scaling_factor

    def adapt(self, data: ImageDataset, *, steps: int = 500, rank: int = 4, lr: float = 1e-4, batch_size: int = 8,
              seed: int = 0, progress: bool = False, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int = 100) -> list[dict]:
        """Fine-tune a LoRA adapter of the UNet on `data` with its class prompts (the
        denoising loss in latent space; DreamBooth-LoRA without prior preservation), so
        generations look like the user's images. Returns the loss curve. With
        `checkpoint_dir`, an interrupted adaptation resumes at its last checkpoint (the
        batch and noise of step s come from (seed, s), so the result is the same)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        from ..utils.io import load_state, save_state

        if len(data) == 0:
            raise SynthaugError("no images to adapt the generator to")
        self._add_lora(rank, seed=seed)
        unet = self.pipe.unet
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        optimizer = torch.optim.AdamW(params, lr=lr)
        latents = torch.cat([self.latents_of(data.images[i : i + 64]) for i in range(0, len(data), 64)])
        unet.train()
        t0, history, start = time.perf_counter(), [], 0
        # a checkpoint is resumed only by the same adaptation (pipeline, data, settings, seed)
        run_key = json.dumps({"pipeline": self.fingerprint(), "data": data.fingerprint(), "steps": steps, "rank": rank,
                              "lr": lr, "batch_size": batch_size, "seed": seed})
        state = load_state(checkpoint_dir) if checkpoint_dir else None
        if state is not None and state.get("run_key") == run_key:
            set_peft_model_state_dict(unet, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = state["step"], state["history"]
        with progress_bar(progress) as bar, self._training():
            task = bar.add_task("adapt generator", total=steps, completed=start, info="")
            for step in range(start, steps):
                g = torch.Generator().manual_seed(seed * 1_000_003 + step)
                idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g)
                loss = self.denoising_error(latents[idx], data.labels[idx], g).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (step + 1) % 10 == 0 or step + 1 == steps:
                    history.append({"step": step + 1, "loss": float(loss.detach())})
                if checkpoint_dir and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                    save_state(checkpoint_dir, {"step": step + 1, "history": history, "optimizer": optimizer.state_dict(),
                                                "lora": get_peft_model_state_dict(unet), "run_key": run_key})
                bar.advance(task)
        unet.eval()
        self.history += [{"stage": "adapt", **h} for h in history]
        self.train_seconds += time.perf_counter() - t0
        return history

    def _train_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def denoising_error(self, latents: torch.Tensor, labels: torch.Tensor, g: torch.Generator, *,
                        prompt_embeds: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        timesteps: torch.Tensor | None = None, unet=None) -> torch.Tensor:
        """Per-image denoising error (the training objective's target: the noise, or v for
        v-prediction models) at random timesteps, with each image's class prompt (first
        modifier) or `prompt_embeds`."""
        sched = self._train_scheduler()
        unet = unet or self.pipe.unet
        latents = latents.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(latents.shape, generator=g).to(self.device)
        if timesteps is None:
            timesteps = torch.randint(sched.config.num_train_timesteps, (len(latents),), generator=g).to(self.device)
        noisy = sched.add_noise(latents, noise, timesteps)
        target = sched.get_velocity(latents, noise, timesteps) if sched.config.prediction_type == "v_prediction" else noise
        cond = self.prompt_embeds[labels.to(self.prompt_embeds.device), 0] if prompt_embeds is None else prompt_embeds
        dtype = unet.dtype
        kwargs = {}
        if self.unclip:  # the null image embedding (+ its noise-level embedding) as the class input
            zero = torch.zeros(len(latents), self.image_embed_dim, device=self.device, dtype=dtype)
            kwargs["class_labels"] = self.pipe.noise_image_embeddings(zero, self.config.noise_level,
                                                                      noise=torch.zeros_like(zero))
        pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=cond.to(dtype), **kwargs).sample
        return (pred.float() - target).pow(2).mean(dim=(1, 2, 3))


    # ------------------------------------------------------------------ UtilGen's handles
    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """The shape of one image's initial noise (latents)."""
        return self._latent_shape()

    def _frozen_unet(self):
        """Context: the UNet's weights take no gradient (only the policy moves)."""
        import contextlib

        @contextlib.contextmanager
        def frozen():
            params = list(self.pipe.unet.parameters())
            was = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
            try:
                yield
            finally:
                for p, w in zip(params, was):
                    p.requires_grad_(w)

        return frozen()

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.latents_of(images[i : i + 32]) for i in range(0, len(images), 32)]).float()

    def policy_embeddings(self) -> torch.Tensor:
        """The vectors the instance-level policy moves: the classes' prompt embeddings."""
        return self.prompt_embeds

    def optimise_policy_embeddings(self, images: torch.Tensor, labels: torch.Tensor, *, steps: int = 200,
                                   lr: float = 5e-3, proximity: float = 1.0, batch_size: int = 32,
                                   anchor: torch.Tensor | None = None, seed: int = 0) -> dict:
        """UtilGen's prompt-embedding optimisation (`policy.optimise_class_embeddings` for
        Stable Diffusion): the prompt embeddings of the classes in `labels` (every modifier's)
        move to lower the denoising error on those high-utility images, penalised by
        `proximity` x the mean squared distance to `anchor` (default: as they are now)."""
        labels = torch.as_tensor(labels)
        emb = self.prompt_embeds.detach().clone().float().requires_grad_(True)
        original = (emb.detach().clone() if anchor is None else anchor.float()).to(emb.device)
        rows = torch.zeros(len(emb), dtype=torch.bool, device=emb.device)
        rows[labels.unique().to(emb.device)] = True
        latents = self._latents(images)
        optimizer = torch.optim.Adam([emb], lr=lr)
        per, losses = emb.shape[1], []
        batch_size = min(batch_size, TRAIN_BATCH)
        with self._frozen_unet(), self._training():
            for step in range(steps):
                g = torch.Generator().manual_seed(seed * 1_000_003 + step)
                idx = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=g)
                modifier = torch.randint(per, (len(idx),), generator=g)
                err = self.denoising_error(latents[idx], labels[idx], g,
                                           prompt_embeds=emb[labels[idx].to(emb.device), modifier.to(emb.device)]).mean()
                loss = err + proximity * (emb[rows] - original[rows]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                emb.grad[~rows] = 0  # only the targeted classes move
                optimizer.step()
                losses.append(float(err.detach()))
        with torch.no_grad():
            emb[~rows] = self.prompt_embeds[~rows].float()
            shift = ((emb - original).flatten(1).norm(dim=1) / original.flatten(1).norm(dim=1).clamp(min=1e-8))[rows]
        self.prompt_embeds = emb.detach().to(self.prompt_embeds.dtype)
        window = max(1, len(losses) // 10)
        return {"loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
                "relative_shift": [round(float(v), 4) for v in shift]}

    @torch.no_grad()
    def invert_noise(self, images: torch.Tensor, labels, *, steps: int = 25, guidance_scale: float = 1.0,
                     batch_size: int = 32) -> torch.Tensor:
        """DDIM inversion in latent space (`policy.invert_noise` for Stable Diffusion): the
        initial latents from which the DDIM sampler (same steps) returns close to each image,
        under its class prompt (with `prompt_modifiers`, the first modifier's: the image a
        new seed makes from them carries that seed's modifier)."""
        from diffusers import DDIMInverseScheduler

        labels = torch.as_tensor(labels)
        out = []
        for i in range(0, len(images), batch_size):
            scheduler = DDIMInverseScheduler.from_config(self.pipe.scheduler.config)
            scheduler.set_timesteps(steps)
            x = self._latents(images[i : i + batch_size])
            cond = self.prompt_embeds[labels[i : i + batch_size].to(self.prompt_embeds.device), 0]
            dtype = self.pipe.unet.dtype
            for t in scheduler.timesteps:
                if guidance_scale != 1.0:
                    both = torch.cat([cond, self.negative_embeds.expand(len(x), -1, -1)])
                    e_c, e_u = self.pipe.unet(torch.cat([x, x]).to(dtype), t, encoder_hidden_states=both.to(dtype)).sample.chunk(2)
                    eps = e_u + guidance_scale * (e_c - e_u)
                else:
                    eps = self.pipe.unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
                x = scheduler.step(eps.float(), t, x).prev_sample
            out.append(x.cpu())
        return torch.cat(out) if out else torch.empty(0)

    def finetune_dpo(self, preferred: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, *, steps: int = 200,
                     batch_size: int = 8, lr: float = 1e-4, beta: float = 2000.0, seed: int = 0) -> list[dict]:
        """UtilGen's model level for Stable Diffusion: Diffusion-DPO (`dpo.dpo_loss`) on a LoRA
        adapter of the UNet. The reference is the generator as it was before: the UNet with
        its adapter switched off when the adapter is new, else a frozen copy."""
        import copy

        if not (len(preferred) == len(rejected) == len(labels)) or len(labels) == 0:
            raise SynthaugError("DPO needs pairs: as many preferred as rejected images and labels, at least one")
        fresh = not self.config.lora_rank
        reference = None if fresh else copy.deepcopy(self.pipe.unet).eval().requires_grad_(False)
        self._add_lora(self.config.lora_rank or 4, seed=seed)
        unet = self.pipe.unet
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        win, lose = self._latents(preferred), self._latents(rejected)
        labels = torch.as_tensor(labels)
        history, t0 = [], time.perf_counter()
        batch_size = min(batch_size, TRAIN_BATCH)
        unet.train()
        with self._training():
            self._dpo_steps(win, lose, labels, reference, params, optimizer, steps=steps, batch_size=batch_size, beta=beta,
                            seed=seed, history=history)
        unet.eval()
        self.train_seconds += time.perf_counter() - t0
        return history

    def _dpo_steps(self, win, lose, labels, reference, params, optimizer, *, steps, batch_size, beta, seed, history):
        from .dpo import dpo_update

        unet = self.pipe.unet
        for step in range(steps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=g)
            noise = torch.randn(win[idx].shape, generator=g).repeat(2, 1, 1, 1).to(self.device)  # same noise for both
            t = torch.randint(self._train_scheduler().config.num_train_timesteps, (len(idx),), generator=g).repeat(2)
            x0, lab = torch.cat([win[idx], lose[idx]]), labels[idx].repeat(2)
            err = self.denoising_error(x0, lab, g, noise=noise, timesteps=t.to(self.device))
            with torch.no_grad():
                if reference is None:
                    unet.disable_adapters()
                    ref_err = self.denoising_error(x0, lab, g, noise=noise, timesteps=t.to(self.device))
                    unet.enable_adapters()
                else:
                    ref_err = self.denoising_error(x0, lab, g, noise=noise, timesteps=t.to(self.device), unet=reference)
            dpo_update(err, ref_err, beta, optimizer, params, step + 1, steps, history)


def tiny_pipeline(folder: str | os.PathLike, *, unclip: bool = False, seed: int = 0) -> Path:
    """Write a random miniature Stable Diffusion pipeline (32 px, a few thousand weights per
    component, a 300-token byte-level CLIP tokenizer) to `folder`, laid out and loaded
    exactly like a real checkpoint: for tests and offline trials, never for images."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dim = 32
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer(folder / "_tokenizer_files", CLIPTokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=dim, intermediate_size=37, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=dim,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=77))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=dim,
                                attention_head_dim=(2, 4), norm_num_groups=16,
                                **(dict(class_embed_type="projection", projection_class_embeddings_input_dim=2 * dim)
                                   if unclip else {}))
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    if unclip:
        from diffusers import DDPMScheduler
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        pipe = StableUnCLIPImg2ImgPipeline(
            feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
            image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=dim, projection_dim=dim, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                intermediate_size=37, patch_size=8)),
            image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=dim),
            image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, vae=vae)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_files")
    return folder


def _tiny_tokenizer(folder: Path, tokenizer_class):
    """A CLIP BPE tokenizer over single bytes (no merges), from vocab.json/merges.txt."""
    byte_chars = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [chr(b) for b in byte_chars], 0  # GPT-2's printable stand-in for each byte
    for b in range(256):
        if b not in byte_chars:
            chars.append(chr(256 + extra))
            extra += 1
    folder.mkdir(parents=True, exist_ok=True)
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer_class.from_pretrained(folder, model_max_length=77)
