"""Model-level optimisation (UtilGen, seed 000): fine-tune the generator with Diffusion-DPO
(Wallace et al. 2023) on pairs of a preferred (high-utility) and a rejected (low-utility)
image of the same class, against a frozen reference copy of the generator.

For a pair noised with the same noise at the same timestep, with e = ||eps - eps_pred||^2
(mean over pixels) for the trained model and the reference:

    loss = -log sigmoid( -beta / 2 * ((e_w - e_l) - (e_w_ref - e_l_ref)) )

so the model lowers its denoising error on preferred images relative to rejected ones, by
more than the reference does, while the reference anchors it (diffusers' DPO example uses
the same form).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ..errors import SynthaugError
from ..utils.loop import step_generator
from ..utils.runtime import shown_steps
from .diffusion import DiffusionGenerator
from .network import build_train_scheduler


def dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
             beta: float) -> torch.Tensor:
    """The Diffusion-DPO loss from per-pair denoising errors (see the module docstring)."""
    inside = -0.5 * beta * ((model_err_w - model_err_l) - (ref_err_w - ref_err_l))
    return -F.logsigmoid(inside).mean()


def dpo_update(err: torch.Tensor, ref_err: torch.Tensor, beta: float, optimizer, params, step: int, steps: int,
               history: list[dict]):
    """One optimiser step on the DPO loss of a batch of per-image denoising errors (first
    half: the preferred images, second half: their rejected partners); logs every 10 steps
    the loss and the share of pairs ranked the right way relative to the reference."""
    (err_w, err_l), (ref_w, ref_l) = err.chunk(2), ref_err.chunk(2)
    loss = dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if step % 10 == 0 or step == steps:
        margin = ((ref_w - ref_l) - (err_w - err_l)).detach()
        history.append({"step": step, "loss": float(loss.detach()), "ranked_right": float((margin > 0).float().mean())})


def finetune_dpo(generator: DiffusionGenerator, preferred: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, *,
                 steps: int = 200, batch_size: int = 32, lr: float = 1e-5, beta: float = 2000.0, seed: int = 0,
                 progress: bool = False) -> list[dict]:
    """Fine-tune `generator`'s UNet weights in place with Diffusion-DPO on pairs
    (`preferred[i]`, `rejected[i]`, both uint8 and of class `labels[i]`). The class-embedding
    table is left alone: it is the generation policy, optimised on its own
    (`policy.optimise_class_embeddings`). Returns the training log (loss, and the share of
    pairs the model ranks the right way, relative to the reference). Trains on the device
    the generator is on. A Stable Diffusion generator trains a LoRA adapter instead
    (`StableDiffusionGenerator.finetune_dpo`)."""
    if not (len(preferred) == len(rejected) == len(labels)) or len(labels) == 0:
        raise SynthaugError("DPO needs pairs: as many preferred as rejected images and labels, at least one")
    dev = next(generator.unet.parameters()).device
    unet = generator.unet.train()
    if generator.condition is not None:
        generator.condition.to(dev)
    reference = copy.deepcopy(unet).eval().requires_grad_(False)
    params = [p for name, p in unet.named_parameters() if not name.startswith("class_embedding.")]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    noise_scheduler = build_train_scheduler(generator.config)
    win = preferred.float().div(127.5).sub(1)
    lose = rejected.float().div(127.5).sub(1)
    cells = generator.condition_ids(torch.as_tensor(labels))
    history, t0 = [], time.perf_counter()
    for step in shown_steps(range(steps), progress, "DPO"):
        g = step_generator(seed, step)
        idx = torch.randint(len(labels), (min(batch_size, len(labels)),), generator=g)
        x0 = torch.cat([win[idx], lose[idx]]).to(dev)
        noise = torch.randn(win[idx].shape, generator=g).repeat(2, 1, 1, 1).to(dev)  # the same noise for both
        t = torch.randint(generator.config.num_train_timesteps, (len(idx),), generator=g).repeat(2).to(dev)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        with torch.no_grad():  # the condition vectors are inputs here, not trained
            class_input = generator.class_input(cells[idx].repeat(2).to(dev))
        cond_map = generator.condition_map(2 * len(idx), device=dev)
        err = (generator.predict_noise(noisy, t, class_input, cond_map) - noise).pow(2).mean(dim=(1, 2, 3))
        with torch.no_grad():
            x = noisy if cond_map is None else torch.cat([noisy, cond_map], 1)
            ref_err = (reference(x, t, class_labels=class_input).sample - noise).pow(2).mean(dim=(1, 2, 3))
        dpo_update(err, ref_err, beta, optimizer, params, step + 1, steps, history)
    unet.eval()
    generator.train_seconds += time.perf_counter() - t0
    return history
