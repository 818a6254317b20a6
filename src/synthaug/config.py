"""The run configuration: nested dataclasses, read from YAML and overridden with `key=value`
pairs (`train.epochs=5`). Unknown keys and wrong types are errors, never ignored.

Each section is a `*Section` dataclass; the `train` section is the library's own
`TrainConfig` (`fit_classifier` takes it as it is), and recipes add their sections with
`register_section`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from .choices import (
    CbdmDraw,
    ClassSampler,
    Dtype,
    FeedbackCriterion,
    GroupSamplerChoice,
    Pairing,
    Precision,
    Preset,
    Profile,
    Sampler,
    SplitKind,
    TestColours,
)
from .classify.train import TrainConfig
from .errors import SynthaugError
from .generate.network import GeneratorTrainConfig, check_interval, check_levers
from .utils.paths import check_folder, check_name
from .utils.registry import Registry

# sections that recipes add to the run config (each recipe's file registers its own)
SECTIONS: Registry[type] = Registry("config section")


# a recipe section -> the recipes that read it (`register_recipe` fills it): a run's record does
# not change when a section that neither its recipe nor its baselines read moves its defaults
READERS: dict[str, set[str]] = {}


def register_section(name: str):
    """Register a dataclass as the run config's section `name` (e.g. a recipe's options)."""
    return SECTIONS.register(name)


def unread_sections(config: RunConfig) -> set[str]:
    """The recipe sections that neither `config.recipe` nor its report's baselines read
    (none for `recipe: auto`, which picks its recipe later)."""
    if config.recipe == "auto":
        return set()
    runs = {config.recipe, *config.report.every_baseline()}
    return {name for name in SECTIONS.names() if name in READERS and not READERS[name] & runs}

MAX_SEED = 2**31 - 1  # seeds are mixed with step counts before they reach torch's generators


@dataclass
class DataSection:
    dataset: str = "mnist-5k"  # a name from `synthaug datasets`, an ImageFolder path, or hf:<dataset>
    image_size: int | None = None  # resize to this many pixels (square)
    channels: int | None = None  # 1 or 3 to convert; None keeps the source's
    cache_dir: str | None = None  # where extracted / downloaded data is kept (default ~/.cache/synthaug)

    def __post_init__(self):
        if self.image_size is not None and self.image_size < 4:
            raise SynthaugError(f"data.image_size must be >= 4 pixels (or unset: the source's size), got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise SynthaugError(f"data.channels must be 1 or 3 (or unset: the source's), got {self.channels}")


@dataclass
class SplitSection:
    kind: SplitKind = "long-tail"
    seed: int = 0  # the split is fixed across training seeds, as is the field's convention
    ratio: float = 50.0  # long-tail: head size / tail size
    profile: Profile = "exp"
    n_max: int | None = None  # long-tail: images in the head class (default: the smallest class's size)
    k: int = 10  # few-shot: labelled images per class
    unlabeled_pool: bool = True  # few-shot: keep the other images as an unlabeled pool
    agreement: float = 0.95  # colored: share of training images whose colour agrees with the class
    # colored: the test set's colours. every: each test image in every colour, so a (class, colour) cell holds
    # all of the class's test images (on MNIST-5k 100, not 2 to 19); drawn: one random colour per test image
    # (the former test)
    test_colours: TestColours = "every"
    val_per_class: int = 0  # carve a class-balanced validation split of this many images per class

    ADDED: ClassVar[dict[str, object]] = {"test_colours": "drawn"}  # options added, at their former values
    TEST: ClassVar[tuple[str, ...]] = ("test_colours",)  # options that change the test set only
    # the options each split kind reads (the others change nothing, so a run made before one of them
    # existed, or with another value of it, computed the same)
    READS: ClassVar[dict[str, tuple[str, ...]]] = {
        "none": (), "long-tail": ("ratio", "profile", "n_max"), "few-shot": ("k", "unlabeled_pool"),
        "colored": ("agreement", "test_colours")}

    def unread(self) -> set[str]:
        """The kind-specific options this split's kind does not read."""
        every = {k for keys in self.READS.values() for k in keys}
        return every - set(self.READS[self.kind])

    def __post_init__(self):
        if self.val_per_class < 0 or self.k < 1 or (self.n_max is not None and self.n_max < 1):
            raise SynthaugError("split.val_per_class must be >= 0, split.k >= 1 and split.n_max >= 1")
        if self.ratio < 1:
            raise SynthaugError(f"split.ratio must be >= 1 (head size / tail size), got {self.ratio}")
        if not 0 <= self.agreement <= 1 or self.seed < 0:
            raise SynthaugError("split.agreement must be in [0, 1] and split.seed >= 0")


