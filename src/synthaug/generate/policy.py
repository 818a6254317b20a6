"""Instance-level policy optimisation (UtilGen, seed 000) for the embedded generator.

The generation policy of a class-conditional model is what it is given besides its weights:
the class-embedding vector fed to the UNet (the "prompt embedding" of Stable Diffusion)
and the initial noise x_T.

- `optimise_class_embeddings`: textual inversion on high-utility images: only the class's
  embedding vectors move, to lower the denoising loss on that class's high-utility samples,
  with a penalty that keeps them close to the original vectors.
- `invert_noise`: DDIM inversion (diffusers' `DDIMInverseScheduler`) of high-utility
  samples: the x_T from which the deterministic DDIM sampler returns (close to) each
  sample. New initial noises are drawn around them (`mix_noise`). Inversion was chosen over
  gradient steps through a few sampler steps because it needs no gradient through the
  sampler, is exact in the limit of small steps, and is what the paper does; its guidance
  is set apart from the generation guidance (the paper's asymmetric guidance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.loop import step_generator
from ..utils.runtime import shown_steps
from .diffusion import DiffusionGenerator
from .network import build_train_scheduler, guided_steps


def optimise_class_embeddings(generator: DiffusionGenerator, images: torch.Tensor, labels: torch.Tensor, *,
                              steps: int = 200, lr: float = 5e-3, proximity: float = 1.0, batch_size: int = 32,
                              anchor: torch.Tensor | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Move the embedding vectors of the classes in `labels` (and only those) to lower the
    denoising loss on `images` (uint8, high-utility samples of those classes), penalised by
    `proximity` x the mean squared distance to `anchor` (the original table, e.g. the base
    generator's over several rounds; default: the vectors as they are now). Changes the
    generator in place; returns the first and last denoising loss and the relative shift
    per class from the anchor. A Stable Diffusion generator moves its prompt embeddings the
    same way, in latent space (`StableDiffusionGenerator.optimise_policy_embeddings`)."""
    table = generator.embedding_table()
    device = table.weight.device
    current = table.weight.detach().clone()
    original = current if anchor is None else anchor.to(device)
    cells = generator.condition_ids(torch.as_tensor(labels)).to(device)
    rows = torch.zeros(len(original), dtype=torch.bool, device=device)
    rows[cells.unique()] = True
    frozen = [p for p in generator.trainable_parameters() if p is not table.weight]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    table.weight.requires_grad_(True)
    optimizer = torch.optim.Adam([table.weight], lr=lr)
    noise_scheduler = build_train_scheduler(generator.config)
    x0_all = images.float().div(127.5).sub(1)
    losses = []
    try:
        for step in shown_steps(range(steps), progress, "class embeddings"):
            g = step_generator(seed, step)
            idx = torch.randint(len(cells), (min(batch_size, len(cells)),), generator=g)
            x0 = x0_all[idx].to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(generator.config.num_train_timesteps, (len(idx),), generator=g).to(device)
            eps = generator.predict_noise(noise_scheduler.add_noise(x0, noise, t), t, generator.class_input(cells[idx]),
                                          generator.condition_map(len(idx), device=device))
            denoise = F.mse_loss(eps, noise)
            drift = (table.weight[rows] - original[rows]).pow(2).mean()
            loss = denoise + proximity * drift
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            table.weight.grad[~rows] = 0  # only the targeted classes move
            optimizer.step()
            losses.append(float(denoise.detach()))
    finally:
        table.weight.requires_grad_(True)
        for p, w in zip(frozen, was):
            p.requires_grad_(w)
    with torch.no_grad():
        table.weight[~rows] = current[~rows]
        shift = ((table.weight - original).norm(dim=1) / original.norm(dim=1).clamp(min=1e-8))[rows]
    window = max(1, len(losses) // 10)
    return {"loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window,
            "relative_shift": [round(float(v), 4) for v in shift]}


@torch.no_grad()
def invert_noise(generator: DiffusionGenerator, images: torch.Tensor, labels, *, steps: int = 25,
                 guidance_scale: float = 1.0, guidance_interval: tuple[float, float] | None = None,
                 batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """DDIM inversion: for each uint8 image, the initial noise x_T from which the DDIM
    sampler (same steps, this guidance, within `guidance_interval` where set) returns close to it
    (for Stable Diffusion: the initial latents, `StableDiffusionGenerator.invert_noise`)."""
    from diffusers import DDIMInverseScheduler

    device = next(generator.unet.parameters()).device
    train = build_train_scheduler(generator.config).config
    out = []
    labels = torch.as_tensor(labels)
    for i in shown_steps(range(0, len(images), batch_size), progress, "DDIM inversion, batches"):
        scheduler = DDIMInverseScheduler.from_config(train, timestep_spacing="leading", clip_sample=False)
        scheduler.set_timesteps(steps)
        x = images[i : i + batch_size].to(device).float() / 127.5 - 1
        cells = generator.condition_ids(labels[i : i + batch_size]).to(device)
        cond = generator.class_input(cells)
        cond_map = generator.condition_map(len(x), device=device)
        if guidance_scale != 1.0:
            null = generator.class_input(generator.condition_ids(torch.full_like(cells, generator.null_class).cpu()).to(device))
        guiding = guided_steps(scheduler, scheduler.timesteps, guidance_interval)
        for t, guided in zip(scheduler.timesteps, guiding):
            if guidance_scale != 1.0 and guided:
                both = None if cond_map is None else torch.cat([cond_map, cond_map])
                e_c, e_u = generator.predict_noise(torch.cat([x, x]), t, torch.cat([cond, null]), both).chunk(2)
                eps = e_u + guidance_scale * (e_c - e_u)
            else:
                eps = generator.predict_noise(x, t, cond, cond_map)
            x = scheduler.step(eps, t, x).prev_sample
        out.append(x.cpu())
    return torch.cat(out) if out else torch.empty(0)


def mix_noise(inverted: torch.Tensor, seeds, mix: float) -> torch.Tensor:
    """New initial noises around inverted ones: mix * x_T + sqrt(1 - mix^2) * fresh noise
    from each seed (unit variance kept); mix=1 returns the inverted noise itself."""
    fresh = torch.stack([torch.randn(inverted.shape[1:], generator=torch.Generator().manual_seed(int(s) ^ 0x5EED))
                         for s in seeds])
    return mix * inverted + (1 - mix**2) ** 0.5 * fresh
