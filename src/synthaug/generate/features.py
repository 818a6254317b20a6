"""A class-conditional diffusion model over feature vectors (LDMLR, Han et al. 2024): an MLP
denoiser trained with diffusers' DDPM noise schedule on a classifier's penultimate features,
sampled with DDIM. It makes features, not images, so it is not a `Generator` (which makes
uint8 images); the `ldmlr` recipe is its one user. Small enough to train on a CPU in a
minute: features are 64 numbers (the small CNN) where images are 784. It trains and samples
on the classifier's device; its random draws come from CPU generators, so a seed gives the
same draws on any device."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..utils.runtime import progress_bar


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (as in DDPM's UNet)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class FeatureDenoiser(nn.Module):
    """eps(x_t, t, y): residual MLP blocks on the noisy features, the timestep and the class
    (index `classes` is the null class, for classifier-free guidance)."""

    def __init__(self, dim: int, classes: int, hidden: int = 512, blocks: int = 3):
        super().__init__()
        self.time_dim = hidden
        self.inp = nn.Linear(dim, hidden)
        self.cond = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label = nn.Embedding(classes + 1, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                                  nn.Linear(hidden, hidden)) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        c = self.cond(timestep_embedding(t, self.time_dim)) + self.label(y)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)


class FeatureDiffusion:
    """Fit on (features, labels); generate features for labels. Features are standardised
    per dimension for training and mapped back when generated."""

    kind = "feature-diffusion"

    def __init__(self, dim: int, classes: int, *, hidden: int = 512, blocks: int = 3, train_timesteps: int = 1000,
                 label_dropout: float = 0.1, seed: int = 0):
        from diffusers import DDPMScheduler

        self.dim, self.classes, self.label_dropout = dim, classes, label_dropout
        with torch.random.fork_rng(devices=[]):  # its first weights from `seed`, not from what ran before
            torch.manual_seed(seed)
            self.denoiser = FeatureDenoiser(dim, classes, hidden, blocks)
        self.schedule = DDPMScheduler(num_train_timesteps=train_timesteps, beta_schedule="squaredcos_cap_v2",
                                      clip_sample=False)
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.device = torch.device("cpu")

    def fit(self, features: torch.Tensor, labels: torch.Tensor, *, steps: int = 3000, batch_size: int = 256,
            lr: float = 1e-3, seed: int = 0, progress: bool = False, device=None) -> FeatureDiffusion:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        features = features.float().cpu()
        self.mean, self.std = features.mean(0), features.std(0).clamp_min(1e-4)
        self.device = torch.device(device or "cpu")
        x0_all = ((features - self.mean) / self.std).to(self.device)
        labels = labels.to(self.device)
        self.denoiser.to(self.device).train()
        optimizer = torch.optim.AdamW(self.denoiser.parameters(), lr=lr, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        with progress_bar(progress) as bar:
            task = bar.add_task("train feature diffusion", total=steps, info="")
            for step in range(steps):
                idx = torch.randint(len(x0_all), (min(batch_size, len(x0_all)),), generator=g).to(self.device)
                x0, y = x0_all[idx], labels[idx].clone()
                y[(torch.rand(len(y), generator=g) < self.label_dropout).to(self.device)] = self.classes  # the null class
                noise = torch.randn(x0.shape, generator=g).to(self.device)
                t = torch.randint(self.schedule.config.num_train_timesteps, (len(x0),), generator=g).to(self.device)
                loss = nn.functional.mse_loss(self.denoiser(self.schedule.add_noise(x0, noise, t), t, y), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                value = loss.item()
                if step % 100 == 0 or step == steps - 1:
                    self.history.append({"step": step + 1, "loss": value})
                bar.update(task, completed=step + 1, info=f"loss {value:.4f}")
        self.denoiser.eval()
        self.train_seconds = time.perf_counter() - t0
        return self

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, *, seed: int = 0, sampling_steps: int = 50,
                 guidance_scale: float = 1.0) -> torch.Tensor:
        """Features for `labels` (DDIM, deterministic given `seed`); guidance > 1 mixes in the
        unconditional prediction (classifier-free guidance)."""
        from diffusers import DDIMScheduler

        sampler = DDIMScheduler.from_config(self.schedule.config)
        sampler.set_timesteps(sampling_steps)
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        x = torch.randn((len(labels), self.dim), generator=torch.Generator().manual_seed(seed)).to(self.device)
        null = torch.full_like(labels, self.classes)
        for t in sampler.timesteps:
            steps = t.repeat(len(labels)).to(self.device)
            eps = self.denoiser(x, steps, labels)
            if guidance_scale != 1.0:
                plain = self.denoiser(x, steps, null)
                eps = plain + guidance_scale * (eps - plain)
            x = sampler.step(eps, t, x).prev_sample
        return x.cpu() * self.std + self.mean
