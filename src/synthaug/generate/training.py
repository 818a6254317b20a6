"""Training the embedded generator: the denoising objective with classifier-free guidance
(labels dropped to the null class), EMA weights, optional image conditioning and an
unlabelled pool, seeded per step and checkpointed, so an interrupted training resumes
exactly where it stopped."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classify.train import class_weights
from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.keys import key_dict
from ..utils.loop import Checkpoint, step_generator, warmup_constant
from ..utils.runtime import autocast, fast_dtype, progress_bar, resolve_device, send
from .augment import AugmentEmbedding, augment_images, told
from .diffusion import DiffusionGenerator
from .image_condition import random_shift
from .network import GeneratorConfig, GeneratorTrainConfig, build_train_scheduler


def fit_generator(data: ImageDataset, config: GeneratorConfig | None = None, train: GeneratorTrainConfig | None = None,
                  *, seed: int = 0, checkpoint_dir: str | Path | None = None, progress: bool = False,
                  unlabeled: ImageDataset | None = None) -> DiffusionGenerator:
    """A generator trained on `data`; with `unlabeled` (a pool of unlabelled images of the
    same kind), also on those under the null class (see `train_generator`)."""
    config = config or GeneratorConfig(image_size=data.image_size[0], channels=data.channels, classes=data.classes)
    for ds in (data, unlabeled):
        if ds is not None and ((config.image_size, config.image_size) != tuple(ds.image_size) or config.channels != ds.channels):
            raise SynthaugError(f"generator is {config.channels}x{config.image_size}px but the data is "
                                f"{ds.channels}x{ds.image_size[0]}x{ds.image_size[1]}: set data.image_size")
    torch.manual_seed(seed)
    gen = DiffusionGenerator(config)
    if gen.encoder is not None:  # the fixed image encoder, fitted once on every training image
        pool = data.images if unlabeled is None else torch.cat([data.images, unlabeled.images])
        gen.encoder.fit(pool, seed=seed)
    train_generator(gen, data, train or GeneratorTrainConfig(), seed=seed, checkpoint_dir=checkpoint_dir,
                    progress=progress, unlabeled=unlabeled)
    return gen


def train_generator(gen: DiffusionGenerator, data: ImageDataset, cfg: GeneratorTrainConfig, *, seed: int = 0,
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
    from diffusers.training_utils import EMAModel, compute_snr

    if int((data.labels < 0).sum()):
        raise SynthaugError("the generator trains on labelled images: pass the unlabeled pool as `unlabeled`")
    device = resolve_device(cfg.device)
    nets = [net.to(device).train() for net in gen.networks()]
    unet = nets[0]
    params = gen.trainable_parameters()
    augment = None
    if cfg.augment:  # non-leaking augmentation: a training-only map of the transform into the timestep embedding
        augment = AugmentEmbedding(unet.time_embedding.linear_2.out_features).to(device)
    # diffusers caps the decay at (1 + step) / (10 + step): ema_decay 0.999 binds only after ~9,000 steps, so a
    # shorter run averages over about its last tenth; a half-life sets a constant decay instead
    ema = EMAModel(params, decay=cfg.decay, min_decay=cfg.decay if cfg.ema_half_life else 0.0)
    optimizer = torch.optim.AdamW(params + ([] if augment is None else list(augment.parameters())), lr=cfg.lr,
                                  weight_decay=0.0)
    schedule = warmup_constant(optimizer, cfg.warmup_steps)
    noise_scheduler = build_train_scheduler(gen.config)
    images = data.images
    labels = data.labels
    groups = data.groups if (gen.config.num_groups and data.groups is not None) else None
    n_labelled, n_pool = len(labels), 0 if unlabeled is None else len(unlabeled)
    if n_pool:
        images = torch.cat([images, unlabeled.images])
        labels = torch.cat([labels, torch.full((n_pool,), gen.null_class)])
        groups = None if groups is None else torch.cat([groups, torch.full((n_pool,), gen.config.num_groups)])
    images = images.float().div(127.5).sub(1.0)  # [-1, 1]
    by_class = [torch.nonzero(data.labels == c).flatten() for c in range(gen.config.num_classes)]
    counts = torch.bincount(data.labels, minlength=gen.config.num_classes)
    # the labelled images' draw weights (class_sampler, group_sampler), and the class shares CBDM draws its y' by
    draw = draw_weights(data.labels, None if groups is None else groups[:n_labelled], cfg.class_sampler,
                        cfg.group_sampler, gen.config.num_classes)
    other_shares = counts.double() / counts.sum() if cfg.cbdm_draw == "frequency" else torch.ones(len(counts), dtype=torch.float64)

    start, history, spent = 0, [], 0.0
    # a checkpoint is resumed only by the same training (network, settings, seed, data size)
    dtype = fast_dtype(cfg.precision, device)
    train_settings = {k: v for k, v in key_dict(cfg).items() if k not in ("checkpoint_every", "device", "precision")}
    if not n_pool:
        train_settings.pop("unlabeled_share")
    key = {"config": gen.config.key(), "train": train_settings, "seed": seed, "data": data.fingerprint()}
    if dtype is not None:  # the arithmetic it trained in, when not float32
        key["precision"] = str(dtype).removeprefix("torch.")
    if n_pool:
        key["unlabeled"] = unlabeled.fingerprint()
    checkpoint = Checkpoint(checkpoint_dir, key)
    stateful = {"unet": unet, "ema": ema, "optimizer": optimizer, "schedule": schedule}
    if gen.condition is not None:
        stateful["condition"] = gen.condition
    if augment is not None:
        stateful["augment"] = augment
    state = checkpoint.restore(**stateful)
    window = []  # the losses since the last history entry
    if state is not None:
        ema.to(device)
        start, history, spent = state["step"], state["history"], state["seconds"]
        window = [torch.tensor(v, device=device) for v in state.get("window", [])]

    t0 = time.perf_counter()
    # told: the augmentation's map joins the UNet for the training only (sampled untold, it adds nothing)
    with progress_bar(progress) as bar, told(augment, unet):
        task = bar.add_task("train generator", total=cfg.steps, completed=start, info="")
        for step in range(start, cfg.steps):
            g = step_generator(seed, step)
            if n_pool:
                from_pool = torch.rand(cfg.batch_size, generator=g) < cfg.unlabeled_share
                idx = torch.where(from_pool, n_labelled + torch.randint(n_pool, (cfg.batch_size,), generator=g),
                                  labelled_draw(n_labelled, cfg.batch_size, draw, g))
            else:
                idx = labelled_draw(n_labelled, cfg.batch_size, draw, g)
            x0 = images[idx]
            if augment is not None:
                x0, augment.parameters_now = augment_images(x0, cfg.augment, g)
            x0 = send(x0, device)
            cond_labels = labels[idx].clone()
            drop = torch.rand(len(idx), generator=g) < gen.config.label_dropout
            cond_labels[drop] = gen.null_class
            # the group is dropped on its own too, so (class, any group) cells are trained
            drop_group = drop | (torch.rand(len(idx), generator=g) < gen.config.label_dropout)
            if gen.config.composed:  # and the class on its own: composed guidance adds (class, ·) and (·, group)
                cond_labels[(torch.rand(len(idx), generator=g) < gen.config.label_dropout) & ~drop_group] = gen.null_class
            cond_groups = None if groups is None else torch.where(drop_group, gen.config.num_groups, groups[idx])
            cond = send(gen.condition_ids(cond_labels, cond_groups), device)
            embeds = keep = None
            if gen.condition is not None:
                embeds, keep = training_image_condition(gen, images, idx, labels, by_class, g)
                # guidance contrasts (class, image) with (null, null): a dropped label drops the
                # image too, so that pair is trained as often as a dropped label
                keep = keep & ~drop
                embeds, keep = send(embeds, device), send(keep, device)
            noise = send(torch.randn(x0.shape, generator=g), device)
            t = send(torch.randint(gen.config.num_train_timesteps, (len(idx),), generator=g), device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            cond_map = gen.condition_map(len(idx), embeds, keep, device=device)
            class_in = gen.class_input(cond, embeds, keep)
            labelled_here = torch.nonzero(cond_labels != gen.null_class).flatten()  # on the CPU
            labelled = send(labelled_here, device)
            t_in = t
            if cfg.cbdm_weight:  # CBDM: the labelled samples once more in the same pass, under another class y'
                other = torch.multinomial(other_shares, len(labelled), replacement=True, generator=g) if len(labelled) else labelled_here
                picked = [None if v is None else v[send(labelled_here, v.device)] for v in (cond_groups, embeds, keep)]
                other_in = gen.class_input(send(gen.condition_ids(other, picked[0]), device), *picked[1:])
                noisy, t_in, class_in = torch.cat([noisy, noisy[labelled]]), torch.cat([t, t[labelled]]), torch.cat([class_in, other_in])
                cond_map = None if cond_map is None else torch.cat([cond_map, cond_map[labelled]])
                if augment is not None:
                    augment.parameters_now = torch.cat([augment.parameters_now, augment.parameters_now[labelled_here]])
            with autocast(device, dtype):
                predicted = gen.predict_noise(noisy, t_in, class_in, cond_map).float()
            predicted, predicted_other = predicted[:len(idx)], predicted[len(idx):]
            if cfg.min_snr_gamma:  # min(SNR, gamma) / SNR: less weight on the low-noise steps
                snr_weight = (cfg.min_snr_gamma / compute_snr(noise_scheduler, t).clamp(min=1e-8)).clamp(max=1)
                loss = ((predicted - noise).pow(2).mean((1, 2, 3)) * snr_weight).mean()
            else:
                loss = F.mse_loss(predicted, noise)
            if cfg.cbdm_weight and len(labelled):  # averaged over the whole batch, as in the reference code
                loss = loss + cbdm_regulariser(predicted[labelled], predicted_other, t[labelled], cfg.cbdm_weight,
                                               gen.config.num_train_timesteps) * len(labelled) / len(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # the generator's own (not the augmentation's map)
            optimizer.step()
            schedule.step()
            ema.step(params)
            window.append(loss.detach())  # read every 50 steps: a read per step waits for the GPU
            done = step + 1
            if done % 50 == 0 or done == cfg.steps:
                history.append({"step": done, "loss": sum(torch.stack(window).double().tolist()) / len(window)})
                window = []
                bar.update(task, completed=done, info=f"loss {history[-1]['loss']:.4f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint.save({"step": done, "history": history, "seconds": spent + time.perf_counter() - t0,
                                 "window": [float(v) for v in window]}, **stateful)  # a resumed history is the same
    ema.copy_to(params)  # sample with the EMA weights
    for net in nets:
        net.eval()
    gen.history = history
    gen.train_seconds = spent + time.perf_counter() - t0
    return gen


def draw_weights(labels: torch.Tensor, groups: torch.Tensor | None, class_sampler: str, group_sampler: str,
                 num_classes: int) -> torch.Tensor | None:
    """Each labelled image's draw weight (None: uniform over the images). A class's share of the
    draws is set by `class_sampler`; with groups, `group_sampler` splits it over the class's
    (class, group) cells: by their images (uniform), by sqrt(n_cg), or equally (balanced), so a
    class's rare groups are seen as often as `group_sampler` says, and the group direction is
    learnt from every class, not mostly from the class the group goes with."""
    counts = torch.bincount(labels, minlength=num_classes)
    if group_sampler == "uniform" or groups is None:
        return None if class_sampler == "uniform" else class_weights(class_sampler, counts)[labels].double()
    class_share = class_weights(class_sampler, counts).double() * counts  # the class's mass
    cell = labels * (int(groups.max()) + 1) + groups
    cell_counts = torch.bincount(cell).double()
    cell_mass = {"sqrt": cell_counts.sqrt(), "balanced": (cell_counts > 0).double()}[group_sampler]
    within = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, cell_mass[cell] / cell_counts[cell])
    return class_share[labels] * cell_mass[cell] / cell_counts[cell] / within[labels]


def labelled_draw(n: int, size: int, weights: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """`size` indices of labelled images: uniform over the images, or by `weights` (class_sampler)."""
    if weights is None:
        return torch.randint(n, (size,), generator=g)
    return torch.multinomial(weights, size, replacement=True, generator=g)


def cbdm_regulariser(eps: torch.Tensor, eps_other: torch.Tensor, t: torch.Tensor, tau: float, timesteps: int) -> torch.Tensor:
    """CBDM's class-balancing regulariser (Qin et al. 2023, as their reference code computes
    it): the prediction under the true class pulled towards the prediction under another
    class y' (stop-gradient), plus a quarter of the reverse commitment, both weighted by
    tau * t / T, so it acts where the noise is high and the class matters least. Pulling the
    tail's predictions towards the head's shares what the head taught the network."""
    weight = (t.float() / timesteps * tau)[:, None, None, None]
    pull = weight * (eps - eps_other.detach()).pow(2)
    commit = weight * (eps.detach() - eps_other).pow(2)
    return (pull + commit / 4).mean()


def training_image_condition(gen: DiffusionGenerator, images, idx, labels, by_class, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Each training image's conditioning embedding (a shifted view of itself, or another
    labelled image of its class) and whether it is kept (dropped at `image_dropout`)."""
    partner = idx.clone()
    if gen.config.image_pairing == "class":
        for i, c in enumerate(labels[idx].tolist()):
            if c != gen.null_class:  # pool images have no class: they pair with themselves
                members = by_class[c]
                partner[i] = members[torch.randint(len(members), (1,), generator=g)]
    view = random_shift(images[partner], gen.config.image_shift, g)
    keep = torch.rand(len(idx), generator=g) >= gen.config.image_dropout
    return gen.encoder(view), keep
