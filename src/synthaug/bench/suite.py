"""A benchmark suite: settings (dataset, split, model, schedule) x recipes x generator seeds x
classifier seeds, read from YAML (shipped ones in configs/bench/, or the user's own file).

    name: longtail-small
    metric: balanced_accuracy            # the verdict's metric
    classifier_seeds: [0, 1, 2]
    generator_seeds: [0]                 # generative recipes only
    steps: 3000                          # optional: the same optimiser steps for every recipe
    budget: {device: auto, minutes: 90}  # optional: stop starting cells after `minutes`
    common: [train.augment=crop]         # overrides for every cell
    recipes:                             # label: overrides (recipe=... among them)
      ce: [recipe=ce]
      synaug: [recipe=synaug]
      ce + RandAugment: [recipe=ce, train.augment+=randaugment]   # += appends to a '+'-joined value
      synaug, own draw: [recipe=synaug, "generator.sample_seed={seed}"]  # {seed}: the cell's classifier seed
    classical: [ce, ce + RandAugment]    # the bar (default: every recipe that generates nothing)
    settings:
      MNIST-5k-LT r50: [data.dataset=mnist-5k, split.ratio=50]
      Fashion-MNIST-LT r100:             # or a mapping: overrides, and any suite-level key above
        overrides: [data.dataset=fashion-mnist, split.ratio=100]
        recipes: [ce, synaug]
      Coloured MNIST-5k: [split.kind=colored, split.agreement=0.95]
      Coloured MNIST-5k, drawn test:     # stores: share another setting's generated images (only the test differs)
        overrides: [split.kind=colored, split.agreement=0.95, split.test_colours=drawn]
        stores: Coloured MNIST-5k
    include: [fewshot-small]             # optional: every setting of other suites, as they define them
    recipes_from: [longtail-small]       # optional: recipe labels defined by other suites

Every cell is a `RunConfig`; its fingerprint is the resolved config without where things
are written, so an edited suite is noticed cell by cell."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from ..config import RunConfig, SplitSection, config_changes, flatten, load_config, unread_sections
from ..errors import SynthaugError
from ..recipes import get_recipe
from ..utils.keys import drop_former
from ..utils.paths import check_name

SHIPPED = Path(__file__).resolve().parents[3] / "configs" / "bench"
SETTING_KEYS = {"overrides", "recipes", "metric", "classifier_seeds", "generator_seeds", "steps", "classical",
                "columns", "stores"}
SUITE_KEYS = SETTING_KEYS - {"overrides", "stores"} | {"name", "description", "common", "settings", "budget", "include",
                                              "columns", "recipes_from"}
UPPER_BOUNDS = ("oracle",)


@dataclass
class Setting:
    name: str
    overrides: list[str]
    recipes: dict[str, list[str]]  # label -> overrides
    classical: list[str]
    metric: str
    classifier_seeds: list[int]
    generator_seeds: list[int]
    steps: int | None
    columns: list[str]  # the leaderboard's metric columns
    stores: str | None = None  # the setting whose store folders this one's cells share (same images, other test)


@dataclass
class Cell:
    setting: str
    recipe: str  # the suite's label
    generator_seed: int | None  # None: the recipe generates nothing
    seed: int
    config: RunConfig
    fingerprint: str
    stores: str | None = None  # the setting whose store folders the cell shares (None: its own)

    @property
    def key(self) -> str:
        g = "" if self.generator_seed is None else f" | generator seed {self.generator_seed}"
        return f"{self.setting} | {self.recipe}{g} | seed {self.seed}"

    @property
    def generates(self) -> bool:
        return self.generator_seed is not None


@dataclass
class Suite:
    name: str
    description: str
    settings: list[Setting]
    device: str = "auto"
    minutes: float | None = None
    source: str = ""
    cells_: list[Cell] = field(default_factory=list, repr=False)


def suite_path(name_or_path: str) -> Path:
    """A shipped suite by name (configs/bench/<name>.yaml) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise SynthaugError(f"suite file '{path}' {what}: give a YAML file or a shipped suite "
                                f"({', '.join(shipped())})")
        return path
    if (SHIPPED / f"{name_or_path}.yaml").is_file():
        return SHIPPED / f"{name_or_path}.yaml"
    raise SynthaugError(f"no suite '{name_or_path}': give a YAML file or a shipped suite ({', '.join(shipped())})")


