"""The generation stages every generative recipe shares: get the generator (cached, loaded
or trained now), then fill a store with a plan's images and load them back."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from ..classify.evaluate import predict_logits
from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..store import SyntheticStore
from .base import Generator
from .cache import generator_for, provenance, sampler_config, trains_embedded
from .ensemble import Ensemble, member_seeds
from .executors import check_guided, execute
from .feedback import criterion


def generator_stage(real: ImageDataset, config, *, progress: bool = False, unlabeled: ImageDataset | None = None,
                    image_embed_dim: int = 0) -> tuple[Generator, dict]:
    """The run's generator and a description of it (source, fingerprint, training curve, seconds);
    with `generator.ensemble` > 1, an `Ensemble` of that many trained at successive seeds."""
    t0 = time.perf_counter()
    cache_root = config.generator.cache_dir or Path(config.output_dir) / "generators"
    section = config.generator
    if section.ensemble > 1 and not trains_embedded(section):
        raise SynthaugError("generator.ensemble trains that many embedded generators at successive seeds: leave "
                            "generator.path and generator.pretrained unset, or set generator.ensemble=1")
    made = [generator_for(real, replace(section, seed=seed), cache_root=cache_root, progress=progress,
                          device=config.train.device, unlabeled=unlabeled, image_embed_dim=image_embed_dim)
            for seed in member_seeds(section.seed, section.ensemble)]
    if len(made) == 1:
        generator, info = made[0]
    else:
        generator = Ensemble([g for g, _ in made])
        info = {"source": "ensemble", "trained_now": any(i["trained_now"] for _, i in made),
                "members": [{**i, "fingerprint": g.fingerprint()} for g, i in made]}
    return generator, {**info, "fingerprint": generator.fingerprint(), "train_seconds": generator.train_seconds,
                       "history": generator.history, "seconds": time.perf_counter() - t0}


def generate_stage(plan: list[dict], generator: Generator, config, store_dir: str | Path, real: ImageDataset,
                   *, progress: bool = False) -> tuple[ImageDataset, dict]:
    """Generate the plan's missing rows into the store at `store_dir` (rows that start from
    real images index into `real`), check the store, and load the plan's images. With
    `generator.feedback`, select's scorer (trained at the generator's seed, kept in the store's
    `scorers/`) guides the sampling (`feedback.py`)."""
    sampling = sampler_config(config.generator, config.train.device)
    store = SyntheticStore(store_dir, real.classes)
    t0 = time.perf_counter()
    ex = config.executor
    guide, guide_key = None, None
    if sampling.feedback and plan:  # feedback guidance: select's scorer, at the generator's seed
        from ..select.stage import scorer_for, scorer_settings

        check_guided(ex.name)
        guide_key = scorer_settings(real, config, config.generator.seed)[1]
        store.check_made(plan, provenance(generator, sampling, guide_key))  # before the scorer trains (reads only)
        store.claim()  # the scorer is kept in the store
        guide = scorer_for(real, config, store.root / "scorers", seed=config.generator.seed, progress=progress)
    written = execute(ex.name, store, plan, generator, sampling, real, provenance=provenance(generator, sampling, guide_key),
                      progress=progress, workers=ex.workers, shard_size=ex.shard_size, address=ex.address, guide=guide)
    seconds = time.perf_counter() - t0
    store.verify()
    synthetic = store.load(ids=[r["id"] for r in plan]) if plan else real.subset([])
    info = {"planned": len(plan), "generated_now": written, "images": len(synthetic), "store": str(store.root),
            "images_per_second": written / seconds if written else None, "seconds": seconds, "executor": ex.name}
    if guide is not None:  # how the guide reads what it guided: its criterion, and the share it reads as their class
        logits = predict_logits(guide, synthetic.images)
        info["feedback"] = {"criterion": sampling.feedback_criterion, "scale": sampling.feedback,
                            "value": float(criterion(logits, synthetic.labels, sampling.feedback_criterion).mean()),
                            "read_as_class": float((logits.argmax(1) == synthetic.labels).float().mean())}
    return synthetic, info
