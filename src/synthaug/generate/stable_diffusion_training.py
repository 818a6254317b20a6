"""Fine-tuning a Stable Diffusion generator with peft LoRA adapters: adaptation to the
user's images (`adapt`, DreamBooth-LoRA without prior preservation), and UtilGen's policy
and model steps (`optimise_policy_embeddings`, `invert_noise`, `finetune_dpo`). A mixin of
`StableDiffusionGenerator` (stable_diffusion.py: loading, prompts, sampling), whose `pipe`,
`config`, `device`, `resolution` and `prompt_embeds` it uses."""

from __future__ import annotations

import contextlib
import os
import time

import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.loop import Checkpoint, step_generator
from ..utils.runtime import progress_bar, shown_steps

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TRAIN_BATCH = 8  # at most this many images per fine-tuning step (memory at 512 px)


class LoraWeights:
    """A UNet's LoRA adapter weights as a checkpoint sees a stateful object (peft's state dict)."""

    def __init__(self, unet):
        self.unet = unet

    def state_dict(self) -> dict:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.unet)

    def load_state_dict(self, state: dict):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state)


class StableDiffusionTraining:
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
        gradient checkpointing; the attention processors it had come back afterwards, so a
        generator trained in this process samples as the same generator read back."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet, gpu = self.pipe.unet, self.device.type == "cuda"
        before = unet.attn_processors if gpu else None
        if gpu:
            unet.set_attn_processor(AttnProcessor2_0())
            unet.enable_gradient_checkpointing()
        try:
            yield unet
        finally:
            if gpu:
                unet.disable_gradient_checkpointing()
                unet.set_attn_processor(before)

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
        checkpoint = Checkpoint(checkpoint_dir, {"pipeline": self.fingerprint(), "data": data.fingerprint(),
                                                 "steps": steps, "rank": rank, "lr": lr, "batch_size": batch_size,
                                                 "seed": seed})
        stateful = {"lora": LoraWeights(unet), "optimizer": optimizer}
        state = checkpoint.restore(**stateful)
        if state is not None:
            start, history = state["step"], state["history"]
        with progress_bar(progress) as bar, self._training():
            task = bar.add_task("adapt generator", total=steps, completed=start, info="")
            for step in range(start, steps):
                g = step_generator(seed, step)
                idx = torch.randint(len(data), (min(batch_size, len(data)),), generator=g)
                loss = self.denoising_error(latents[idx], data.labels[idx], g).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if (step + 1) % 10 == 0 or step + 1 == steps:
                    history.append({"step": step + 1, "loss": float(loss.detach())})
                if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
                    checkpoint.save({"step": step + 1, "history": history}, **stateful)
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
                                   anchor: torch.Tensor | None = None, seed: int = 0, progress: bool = False) -> dict:
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
            for step in shown_steps(range(steps), progress, "prompt embeddings"):
                g = step_generator(seed, step)
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
                     guidance_interval: tuple[float, float] | None = None, batch_size: int = 32,
                     progress: bool = False) -> torch.Tensor:
        """DDIM inversion in latent space (`policy.invert_noise` for Stable Diffusion): the
        initial latents from which the DDIM sampler (same steps) returns close to each image,
        under its class prompt (with `prompt_modifiers`, the first modifier's: the image a
        new seed makes from them carries that seed's modifier)."""
        from diffusers import DDIMInverseScheduler

        if guidance_interval is not None:  # as its sampling: a Stable Diffusion pipeline guides every step
            raise SynthaugError("a Stable Diffusion pipeline guides every step: leave generator.guidance_interval unset")

        labels = torch.as_tensor(labels)
        out = []
        for i in shown_steps(range(0, len(images), batch_size), progress, "DDIM inversion, batches"):
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
                     batch_size: int = 8, lr: float = 1e-4, beta: float = 2000.0, seed: int = 0,
                     progress: bool = False) -> list[dict]:
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
                            seed=seed, history=history, progress=progress)
        unet.eval()
        self.train_seconds += time.perf_counter() - t0
        return history

    def _dpo_steps(self, win, lose, labels, reference, params, optimizer, *, steps, batch_size, beta, seed, history,
                   progress=False):
        from .dpo import dpo_update

        unet = self.pipe.unet
        for step in shown_steps(range(steps), progress, "DPO"):
            g = step_generator(seed, step)
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
