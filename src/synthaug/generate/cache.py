"""The generator stage of a run: load the configured generator, or train one on the
training split, cached by a fingerprint of the data and the config, so a second run (or a
second recipe) on the same data reuses it, and an interrupted training resumes."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..utils.keys import drop_former
from ..utils.registry import Registry
from ..utils.runtime import fast_dtype, resolve_device
from .base import Generator
from .diffusion import DiffusionGenerator
from .network import GeneratorConfig, GeneratorTrainConfig, SamplerConfig
from .stable_diffusion import KIND as SD_KIND
from .stable_diffusion import StableDiffusionGenerator


@dataclass(frozen=True)
class GeneratorKind:
    """How to get a generator of one kind: `make(data, section, *, cache_root, progress, device,
    unlabeled, image_embed_dim) -> (generator, description)` for a run, and `load(folder,
    device=)` for a folder its `save_pretrained` wrote (generator.json's `kind`)."""

    name: str
    make: Callable[..., tuple[Generator, dict]]
    load: Callable[..., Generator]


GENERATORS: Registry[GeneratorKind] = Registry("generator")


def register_generator(name: str, *, load: Callable[..., Generator]):
    """Register `make` as generator kind `name` (chosen with `generator.kind=name`)."""
    return GENERATORS.register(name, lambda make: GeneratorKind(name, make, load))


TRAINING_KEYS = ("preset", "steps", "batch_size", "lr", "ema_decay", "label_dropout", "seed")


def generator_fingerprint(data: ImageDataset, section, num_groups: int, *, unlabeled: ImageDataset | None = None,
                          image_embed_dim: int = 0, precision: str = "float32") -> str:
    keys = {k: getattr(section, k) for k in TRAINING_KEYS}
    payload = {"data": data.fingerprint(), "generator": keys, "groups": num_groups}
    if precision != "float32":  # keys added only when used: float32 generators keep their names
        payload["precision"] = precision
    if unlabeled is not None:  # keys added only when used: older generators keep their names
        payload["unlabeled"] = [unlabeled.fingerprint(), section.unlabeled_share]
    if image_embed_dim:
        payload["image"] = [image_embed_dim, section.image_dropout, section.image_pairing]
    if num_groups and not image_embed_dim:  # group generators from before composed guidance keep their names
        payload["group_guidance"] = "composed"
    levers = drop_former(lever_settings(section, num_groups), GeneratorTrainConfig)
    if levers:  # the tail levers away from their former values (older generators keep their names)
        payload["levers"] = levers
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def generator_kind(section) -> str:
    """The kind of generator a config's generator section asks for: `kind`, or with `auto`
    Stable Diffusion when `pretrained` is set, else the embedded generator."""
    if section.kind != "auto":
        return section.kind
    return SD_KIND if section.pretrained else "embedded"


def trains_embedded(section) -> bool:
    """Whether the run trains (or reuses from the cache) an embedded generator."""
    return generator_kind(section) == "embedded" and not section.path


def generator_for(data: ImageDataset, section, *, cache_root: str | Path, progress: bool = False,
                  device: str = "auto", unlabeled: ImageDataset | None = None,
                  image_embed_dim: int = 0) -> tuple[Generator, dict]:
    """The generator for `data`: the saved one in `section.path`, else one of the kind the
    section asks for (`generator_kind`), made by that kind's registered `make`: the embedded
    generator is trained on `data` (or reused from the cache), Stable Diffusion loaded (and
    LoRA-adapted). Returns it and a description.

    `unlabeled`: a pool of unlabelled images the generator also trains on (under the null
    class); `image_embed_dim` > 0: an image-conditioned generator (AugCond)."""
    if section.path:
        gen = load_generator(section.path, device=device)
        gen.check_compatible(data)
        if image_embed_dim and not gen.image_embed_dim:
            raise SynthaugError(f"the generator in '{section.path}' is not image-conditioned: train one "
                                "(leave generator.path unset)")
        return gen, {"source": "pretrained", "path": str(section.path), "trained_now": False}
    make = GENERATORS.lookup(generator_kind(section)).make
    return make(data, section, cache_root=Path(cache_root), progress=progress, device=device, unlabeled=unlabeled,
                image_embed_dim=image_embed_dim)


@register_generator("embedded", load=DiffusionGenerator.from_pretrained)
def embedded_for(data: ImageDataset, section, *, cache_root: Path, progress: bool = False, device: str = "auto",
                 unlabeled: ImageDataset | None = None, image_embed_dim: int = 0) -> tuple[DiffusionGenerator, dict]:
    """The embedded generator trained on `data` with the section's settings: the cached one
    (`<cache_root>/<fingerprint>/`), else trained now (resuming its checkpoint)."""
    num_groups = len(data.group_names) if data.groups is not None and data.group_names else 0
    unlabeled = unlabeled if unlabeled is not None and len(unlabeled) else None
    train = train_config(section, device, num_groups=num_groups)
    fingerprint = generator_fingerprint(data, section, num_groups, unlabeled=unlabeled, image_embed_dim=image_embed_dim,
                                        precision=train.precision)
    folder = Path(cache_root) / fingerprint
    if (folder / "generator.json").exists():
        try:
            gen = DiffusionGenerator.from_pretrained(folder, device=device)
        except SynthaugError as e:
            raise SynthaugError(f"the cached generator '{folder}' cannot be loaded ({e}); delete the folder '{folder}' "
                                "and run again to retrain it") from None
        return gen, {"source": "cache", "path": str(folder), "trained_now": False}
    config = network_config(section, data, num_groups=num_groups, image_embed_dim=image_embed_dim)
    gen = DiffusionGenerator.fit(data, config, train, seed=section.seed, checkpoint_dir=folder / "checkpoint",
                                 progress=progress, unlabeled=unlabeled)
    gen.save_pretrained(folder)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return gen, {"source": "trained", "path": str(folder), "trained_now": True, "train_config": asdict(train)}


# The run config's `generator` section is flat (generator.steps, generator.sampler, ...); these
# are the one place that reads it into the library's settings for the network, its training and
# sampling.
def network_config(section, data: ImageDataset, *, num_groups: int = 0, image_embed_dim: int = 0) -> GeneratorConfig:
    """The network a run trains; with groups, class and group guidance composed (`GeneratorConfig.group_guidance`)."""
    return GeneratorConfig(image_size=data.image_size[0], channels=data.channels, classes=data.classes,
                           num_groups=num_groups, preset=section.preset, label_dropout=section.label_dropout,
                           image_embed_dim=image_embed_dim, image_dropout=section.image_dropout,
                           image_pairing=section.image_pairing,
                           group_guidance="composed" if num_groups and not image_embed_dim else "joint")


def train_config(section, device: str = "auto", *, num_groups: int = 0) -> GeneratorTrainConfig:
    """The section's training settings for data with `num_groups` groups (0: none)."""
    return GeneratorTrainConfig(steps=section.steps, batch_size=section.batch_size, lr=section.lr,
                                ema_decay=section.ema_decay, checkpoint_every=section.checkpoint_every,
                                unlabeled_share=section.unlabeled_share, device=device,
                                precision=resolved_precision(section.precision, device),
                                **lever_settings(section, num_groups))


def lever_settings(section, num_groups: int) -> dict:
    """The section's tail levers (`GeneratorTrainConfig.ADDED`), `group_sampler: auto` made
    concrete: sqrt where the data has groups, else uniform."""
    levers = {k: getattr(section, k) for k in GeneratorTrainConfig.ADDED}
    if levers["group_sampler"] == "auto":
        levers["group_sampler"] = "sqrt" if num_groups else "uniform"
    return levers


def sampler_config(section, device: str = "auto") -> SamplerConfig:
    """The section's sampling settings, `auto` precision resolved for `device` (so a store's
    provenance names the arithmetic its images were made in, wherever they were made)."""
    return SamplerConfig(sampler=section.sampler, steps=section.sampling_steps, guidance_scale=section.guidance_scale,
                         group_guidance_scale=section.group_guidance_scale,
                         batch_size=section.sampling_batch_size, precision=resolved_precision(section.precision, device),
                         feedback=section.feedback, feedback_criterion=section.feedback_criterion,
                         feedback_every=section.feedback_every, guidance_interval=section.guidance_interval)


def resolved_precision(precision: str, device: str) -> str:
    """`auto` made concrete for `device`: "bfloat16" or "float32"."""
    return "bfloat16" if fast_dtype(precision, resolve_device(device)) is not None else "float32"


def check_generator(section, data: ImageDataset, *, image_embed_dim: int = 0, groups: bool = False):
    """Fail, before anything is written, on an embedded generator that cannot be built for `data`,
    or a saved one (`generator.path`) that cannot serve the recipe: not image-conditioned where
    `image_embed_dim` asks for it, not conditioned on groups where the recipe draws (class, group)
    cells (`groups`)."""
    if section.path:
        gen = check_generator_folder(section.path, data)
        if gen is not None and image_embed_dim and not gen.image_embed_dim:
            raise SynthaugError(f"the generator in '{section.path}' is not image-conditioned: train one "
                                "(leave generator.path unset)")
        if gen is not None and groups and not gen.config.num_groups:
            raise SynthaugError(f"the generator in '{section.path}' is not conditioned on groups and this run draws "
                                "(class, group) cells: train one on this split (leave generator.path unset)")
    if trains_embedded(section):
        network_config(section, data, image_embed_dim=image_embed_dim)
        if section.group_sampler not in ("auto", "uniform") and (data.groups is None or not data.group_names):
            raise SynthaugError(f"generator.group_sampler={section.group_sampler} draws (class, group) cells, but the "
                                "training data has no groups: use split.kind=colored, or generator.group_sampler=uniform")


def provenance(generator: Generator, sampling: SamplerConfig, guide: str | None = None) -> dict:
    """What made an image, as recorded in a store's metadata (a store refuses rows made otherwise):
    with feedback guidance, also which classifier guided it (`guide`: its training key)."""
    made = {"generator": generator.fingerprint(), **sampling_provenance(sampling, generator.kind)}
    if generator.kind == "ensemble":  # known before its members train (check_store_made), unlike its fingerprint
        made["ensemble"] = len(generator.members)
    if guide is not None:
        made["feedback_guide"] = guide
    return made


def sampling_provenance(sampling: SamplerConfig, kind: str | None) -> dict:
    """`provenance` less the generator's fingerprint: how a generator of `kind` samples (None:
    not known yet, so the arithmetic, which only the embedded generator records, is left out)."""
    made = {"guidance_scale": sampling.guidance_scale, "sampler": f"{sampling.sampler}/{sampling.steps}"}
    if sampling.feedback:  # in the sampler's name, which every store records: a store made without it refuses it
        made["sampler"] += (f" feedback {sampling.feedback_criterion} {sampling.feedback:g}"
                            f"{f' every {sampling.feedback_every}' if sampling.feedback_every != 1 else ''}")
    if sampling.guidance_interval is not None:  # in the sampler's name too: a store made guiding every step refuses it
        low, high = sampling.guidance_interval
        made["sampler"] += f" guided in ({low!r}, {high!r}]"
    # the UNet's arithmetic when not float32 (float32 stores keep their rows; Stable Diffusion
    # computes in its own generator.dtype)
    if sampling.precision != "float32" and kind in ("embedded", "ensemble"):  # an ensemble's: embedded generators
        made["precision"] = sampling.precision
    if sampling.group_guidance_scale is not None:  # added later: a row without it was made at None (RECORDED_AWAY_FROM)
        made["group_guidance_scale"] = sampling.group_guidance_scale
    return made


def check_store_made(store_dir, classes: list[str], plan: list[dict], section, device: str = "auto", *,
                     sampling: SamplerConfig | None = None):
    """Fail, before the generator is trained, where the store at `store_dir` (if it is one) holds
    one of `plan`'s rows made another way than this run would (the fields the rows carry, the
    sampler's settings: the section's, or `sampling` where the recipe samples otherwise; the
    generator's fingerprint is checked once it exists). Reads only."""
    from ..store import SyntheticStore, is_store

    if store_dir and is_store(store_dir):
        kind = generator_kind(section) if not section.path else None  # a saved generator's kind: known once loaded
        made = sampling_provenance(sampling or sampler_config(section, device), kind)
        size = saved_ensemble_size(section.path) if section.path else section.ensemble
        if size > 1:  # a store one generator made refuses an ensemble before its members train, and the reverse
            made["ensemble"] = size
        SyntheticStore(store_dir, classes).check_made(plan, made)


@register_generator(SD_KIND, load=StableDiffusionGenerator.from_pretrained)
def stable_diffusion_for(data: ImageDataset, section, *, cache_root: Path, progress: bool = False,
                         device: str = "auto", unlabeled: ImageDataset | None = None,
                         image_embed_dim: int = 0) -> tuple[StableDiffusionGenerator, dict]:
    """The configured Stable Diffusion pipeline as a generator for `data`; with
    `section.adapt_steps`, LoRA-adapted to the data first (cached like a trained generator)."""
    options = dict(channels=data.channels, image_size=data.image_size[0], prompt=section.prompt,
                   modifiers=list(section.prompt_modifiers), negative_prompt=section.negative_prompt,
                   resolution=section.resolution, dtype=section.dtype, attention_slicing=section.attention_slicing,
                   noise_level=section.noise_level)
    info = {"source": "pretrained", "kind": SD_KIND, "path": section.pretrained, "trained_now": False}
    folder = None
    if section.adapt_steps:
        payload = {"data": data.fingerprint(), "pretrained": section.pretrained, "options": options,
                   "adapt": [section.adapt_steps, section.lora_rank, section.adapt_lr, section.batch_size, section.seed]}
        folder = Path(cache_root) / ("sd-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16])
    if folder is not None and (folder / "generator.json").exists():
        gen = StableDiffusionGenerator.from_pretrained(folder, device=device)
        info.update(source="cache", path=str(folder))
    else:
        gen = StableDiffusionGenerator.from_pretrained(section.pretrained, data.classes, device=device, **options)
        if folder is not None:
            gen.adapt(data, steps=section.adapt_steps, rank=section.lora_rank, lr=section.adapt_lr,
                      batch_size=min(section.batch_size, 16), seed=section.seed, progress=progress,
                      checkpoint_dir=folder / "checkpoint", checkpoint_every=section.checkpoint_every)
            gen.save_pretrained(folder)
            shutil.rmtree(folder / "checkpoint", ignore_errors=True)
            info.update(source="adapted", path=str(folder), trained_now=True, base=section.pretrained)
    gen.check_compatible(data)
    if image_embed_dim and not gen.unclip:
        raise SynthaugError(f"this recipe conditions on images (augcond, dpt): '{section.pretrained}' is not an unCLIP "
                            "pipeline (use e.g. stabilityai/stable-diffusion-2-1-unclip)")
    return gen, info


def saved_ensemble_size(folder: str | Path) -> int:
    """How many generators a saved generator folder holds: an ensemble's members, else 1."""
    from .ensemble import KIND, saved_size

    return saved_size(folder) if saved_kind(folder) == KIND else 1


def saved_kind(folder: str | Path) -> str | None:
    """The kind a generator folder's generator.json names (None: the embedded generator)."""
    meta = Path(folder) / "generator.json"
    if not meta.is_file():
        return None
    try:
        saved = json.loads(meta.read_text())
        return saved.get("kind") if isinstance(saved, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SynthaugError(f"generator folder '{folder}': generator.json is not valid JSON ({e}): point at a folder "
                            "written by save_pretrained") from None


_CHECKED: dict = {}  # check_generator_folder's loads, by folder, its files' times and the data's shape


def check_generator_folder(folder: str | Path, data: ImageDataset | None = None) -> Generator | None:
    """Raise (one line) unless `folder` holds a saved generator that loads (and, given
    `data`, makes images for it): the embedded generator is loaded on the CPU (it is
    small) and returned; a Stable Diffusion folder is checked for its generator.json. Writes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SynthaugError(f"generator folder '{folder}' has no generator.json (it is not a folder): point "
                            "generator.path at a folder written by save_pretrained")
    from .ensemble import KIND, Ensemble

    kind = saved_kind(folder) or "embedded"
    if kind != KIND:
        GENERATORS.lookup(kind)
    if kind not in ("embedded", KIND):  # loading a pipeline is heavy: its generator.json is checked
        if not isinstance(json.loads((folder / "generator.json").read_text()).get("config"), dict):
            raise SynthaugError(f"generator folder '{folder}': generator.json has no config: point at a folder "
                                "written by save_pretrained")
        return None
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file())
    key = (str(folder.resolve()), stamp)  # the checks of a run and its bench cells load a folder once
    if key not in _CHECKED:
        _CHECKED.clear()
        _CHECKED[key] = (Ensemble if kind == KIND else DiffusionGenerator).from_pretrained(folder, device="cpu")
    gen = _CHECKED[key]
    if data is not None:
        gen.check_compatible(data)
    return gen


def load_generator(folder: str | Path, *, device: str = "auto") -> Generator:
    """A generator saved with `save_pretrained`, of the kind its generator.json names."""
    from .ensemble import KIND, Ensemble

    kind = saved_kind(Path(folder)) or "embedded"
    if kind == KIND:  # generators made of generators: not a kind a run asks for (generator.ensemble is)
        return Ensemble.from_pretrained(folder, device=device)
    return GENERATORS.lookup(kind).load(folder, device=device)