@dataclass
class EvalSection:
    many_threshold: float | None = None  # many-shot: classes with more training images (default 20% of the head)
    few_threshold: float | None = None  # few-shot: classes with fewer (default 4% of the head)
    posthoc_tau: float = 1.0  # strength of post-hoc logit adjustment (recipe posthoc-la)
    # score the test set every N optimiser steps of the final classifier (0: off): an accuracy-against-steps
    # curve in metrics.json and the report, to see what a step budget costs; nothing is chosen by it
    curve_every: int = 0

    def __post_init__(self):
        if any(v is not None and v < 0 for v in (self.many_threshold, self.few_threshold, self.posthoc_tau)):
            raise SynthaugError("eval.many_threshold, eval.few_threshold and eval.posthoc_tau must be >= 0")
        if self.curve_every < 0:
            raise SynthaugError(f"eval.curve_every must be >= 0 (0: off), got {self.curve_every}")


@dataclass
class GeneratorSection:
    """The generator: the embedded diffusion model (network, training) or a pretrained Stable
    Diffusion pipeline (`pretrained`), and sampling."""

    # options added later, with the values generators had before them: left out of cache keys (trained
    # generators, shared stores) at those (utils/keys.py); the training's own list, and sampling's
    ADDED: ClassVar[dict[str, object]] = {**GeneratorTrainConfig.ADDED, "group_guidance_scale": None, "feedback": 0.0,
                                          "feedback_criterion": "entropy", "feedback_every": 1, "ensemble": 1,
                                          "guidance_interval": None}

    path: str | None = None  # a folder written by save_pretrained: use it instead of training one
    # embedded, stable-diffusion or a registered kind (generate/cache.py); auto: stable-diffusion with pretrained
    kind: str = "auto"
    # a diffusers Stable Diffusion pipeline (hub id or folder; unCLIP for recipe augcond): used instead of
    # the embedded generator (pip install 'synthaug[sd]'; set guidance_scale ~7.5 and sampling_steps ~25)
    pretrained: str | None = None
    prompt: str = "a photo of a {name}"  # Stable Diffusion: the class prompt ({name}: the class name)
    prompt_modifiers: list = field(default_factory=list)  # appended to the prompt, one drawn per image
    negative_prompt: str = ""
    resolution: int | None = None  # Stable Diffusion's generation size (default: the UNet's native size)
    dtype: Dtype = "auto"  # auto: float16/bfloat16 on a GPU
    attention_slicing: bool = True  # on a GPU
    noise_level: int = 0  # unCLIP: noise on the image embedding
    adapt_steps: int = 0  # > 0: fine-tune a LoRA adapter on the training images first (cached)
    lora_rank: int = 4
    adapt_lr: float = 1.0e-4
    preset: Preset = "small"
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1.0e-3  # 800 steps at 1e-3 come close to 2,400 at 2e-4 (BENCHMARKS.md, sampler table)
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0  # the generator's own seed (vary it to measure the generator's variance)
    # seed of the synthetic set's per-image seeds (default: `seed`); vary it to redraw the images
    # from the same trained generator (the trained generator's cache key does not depend on it)
    sample_seed: int | None = None
    checkpoint_every: int = 200  # training steps between checkpoints (resume point after an interruption)
    sampler: Sampler = "sde-dpm-solver++"
    sampling_steps: int = 15
    guidance_scale: float = 3.0
    # a group-conditioned generator's (composed) guidance: the group's term at this scale, the class's at
    # guidance_scale (default: guidance_scale for both; 0: the class's guidance alone)
    group_guidance_scale: float | None = None
    # [low, high]: the embedded generator guides only the sampling steps whose noise level sigma lies in (low, high]
    # and samples the class alone at the others (Kynkaanniemi et al. 2024, whose EDM2 models used [0.28, 5.42]:
    # guided at high noise, the images crowd into a few modes of their class); unset: guidance at every step
    guidance_interval: list | None = None
    sampling_batch_size: int = 128
    # > 0: feedback guidance (Askari-Hemmat et al. 2024; generate/feedback.py): each sampling step (every
    # feedback_every-th) moves x_t by this share of its norm up the criterion (entropy or loss) of select's scorer,
    # towards images it finds hard (the paper's code: 0.03, entropy); the embedded generator, local executor
    feedback: float = 0.0
    feedback_criterion: FeedbackCriterion = "entropy"
    feedback_every: int = 1
    # > 1: that many embedded generators, trained alike at seeds seed, seed + 1, ..., each making the images whose seed
    # falls to it (generate/ensemble.py): each class learnt several ways; the recipes whose images pass select's stage
    ensemble: int = 1
    # the embedded generator's arithmetic in training and sampling: auto is bfloat16 autocast where
    # the hardware computes it natively (a CPU with AVX512-BF16 or AMX, a recent GPU), else float32
    precision: Precision = "auto"
    cache_dir: str | None = None  # trained generators, by fingerprint (default: <output_dir>/generators)
    # few-shot: share of each training batch drawn from the split's unlabeled pool (under the null class)
    unlabeled_share: float = 0.5
    # image-conditioned generators (recipe augcond): condition dropout and the conditioning image in training
    image_dropout: float = 0.1
    image_pairing: Pairing = "self"
    # levers for a long-tailed training set (issue 21; BENCHMARKS.md measures them), all but Min-SNR (and
    # group_sampler auto, sqrt on data with groups) off:
    class_sampler: ClassSampler = "uniform"  # how the generator draws its labelled images: per image, sqrt, per class
    # with groups (coloured split): how each class's share is split over its (class, group) cells: per image,
    # sqrt, per cell (balanced: every colour of a class drawn equally often); auto: sqrt where the data has
    # groups (it doubled the minority cells drawn right, BENCHMARKS.md, issue 21), else uniform
    group_sampler: GroupSamplerChoice = "auto"
    # > 0: Min-SNR loss weighting, min(SNR, gamma) / SNR (Hang et al. 2023); 5 since it won on MNIST-5k-LT
    # (BENCHMARKS.md, issue 21); 0: the plain loss
    min_snr_gamma: float = 5.0
    cbdm_weight: float = 0.0  # > 0: CBDM's class-balancing regulariser at strength tau (Qin et al. 2023; tau 1)
    cbdm_draw: CbdmDraw = "frequency"  # its other class y': by the class frequencies (reference code) or uniform
    ema_half_life: float = 0.0  # > 0: a constant EMA decay with this half-life, as a share of the training steps
    # > 0: non-leaking augmentation of the training images (Karras et al. 2022; CBDM's code uses 0.12 and also
    # x-flips half of all images, which this does not): each of x- and y-flip, scale, rotation, stretch and shift
    # applied with this probability, the network told its parameters and sampled untold
    augment: float = 0.0

    @property
    def plan_seed(self) -> int:
        """The seed the recipes' plans draw each image's seed from."""
        return self.seed if self.sample_seed is None else self.sample_seed

    def __post_init__(self):
        if not 0 <= self.unlabeled_share < 1 or not 0 <= self.image_dropout < 1:
            raise SynthaugError("generator.unlabeled_share and generator.image_dropout must be in [0, 1)")
        for key in ("steps", "batch_size", "checkpoint_every", "sampling_steps", "sampling_batch_size"):
            if getattr(self, key) < 1:
                raise SynthaugError(f"generator.{key} must be >= 1, got {getattr(self, key)}")
        check_levers(self)
        if not 0 <= self.label_dropout < 1 or not 0 < self.ema_decay < 1 or self.lr <= 0:
            raise SynthaugError("generator.label_dropout must be in [0, 1), generator.ema_decay in (0, 1), generator.lr > 0")
        if self.guidance_scale < 1:
            raise SynthaugError(f"generator.guidance_scale must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        if self.group_guidance_scale is not None and self.group_guidance_scale < 0:
            raise SynthaugError(f"generator.group_guidance_scale must be >= 0 (0: the class's guidance alone), "
                                f"got {self.group_guidance_scale}")
        if self.guidance_interval is not None:  # as numbers, so equal intervals name the same stores
            self.guidance_interval = list(check_interval(self.guidance_interval, "generator.guidance_interval"))
        if self.ensemble < 1:
            raise SynthaugError(f"generator.ensemble is the number of generators, >= 1 (1: one), got {self.ensemble}")
        if not 0 <= self.feedback < float("inf") or self.feedback_every < 1:
            raise SynthaugError(f"generator.feedback must be a finite number >= 0 (0: off) and generator.feedback_every "
                                f">= 1, got {self.feedback} and {self.feedback_every}")
        if self.path and self.pretrained:
            raise SynthaugError("set generator.path (a saved generator) or generator.pretrained (a Stable Diffusion "
                                "pipeline), not both")
        if "{name}" not in self.prompt:
            raise SynthaugError(f"generator.prompt '{self.prompt}' has no {{name}}: write e.g. 'a photo of a {{name}}'")
        if not all(isinstance(m, str) for m in self.prompt_modifiers):
            raise SynthaugError("generator.prompt_modifiers must be a list of strings")
        if self.adapt_steps < 0 or self.lora_rank < 1 or self.noise_level < 0:
            raise SynthaugError("generator.adapt_steps and generator.noise_level must be >= 0, generator.lora_rank >= 1")
        if self.adapt_lr <= 0 or self.seed < 0 or (self.sample_seed is not None and self.sample_seed < 0):
            raise SynthaugError("generator.adapt_lr must be > 0, generator.seed and generator.sample_seed >= 0")
        check_folder(self.cache_dir, "generator.cache_dir")


@dataclass
class ExecutorSection:
    """Who makes the synthetic images (generate/executors.py): this process, `accelerate`
    (the GPUs of one node) or `ray` (a cluster)."""

    name: str = "local"  # a registered executor (checked when the run starts)
    workers: int | None = None  # default: one per GPU, else 2
    shard_size: int | None = None  # rows per shard (default: generator.sampling_batch_size)
    address: str | None = None  # ray: the cluster's address (default: a running one, else a local instance)

    def __post_init__(self):
        if (self.workers is not None and self.workers < 1) or (self.shard_size is not None and self.shard_size < 1):
            raise SynthaugError("executor.workers and executor.shard_size must be >= 1")


@dataclass
class SelectSection:
    """Data selection: generate `overgenerate` x the plan, keep the plan's count per class (SYNAuG,
    TADA, AugCond), optionally push the kept images towards the boundary (`boundary`). Scores and
    choices are written to the store's metadata."""

    # none, or a selector: random, confidence, agreement, realism, cluster, diffult, diffult-band, prototype, hard, novel
    method: str = "none"
    overgenerate: float = 2.0  # candidates per planned image (with a method)
    threshold: float = 0.5  # agreement: least confidence in the intended class
    k: int = 3  # realism: neighbours that set each real image's k-NN radius
    clusters: int = 10  # cluster: k-means centres per class
    features: str = "classifier"  # classifier (the scorer's), pixels, a classifier folder, or hf:<hub id or folder>
    scorer_epochs: int | None = None  # epochs of the scorer (trained on the real split); default train.epochs, or train.steps when set
    read_groups: bool = True  # with groups: drop the candidates a group reader reads as another group first
    # DBG's boundary push: move each kept image this share of the way to its nearest rival class under the
    # scorer (0: off; 1 would put it on the boundary)
    boundary: float = 0.0

    def __post_init__(self):
        if not 0 <= self.boundary < 1:
            raise SynthaugError(f"select.boundary must be in [0, 1) (0: off), got {self.boundary}")
        if self.scorer_epochs is not None and self.scorer_epochs < 1:
            raise SynthaugError("select.scorer_epochs must be >= 1 (or unset: train.epochs, or train.steps when set)")
        if self.overgenerate < 1 or not 0 <= self.threshold <= 1 or self.k < 1 or self.clusters < 1:
            raise SynthaugError("select.overgenerate must be >= 1, threshold in [0, 1], k and clusters >= 1")


@dataclass
class ValidateSection:
    """Validation of the run's synthetic set against the real training split (metrics.json, report)."""

    enabled: bool = False
    features: str = "classifier"  # classifier (the run's trained one), pixels, a classifier folder, or hf:<...>
    max_per_class: int = 500  # images per class of each set in the feature-space metrics
    k: int = 3  # neighbours of the precision/recall manifolds (Kynkaanniemi et al.)
    density_k: int = 5  # neighbours of density and coverage (Naeem et al.)
    cas: bool = True  # also train on the synthetic images alone and test on real (classification accuracy score)

    def __post_init__(self):
        if self.max_per_class < 2 or self.k < 1 or self.density_k < 1:
            raise SynthaugError("validate.max_per_class must be >= 2, validate.k and validate.density_k >= 1")


DEFAULT_BASELINES = ["ce", "balanced-softmax", "crt"]
# the classical answers to group imbalance: what the default means where the split has groups
GROUP_BASELINES = ["ce", "group-balanced", "group-reweighted", "group-dro"]


@dataclass
class ReportSection:
    # trained in the same run; left at the default, a split with groups trains GROUP_BASELINES instead
    baselines: list = field(default_factory=lambda: list(DEFAULT_BASELINES))
    html: bool = True

    def __post_init__(self):
        if not isinstance(self.baselines, list) or not all(isinstance(b, str) for b in self.baselines):
            raise SynthaugError(f"report.baselines must be a list of recipe names, e.g. [ce, balanced-softmax], "
                                f"got {self.baselines!r}")

    def baselines_for(self, grouped: bool) -> list:
        """The baselines a run trains: the group methods for the default where the split has groups."""
        return list(GROUP_BASELINES) if grouped and self.baselines == DEFAULT_BASELINES else list(self.baselines)

    def every_baseline(self) -> list:
        """Every baseline a run may train, before the data says whether it has groups."""
        return list(dict.fromkeys([*self.baselines, *self.baselines_for(True)]))


@dataclass
class RunConfig:
    recipe: str = "ce"
    name: str | None = None  # run folder name (default: dataset-split-recipe-seed)
    seed: int = 0
    output_dir: str = "runs"
    data: DataSection = field(default_factory=DataSection)
    split: SplitSection = field(default_factory=SplitSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    # the recipes' own sections (`synaug`, `tada`, ...: `register_section` in each recipe's file),
    # read and written at the top level of the YAML like the sections above, reached as config.<name>
    sections: dict = field(default_factory=lambda: {name: cls() for name, cls in SECTIONS.items()})
    select: SelectSection = field(default_factory=SelectSection)
    validate: ValidateSection = field(default_factory=ValidateSection)
    report: ReportSection = field(default_factory=ReportSection)

    def __post_init__(self):
        for key, value in (("seed", self.seed), ("split.seed", self.split.seed), ("generator.seed", self.generator.seed),
                           ("generator.sample_seed", self.generator.sample_seed)):
            if value is not None and not 0 <= value <= MAX_SEED:
                raise SynthaugError(f"{key} must be in [0, {MAX_SEED}], got {value}")
        if self.name is not None:
            check_name(self.name, "name")
        check_folder(self.output_dir, "output_dir")
        check_folder(self.data.cache_dir, "data.cache_dir")

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"'RunConfig' has no attribute '{name}'")

    def run_name(self) -> str:
        """`name`, or dataset-split-recipe-seed made safe as one folder name."""
        if self.name:
            return self.name
        dataset = Path(self.data.dataset).name if "/" in self.data.dataset else self.data.dataset
        split = self.split.kind
        if split == "long-tail":
            split = f"lt{self.split.ratio:g}"
        elif split == "few-shot":
            split = f"{self.split.k}shot"
        name = f"{dataset}-{split}-{self.recipe}-s{self.seed}"
        return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in name).lstrip(".") or "run"

    def to_dict(self) -> dict:
        """The config as YAML holds it: each recipe section at the top level."""
        out = {}
        for key, value in dataclasses.asdict(self).items():
            out.update(value if key == "sections" else {key: value})
        return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Defaults, then the YAML file, then the `key=value` overrides; validated."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise SynthaugError(f"config file '{path}' is a folder: give a YAML file (see configs/)")
        if not path.is_file():
            raise SynthaugError(f"config file '{path}' does not exist: give a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise SynthaugError(f"config file '{path}' is not UTF-8 text: save it as UTF-8") from None
        except OSError as e:
            raise SynthaugError(f"cannot read config file '{path}' ({e.strerror}): check its permissions") from None
        except yaml.YAMLError as e:
            raise SynthaugError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
        if not isinstance(raw, dict):
            raise SynthaugError(f"config file '{path}' must hold a mapping of keys to values")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SynthaugError(f"override '{item}' is not key=value: write e.g. train.epochs=5")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section (`train:` with nothing under it)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise SynthaugError(f"override '{item}': '{part}' is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise SynthaugError(f"override '{item}': the value is not valid YAML; quote it or fix the brackets") from None
    expand_home(raw)
    return build(RunConfig, raw, "")


PATH_KEYS = ("dataset", "cache_dir", "output_dir", "store_dir", "path", "pretrained", "features")


def expand_home(raw: dict) -> None:
    """`~` at the start of a path option is the home folder, as in a shell (YAML and a quoted or
    `key=~/...` override leave it unexpanded; a folder literally named '~' is never what is meant)."""
    for key, value in raw.items():
        if isinstance(value, dict):
            expand_home(value)
        elif key in PATH_KEYS and isinstance(value, str) and value.startswith("~"):
            raw[key] = os.path.expanduser(value)


def build(cls, raw: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, checking keys, types and (`Literal`) choices."""
    if not isinstance(raw, dict):
        raise SynthaugError(f"config section '{prefix.rstrip('.')}' must be a mapping of its keys, got {raw!r}: "
                            f"set a key of it, e.g. {prefix}<key>=<value>")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}
    kwargs = {}
    if cls is RunConfig:  # the recipes' sections, each built by its own dataclass
        sections = {name: build(section, {} if raw.get(name) is None else raw[name], f"{name}.")
                    for name, section in SECTIONS.items()}
        raw = {k: v for k, v in raw.items() if k not in SECTIONS}
        kwargs["sections"] = sections
        fields.update({name: None for name in SECTIONS})  # known keys, for the did-you-mean below
    for key, value in raw.items():
        if not isinstance(key, str):
            where = f"under '{prefix.rstrip('.')}'" if prefix else "at the top level"
            raise SynthaugError(f"config key {key!r} {where} is not a name: keys are words, e.g. "
                                f"{prefix}{next(iter(fields))}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f"; known keys: {', '.join(fields)}"
            raise SynthaugError(f"unknown config key '{prefix}{key}'{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build(kind, {} if value is None else value, f"{prefix}{key}.")
            continue
        if isinstance(value, dict):
            raise SynthaugError(f"config key '{prefix}{key}' is a value, not a section (got {value!r}): "
                                f"write {prefix}{key}=<value>")
        kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value, kind, key):
    if isinstance(value, float) and not math.isfinite(value):
        raise SynthaugError(f"config key '{key}' is {value!r}: give a finite number")
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        for k in kinds:
            try:
                return _coerce(value, k, key)
            except SynthaugError:
                continue
        raise SynthaugError(f"config key '{key}' got {value!r}: expected {' or '.join(k.__name__ for k in kinds)}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise SynthaugError(f"config key '{key}' is {value!r}: give a finite number")
            return number
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(kind) is typing.Literal:
        if value in typing.get_args(kind):
            return value
        raise SynthaugError(f"config key '{key}' is '{value}': use one of {', '.join(map(str, typing.get_args(kind)))}")
    elif kind is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    else:
        return value
    raise SynthaugError(f"config key '{key}' got {value!r}: expected {kind.__name__}")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as dotted keys: {'train.lr': 0.05, ...}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(recorded: dict, config: RunConfig, ignore=lambda key: False) -> list[str]:
    """How `config` differs from a config recorded earlier (flat dotted keys), as
    'train.lr: 0.05 -> 0.02' lines. A key the record lacks (an option added to synthaug since)
    counts only when it is not at the value synthaug had before it (its section's `ADDED`, else
    its default), so upgrading synthaug does not make finished runs "different", and a changed
    default does, in the sections the run reads (not in `unread_sections`) and in the split
    options its split kind reads (`SplitSection.READS`)."""
    unread = unread_sections(config)
    unread_split = {f"split.{k}" for k in config.split.unread()}

    def plain(c):
        return {k: v for k, v in json.loads(json.dumps(flatten(c.to_dict()), default=str)).items()
                if not ignore(k) and k.split(".")[0] not in unread and k not in unread_split}
    now, defaults = plain(config), plain(RunConfig())
    for section in [f.name for f in dataclasses.fields(RunConfig)] + SECTIONS.names():
        for key, value in getattr(getattr(config, section, None), "ADDED", {}).items():
            defaults[f"{section}.{key}"] = value
    recorded = json.loads(json.dumps(recorded, default=str))
    return [f"{k}: {recorded.get(k, defaults.get(k))!r} -> {v!r}" for k, v in now.items()
            if recorded.get(k, defaults.get(k)) != v]


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