def shipped() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def _read(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise SynthaugError(f"cannot read suite '{path}' ({e}): give a readable UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        raise SynthaugError(f"suite '{path}' is not valid YAML ({str(e).splitlines()[0]}): fix the syntax") from None
    if not isinstance(raw, dict):
        raise SynthaugError(f"suite '{path}' must hold a mapping (name, settings, recipes, ...)")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise SynthaugError(f"suite '{path}': unknown key '{unknown[0]}': use {', '.join(sorted(SUITE_KEYS))}")
    return raw


def _strings(value, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SynthaugError(f"{what} must be a list of key=value strings")
    return value


def _recipe(value, what: str) -> list[str]:
    """A recipe entry: a list of overrides, or {overrides: [...], generator_seeds: [...]} (its
    own generator seeds, kept as a `generator_seeds=` marker the cells read)."""
    overrides = _strings(value.get("overrides") if isinstance(value, dict) else value, what)
    if any(o.startswith("generator_seeds=") for o in overrides):
        raise SynthaugError(f"{what}: generator_seeds is not an override: write the recipe as {{overrides: [...], "
                            "generator_seeds: [0, 1]}")
    if isinstance(value, dict):
        if set(value) - {"overrides", "generator_seeds"}:
            raise SynthaugError(f"{what} takes overrides and generator_seeds")
        seeds = value.get("generator_seeds")
        marker = [f"generator_seeds={','.join(map(str, _seeds(seeds, what + ': generator_seeds')))}"] if seeds else []
        return [*overrides, *marker]
    return overrides


def _seeds(value, what: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value) \
            or len(set(value)) != len(value):
        raise SynthaugError(f"{what} must be a list of different whole numbers >= 0, e.g. [0, 1, 2]")
    return value


def load_suite(name_or_path: str, _seen: tuple = ()) -> Suite:
    """Read and check a suite: every cell's config is built (and so validated) here, before
    anything is written."""
    path = suite_path(name_or_path)
    raw = _read(path)
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise SynthaugError(f"suite '{path}': name must be a string")
    check_name(name, "the suite's name")
    if name in _seen:
        raise SynthaugError(f"suite '{name}' includes itself: remove the loop from include")
    recipes = raw.get("recipes") or {}
    if not isinstance(recipes, dict):
        raise SynthaugError(f"suite '{name}': recipes must map a label to a list of overrides")
    recipes = {str(label): _recipe(o, f"suite '{name}': recipe '{label}'") for label, o in recipes.items()}
    for other in raw.get("recipes_from") or []:
        for label, entry in (_read(suite_path(str(other))).get("recipes") or {}).items():
            overrides = _recipe(entry, f"suite '{other}': recipe '{label}'")  # a list, or the mapping form
            if recipes.setdefault(str(label), overrides) != overrides:
                raise SynthaugError(f"suite '{name}': recipe '{label}' differs from suite '{other}''s: rename one")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict) or set(budget) - {"device", "minutes"}:
        raise SynthaugError(f"suite '{name}': budget takes device and minutes, e.g. {{device: auto, minutes: 60}}")
    minutes = budget.get("minutes")
    if minutes is not None and (not isinstance(minutes, (int, float)) or minutes <= 0):
        raise SynthaugError(f"suite '{name}': budget.minutes must be a number > 0")
    defaults = {"metric": raw.get("metric", "balanced_accuracy"), "classifier_seeds": raw.get("classifier_seeds", [0]),
                "generator_seeds": raw.get("generator_seeds", [0]), "steps": raw.get("steps"),
                "classical": raw.get("classical"), "recipes": None,
                "columns": raw.get("columns") or ["accuracy", "balanced_accuracy", "few_shot_accuracy",
                                                  "worst_class_accuracy"]}
    common = _strings(raw.get("common"), f"suite '{name}': common")
    settings_raw = raw.get("settings") or {}
    if not isinstance(settings_raw, dict):
        raise SynthaugError(f"suite '{name}': settings must map a name to overrides (or to a mapping)")
    settings = []
    for label, spec in settings_raw.items():
        spec = {"overrides": spec} if isinstance(spec, list) or spec is None else spec
        if not isinstance(spec, dict) or set(spec) - SETTING_KEYS:
            extra = sorted(set(spec) - SETTING_KEYS) if isinstance(spec, dict) else ["(not a mapping)"]
            raise SynthaugError(f"suite '{name}', setting '{label}': unknown key {extra[0]}: use "
                                f"{', '.join(sorted(SETTING_KEYS))}")
        settings.append(_setting(name, str(label), {**defaults, **{k: v for k, v in spec.items() if v is not None}},
                                 common, recipes))
    for other in raw.get("include") or []:
        included = load_suite(str(other), (*_seen, name))
        for s in included.settings:
            if any(s.name == mine.name for mine in settings):
                raise SynthaugError(f"suite '{name}': setting '{s.name}' is in two included suites: rename one")
            settings.append(s)
    if not settings:
        raise SynthaugError(f"suite '{name}' has no settings: add one under settings (or include a suite)")
    names = [s.name for s in settings]
    for s in settings:
        if s.stores is not None and (s.stores == s.name or s.stores not in names):
            raise SynthaugError(f"suite '{name}', setting '{s.name}': stores must name another of the suite's "
                                f"settings ({', '.join(n for n in names if n != s.name)})")
    device = str(budget.get("device", "auto"))
    suite = Suite(name, str(raw.get("description", "")), settings, device, minutes, str(path))
    suite.cells_ = [c for s in settings for c in _cells(s, device)]
    return suite


def _setting(suite: str, label: str, spec: dict, common: list[str], recipes: dict[str, list[str]]) -> Setting:
    where = f"suite '{suite}', setting '{label}'"
    chosen = spec.get("recipes") or list(recipes)
    if not isinstance(chosen, list) or not chosen:
        raise SynthaugError(f"{where}: recipes must be a list of the suite's recipe labels")
    for r in chosen:
        if r not in recipes:
            raise SynthaugError(f"{where}: no recipe labelled '{r}' under the suite's recipes: add it or fix the name")
    steps = spec.get("steps")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise SynthaugError(f"{where}: steps must be a whole number >= 1")
    overrides = [*common, *_strings(spec.get("overrides"), f"{where}: overrides")]
    classical = spec.get("classical")
    if classical is not None:
        if not isinstance(classical, list) or any(c not in chosen for c in classical):
            raise SynthaugError(f"{where}: classical must list recipes the setting runs ({', '.join(chosen)})")
    from .leaderboard import LABELS

    for metric in [spec["metric"], *_strings(spec["columns"], f"{where}: columns")]:
        if not isinstance(metric, str) or metric not in LABELS:
            raise SynthaugError(f"{where}: '{metric}' is not a metric synthaug measures: use one of {', '.join(LABELS)}")
    setting = Setting(label, overrides, {r: recipes[r] for r in chosen}, [], str(spec["metric"]),
                      _seeds(spec["classifier_seeds"], f"{where}: classifier_seeds"),
                      _seeds(spec["generator_seeds"], f"{where}: generator_seeds"), steps,
                      _strings(spec["columns"], f"{where}: columns"), _stores(spec.get("stores"), where))
    setting.classical = classical if classical is not None else [
        r for r in chosen if r not in UPPER_BOUNDS and not _generates(recipe_of(setting, r))]
    return setting


def _stores(value, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SynthaugError(f"{where}: stores must name one of the suite's settings")
    return value


def recipe_of(setting: Setting, label: str) -> str:
    """The registered recipe a label runs (its last recipe=... override; ce without one)."""
    names = [o.split("=", 1)[1].strip() for o in setting.recipes[label] if o.split("=", 1)[0].strip() == "recipe"]
    return names[-1] if names else "ce"


def _generates(recipe: str) -> bool:
    return get_recipe(recipe).generates


def _appending(overrides: list[str], base: list[str]) -> list[str]:
    """`key+=value` turned into key=<the value so far>+value (a '+'-joined list, like train.augment)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("+=")
        if sep and "=" not in key:
            # the cell's seeds are not known yet: a {seed} placeholder stands for any seed here
            current = load_config(None, [o.replace("{seed}", "0").replace("{generator_seed}", "0") for o in [*base, *out]])
            node = current
            for part in key.strip().split("."):
                if not hasattr(node, part):
                    raise SynthaugError(f"'{item}': no config key '{key.strip()}' to append to (+= adds to a '+'-joined "
                                        "option such as train.augment)")
                node = getattr(node, part)
            item = f"{key.strip()}={node}+{value.strip()}"
        out.append(item)
    return out


# where a cell writes, set by the runner: not part of what the cell computes
LOCATION_KEYS = ("name", "output_dir", "generator.cache_dir", "data.cache_dir")


def _cells(setting: Setting, device: str) -> list[Cell]:
    cells = []
    for label, recipe_overrides in setting.recipes.items():
        recipe = recipe_of(setting, label)
        get_recipe(recipe)  # an unknown name fails here, with the registry's line
        own = [o.split("=", 1)[1] for o in recipe_overrides if o.startswith("generator_seeds=")]
        recipe_overrides = [o for o in recipe_overrides if not o.startswith("generator_seeds=")]
        try:
            appended = _appending(recipe_overrides, setting.overrides)
        except SynthaugError as e:
            raise SynthaugError(f"setting '{setting.name}', recipe '{label}': {e}") from None
        overrides = [*setting.overrides, *appended, *([f"train.steps={setting.steps}"] if setting.steps else []),
                     f"train.device={device}"]
        generator_seeds = ([int(x) for x in own[-1].split(",")] if own else setting.generator_seeds) \
            if _generates(recipe) else [None]
        for g in generator_seeds:
            for seed in setting.classifier_seeds:
                extra = [f"seed={seed}", *([f"generator.seed={g}"] if g is not None else [])]
                mine = [o.replace("{seed}", str(seed)).replace("{generator_seed}", str(g if g is not None else 0))
                        for o in overrides]
                try:
                    config = load_config(None, [*mine, *extra])
                except SynthaugError as e:
                    raise SynthaugError(f"setting '{setting.name}', recipe '{label}': {e}") from None
                cells.append(Cell(setting.name, label, g, seed, config, fingerprint(config), setting.stores))
    return cells


def _location(key: str) -> bool:
    return key in LOCATION_KEYS or key.endswith(".store_dir")


def settings_of(config: RunConfig) -> dict:
    """What a cell computes: its resolved config as flat dotted keys, without the places it
    writes to (output folder, caches, store folders) and the recipe sections it does not read."""
    unread = unread_sections(config)
    return {k: v for k, v in flatten(config.to_dict()).items() if not _location(k) and k.split(".")[0] not in unread}


def fingerprint(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(settings_of(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def changes(recorded: dict, config: RunConfig) -> list[str]:
    """How `config` differs from the settings a cell ran with ('train.lr: 0.05 -> 0.02'); an
    option added to synthaug since, at the value synthaug had before it (its `ADDED` value, else its
    default), is no change (`config.config_changes`)."""
    return config_changes(recorded, config, ignore=_location)


def with_locations(cell: Cell, out: Path) -> RunConfig:
    """The cell's config writing under the suite's folder `out`: cells/<n>, one generator
    cache, and one store per (setting, generator, recipe section options) shared by the
    classifier seeds and by recipes whose images are the same (TADA's variants; SYNAuG's
    options that only change the training, named by its section's `image_keys()` or IMAGE_KEYS; every selector;
    with feedback guidance, only cells whose guiding scorer trains alike)
    and by settings that differ in their test set only (a setting's `stores`)."""
    config = cell.config
    name = hashlib.sha256(cell.key.encode()).hexdigest()[:12]
    config = replace(config, output_dir=str(out / "cells"), name=f"{_slug(cell.setting)}-{_slug(cell.recipe)}-{name}",
                     generator=replace(config.generator, cache_dir=str(out / "generators")))
    section = get_recipe(config.recipe).shared_store
    if section and getattr(config, section).store_dir is None:
        d = config.to_dict()
        images = {k: d[k] for k in ("data", "split", "generator", section)}
        images["split"] = {k: v for k, v in images["split"].items() if k not in SplitSection.TEST}
        images["generator"].pop("cache_dir", None)
        images["generator"] = drop_former(images["generator"], type(config.generator))
        # the selectors score one shared set of candidates (each writes its own score columns); at
        # overgenerate 1 the candidates are the plan's own rows, the unselected store's images
        factor = d["select"]["overgenerate"]
        images["candidates"] = factor if d["select"]["method"] != "none" and factor != 1 else None
        if config.generator.feedback:  # the images also depend on the guiding scorer's training (generate/feedback.py)
            images["guide"] = [d["train"], d["select"]["scorer_epochs"]]
        settings = getattr(config, section)
        # the options that change the images (at these settings, where the section says)
        keys = settings.image_keys() if hasattr(settings, "image_keys") else getattr(settings, "IMAGE_KEYS", None)
        images[section] = drop_former({k: v for k, v in images[section].items()
                                       if k != "store_dir" and (keys is None or k in keys)}, type(settings))
        key = hashlib.sha256(json.dumps(images, sort_keys=True, default=str).encode()).hexdigest()[:12]
        store = replace(getattr(config, section), store_dir=str(out / "stores" / f"{_slug(cell.stores or cell.setting)}-{section}-{key}"))
        config = replace(config, sections={**config.sections, section: store})
    return config


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("._")[:40] or "x"
