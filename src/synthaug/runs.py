"""A run: config -> data -> split -> recipe -> run folder with the resolved config,
metrics.json and the trained classifier. Interrupted runs resume from their checkpoint;
finished runs are not redone.

A run folder is `<output_dir>/<name>`, `name` one plain folder name. synthaug marks the
folders it makes with `.synthaug-run`; `--force` deletes only such a folder. Every check
that can fail (config, device, model, generator folder, store folders, data, split, recipe)
runs before the first byte is written."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml

from .config import RunConfig, config_changes, dump_config, flatten
from .data import load_dataset
from .errors import SynthaugError
from .recipes import RECIPES, get_recipe
from .task import make_task
from .utils.io import atomic_write_json, atomic_write_text, marked, write_marker
from .utils.paths import check_name, make_folders, remove_created
from .utils.runtime import resolve_device

MARKER = ".synthaug-run"  # run folders; benchmark folders and --seeds summaries carry it too
STORE_SECTIONS = ("synaug", "tada", "augcond", "utilgen")


def preflight(config: RunConfig, baselines: list[str] = ()):
    """The checks of a run that need no data: recipe and baseline names, device, model,
    executor (and its package), selector, options that would do nothing, generator kind (a
    pretrained pipeline's packages and folder), feature spaces, store folders and the run name
    (the data and the generator folder against it are `checked`'s). Raises SynthaugError;
    writes nothing."""
    from .classify.models import MODELS
    from .generate.cache import GENERATORS, generator_kind
    from .generate.executors import check_executor
    from .select.features import check_features
    from .select.filters import SELECTORS
    from .store import check_store_folder, check_stores_folder

    for name in baselines if config.recipe == "auto" else (config.recipe, *baselines):
        get_recipe(name)  # recipe: auto is resolved once the data is loaded
    resolve_device(config.train.device)
    MODELS.lookup(config.train.model)
    check_executor(config.executor.name)
    if config.select.method != "none":
        SELECTORS.lookup(config.select.method, also=("none",))
    if (config.select.method != "none" or config.select.boundary) and config.recipe != "auto":
        if not get_recipe(config.recipe).selects:  # its images would go unselected without a word
            able = ", ".join(sorted(n for n in RECIPES.names() if get_recipe(n).selects))
            option = "select.method" if config.select.method != "none" else "select.boundary"
            raise SynthaugError(f"recipe {config.recipe} does not select its images, so {option} would do nothing: "
                                f"use one of {able}, or leave select.method=none and select.boundary=0")
    if config.validate.enabled and config.recipe == "auto":
        raise SynthaugError("recipe auto picks a classical recipe, which makes no synthetic images, so validate.enabled "
                            "would do nothing: set validate.enabled=false, or name a generative recipe")
    if config.validate.enabled and not get_recipe(config.recipe).generates:
        able = ", ".join(sorted(n for n in RECIPES.names() if get_recipe(n).generates and n != "ldmlr"))
        raise SynthaugError(f"recipe {config.recipe} makes no synthetic images, so validate.enabled would do nothing: "
                            f"use one of {able}, or set validate.enabled=false")
    GENERATORS.lookup(generator_kind(config.generator))
    if (config.generator.feedback or config.generator.ensemble > 1 or config.generator.path
            or config.generator.guidance_interval is not None):
        from .generate.cache import saved_kind

        path = config.generator.path  # a saved generator: the kind its folder names
        kind = (saved_kind(path) or "embedded") if path else generator_kind(config.generator)
        if config.generator.feedback:
            check_feedback(config, kind)
        if config.generator.guidance_interval is not None and kind not in ("embedded", "ensemble"):
            raise SynthaugError(f"generator.guidance_interval limits the embedded generator's guidance, not the {kind} "
                                "generator's: leave generator.pretrained unset, or generator.guidance_interval unset")
        if config.generator.ensemble > 1 or kind == "ensemble":  # a saved ensemble serves the same recipes
            check_ensemble(config, kind)
    if config.generator.pretrained:
        from .generate.stable_diffusion import check_pretrained

        check_pretrained(config.generator.pretrained)
    check_features(config.select.features, "select.features", used=config.select.method != "none")
    check_features(config.validate.features, "validate.features", used=config.validate.enabled)
    for section in STORE_SECTIONS:
        check_store_folder(getattr(config, section).store_dir, f"{section}.store_dir")
    check_stores_folder(config.dpt.store_dir, "dpt.store_dir")  # DPT's holds one store per generator
    check_name(config.run_name(), "name")


def check_selects(config: RunConfig, option: str, fix: str):
    """Refuse `option` for a recipe whose images do not pass the generation stage (select_stage)."""
    if config.recipe == "auto" or not get_recipe(config.recipe).selects:
        able = ", ".join(sorted(n for n in RECIPES.names() if get_recipe(n).selects))
        raise SynthaugError(f"recipe {config.recipe} takes no {option} (the recipes whose images pass select's stage "
                            f"do): use one of {able}, or {fix}")


def check_feedback(config: RunConfig, kind: str):
    """Refuse feedback guidance where it would do nothing or cannot run: a recipe whose images do not
    pass the generation stage, a generator other than the embedded one, an executor with workers."""
    from .generate.executors import check_guided

    name = "generator.feedback"
    check_selects(config, name, f"set {name}=0")
    if kind not in ("embedded", "ensemble"):  # an ensemble passes the guide to its embedded generators
        raise SynthaugError(f"{name} guides the embedded generator's sampling, not the {kind} generator's: leave "
                            f"generator.pretrained unset, or set {name}=0")
    check_guided(config.executor.name)


def check_ensemble(config: RunConfig, kind: str):
    """Refuse a generator ensemble where it would do nothing or cannot be trained: a recipe whose images
    do not pass the generation stage, a generator the run does not train (Stable Diffusion, a saved one)."""
    name = "generator.ensemble"
    check_selects(config, name, f"set {name}=1" if config.generator.ensemble > 1 else
                  "point generator.path at a single generator")
    if config.generator.ensemble > 1 and (kind != "embedded" or config.generator.path):
        what = f"the saved generator in '{config.generator.path}'" if config.generator.path else f"the {kind} generator"
        raise SynthaugError(f"{name} trains that many embedded generators at successive seeds, and this run uses "
                            f"{what}: leave generator.path and generator.pretrained unset, or set {name}=1")


def check_run_dir(run_dir: Path, config: RunConfig, *, force: bool = False) -> bool:
    """Refuse a `run_dir` this run may not use: a file or a link; with `force`, a folder that is
    not a run folder synthaug made (a benchmark's folder and a --seeds summary carry the same
    marker but no config.yaml); without, a folder holding another run, one without the marker
    (a config.yaml alone does not make a folder synthaug's) or something else. Returns
    whether `run_dir` holds this config's run, to resume. Writes nothing."""
    config_file = run_dir / "config.yaml"
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise SynthaugError(f"'{run_dir}' is a file or a link, not a run folder: set another name (name=...)")
    ours = marked(run_dir, MARKER)
    if force and run_dir.exists() and any(run_dir.iterdir()):
        if not ours:
            raise SynthaugError(f"--force deletes only run folders synthaug made, and '{run_dir}' has no {MARKER}: "
                                "remove it yourself or set another name (name=...)")
        if not config_file.is_file() and any(p.name != MARKER for p in run_dir.iterdir()):
            raise SynthaugError(f"--force deletes only run folders, and '{run_dir}' holds no run's config.yaml (a "
                                "benchmark's folder or a --seeds summary): set another name (name=...)")
        return False
    if config_file.is_file():
        if not ours:  # a user's folder holding a dumped config, or an older synthaug's run: never written into
            raise SynthaugError(f"'{run_dir}' holds a config.yaml but no {MARKER}, so synthaug did not make it: set "
                                f"another name (name=...), or, if it is a synthaug run to resume, create the empty file "
                                f"'{run_dir / MARKER}'")
        if recorded_changes(run_dir, config) == []:
            return True  # resumed
        if not _unstarted(run_dir):
            raise SynthaugError(f"run folder '{run_dir}' holds a run with a different config: set another name "
                                "(name=...) or pass --force")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise SynthaugError(f"'{run_dir}' exists and is not a synthaug run: set another name (name=...) or remove it")
    return False


def prepare_run_dir(run_dir: Path, config: RunConfig, *, force: bool = False) -> tuple[bool, list[Path]]:
    """Create `run_dir` with its marker and config.yaml, after `check_run_dir`. Returns (whether
    a run with this config was started there before, the folders created now). With `force`, a
    run folder synthaug made is deleted first."""
    if check_run_dir(run_dir, config, force=force):
        return True, []
    if force:
        clear_run_dir(run_dir, config)
    config_file = run_dir / "config.yaml"
    created = make_folders(run_dir, "output_dir")
    try:
        write_marker(run_dir / MARKER, "a run folder made by synthaug\n")
        atomic_write_text(config_file, dump_config(config))
    except OSError as e:
        remove_created(created)
        raise SynthaugError(f"cannot write to output_dir '{config.output_dir}' ({e.strerror}): choose a folder you "
                            "can write to") from None
    return False, created


def clear_run_dir(run_dir: Path, config: RunConfig):
    """Delete the run folder at `run_dir`, only where `--force` may (`check_run_dir`)."""
    check_run_dir(run_dir, config, force=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)


def recorded_changes(run_dir: Path, config: RunConfig) -> list[str] | None:
    """How `config` differs from the config that `run_dir` records, up to options added to synthaug
    since (at their defaults): [] the same, None where the folder records none."""
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return ["its config.yaml cannot be read"]
    return config_changes(flatten(recorded), config) if isinstance(recorded, dict) else ["its config.yaml is not a config"]


def started_elsewise(run_dir: Path, config: RunConfig) -> list[str]:
    """How `config` differs from the run that `run_dir` holds, where that run started (a run
    stopped, then its config changed): what `prepare_run_dir` refuses without `force`. [] where
    the folder is absent, holds this config or nothing computed yet."""
    if not run_dir.is_dir() or _unstarted(run_dir):
        return []
    return recorded_changes(run_dir, config) or []


def _unstarted(run_dir: Path) -> bool:
    """Only what `prepare_run_dir` writes is there: nothing was computed yet."""
    return {p.name for p in run_dir.iterdir()} <= {MARKER, "config.yaml"}


def _undo_unstarted(run_dir: Path, created: list[Path]):
    """Remove a run folder made now (`prepare_run_dir`'s `created`) where nothing was computed in it."""
    if created and _unstarted(run_dir):
        shutil.rmtree(run_dir)
        remove_created(created[:-1])


def _trained_for(done_file: Path):
    """The step budget a finished baseline trained for (None: its own schedule), or a marker that
    matches no budget when it has not finished or cannot be read."""
    try:
        done = json.loads(done_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "unfinished"
    if not isinstance(done, dict) or "test" not in done:
        return "unfinished"
    if "for_steps" in done:
        return done["for_steps"]
    # recorded before the budget was: its own schedule, or a budget no longer known (retrained)
    return None if "steps" not in done else "unknown"


def _finished(run_dir: Path, config: RunConfig, compare: bool, classes: list[str], baselines: list[str]) -> dict | None:
    """The metrics of a finished run, or None if it must (re)run: no metrics yet, a run made
    by `train` when `run` asks for the comparison and report, one compared with other baselines
    than `baselines` (an older synthaug's defaults; those trained before are kept), or a damaged
    synthetic store (the re-run regenerates exactly the damaged images)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("synthetic") or {}, dict):
        return None
    if compare and not metrics.get("compared", "baselines" in metrics):
        return None
    if compare and "baselines" in metrics and "baseline_steps" not in metrics:
        return None  # an older synthaug's baselines, on their own schedule: train them for the recipe's steps
    if compare and set(metrics.get("baselines", {})) != set(baselines):
        return None
    if compare and config.report.html and not (run_dir / "report.html").is_file():
        return None
    store = (metrics.get("synthetic") or {}).get("store")
    if isinstance(store, str) and Path(store).is_dir():
        from .store import SyntheticStore

        found = SyntheticStore(store, classes).problems()
        damage = {k: len(v) for k, v in found.items() if v}
        if damage:
            said = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in damage.items())
            print(f"synthetic store '{store}': {said}: regenerating them and re-running", file=sys.stderr)
            return None
    return metrics


def check_ssl(task, config: RunConfig, recipes):
    """Semi-supervised training needs an unlabelled pool and recipes whose classifier takes one."""
    if config.train.ssl == "none":
        return
    if task.unlabeled is None or len(task.unlabeled) == 0:
        raise SynthaugError(f"train.ssl={config.train.ssl} trains on an unlabelled pool and this split has none: use "
                            "split.kind=few-shot with split.unlabeled_pool=true, or set train.ssl=none")
    for recipe in recipes:
        if not recipe.ssl:
            able = ", ".join(sorted(name for name in RECIPES.names() if get_recipe(name).ssl))
            raise SynthaugError(f"recipe {recipe.name} trains its classifier supervised only: set train.ssl=none, or use "
                                f"one of {able}")


def checked(config: RunConfig, compare: bool):
    """Every check of a run, the data's included: (the data, its cache not yet written; the task;
    the config, `recipe: auto` resolved; auto's record or None). Raises SynthaugError; writes nothing."""
    preflight(config, config.report.every_baseline() if compare else ())
    data = load_dataset(config.data.dataset, image_size=config.data.image_size, channels=config.data.channels,
                        cache_dir=config.data.cache_dir, defer_cache=True)
    task = make_task(data, config.split)
    auto = None
    if config.recipe == "auto":
        from .analyse import resolve_auto

        resolved, auto = resolve_auto(config, task)
        config = replace(resolved, name=config.name or config.run_name())  # the run folder keeps "auto" in its name
        preflight(config, config.report.every_baseline() if compare else ())
    recipe = get_recipe(config.recipe)
    names = [b for b in config.report.baselines_for(task.train.groups is not None) if b != recipe.name]
    check_task(task, config, [recipe, *(get_recipe(b) for b in names)] if compare else [recipe])
    return data, task, config, auto


def check_task(task, config: RunConfig, recipes: list):
    """The checks against the split of a run whose recipe is `recipes[0]` (the others its
    baselines): semi-supervised training, the recipe's own check, the model folders it reads."""
    check_ssl(task, config, recipes)
    if recipes[0].check is not None:
        recipes[0].check(task, config)
    check_folders_fit(task, config)


def check_folders_fit(task, config: RunConfig):
    """The folders a run reads from, against the data: the generator folder, a classifier
    folder used for features, and the stores it would add to (a store of other data is refused
    before the run writes, not once its generator has trained). Writes nothing."""
    from .select.features import check_features_fit
    from .store import SyntheticStore, is_store

    stores = [getattr(config, section).store_dir for section in STORE_SECTIONS]
    if config.dpt.store_dir and Path(config.dpt.store_dir).is_dir():  # DPT's: one store per generator
        stores += sorted(Path(config.dpt.store_dir).iterdir())
    for folder in stores:
        if folder and is_store(folder):
            SyntheticStore(folder, task.train.classes).check_rows()

    if config.generator.path:
        from .generate.cache import check_generator_folder

        check_generator_folder(config.generator.path, task.train)
    if config.select.method != "none":
        check_features_fit(config.select.features, "select.features", task.train)
    if config.validate.enabled:
        check_features_fit(config.validate.features, "validate.features", task.train)


def train_run(config: RunConfig, *, progress: bool = True, force: bool = False, compare: bool = False,
              keep_checkpoint: bool = False) -> tuple[Path, dict]:
    """Run one recipe as configured; returns the run folder and the metrics written there.
    `keep_checkpoint` keeps the classifier's last training checkpoint in the finished folder
    (`train`'s: `run` on the same folder then adds the baselines and the report without
    training that classifier again; every other checkpoint goes).

    With `compare`, the baselines in `config.report.baselines` (left at the default, the group
    methods where the split has groups) are trained in the same run on the same split (each saved as it finishes, so an interrupted run keeps them), and
    `report.html` is written."""
    t0 = time.perf_counter()
    data, task, config, auto = checked(config, compare)
    recipe = get_recipe(config.recipe)
    # a baseline that is the recipe itself (recipe: auto often picks one) is not trained twice
    names = [b for b in config.report.baselines_for(task.train.groups is not None) if b != recipe.name]
    baselines = [get_recipe(b) for b in names] if compare else []
    load_seconds = time.perf_counter() - t0
    run_dir = Path(config.output_dir) / config.run_name()
    check_run_dir(run_dir, config, force=force)
    # Everything above can fail on bad input; nothing is written before this point.
    if force:  # before --force deletes the old run: a cache that cannot be written leaves it as it was
        data.save_cache()
    started, created = prepare_run_dir(run_dir, config, force=force)
    try:
        data.save_cache()  # after the run folder, which is undone if the cache cannot be written
    except SynthaugError:
        _undo_unstarted(run_dir, created)
        raise
    kept = ("checkpoint",) if keep_checkpoint else ()
    if started and (done := _finished(run_dir, config, compare, task.train.classes, names)) is not None:
        remove_checkpoints(run_dir, keep=kept)  # a run finished by an older synthaug, or stopped before its cleanup
        return run_dir, done
    try:
        result = recipe.run(task, config, workdir=run_dir, progress=progress)
    except SynthaugError:  # refused before computing anything: leave no trace
        _undo_unstarted(run_dir, created)
        raise
    result.model.save_pretrained(run_dir / "classifier")
    validation = None
    if config.validate.enabled and result.synthetic is not None:
        from .select.stage import validation_stage

        validation = validation_stage(task, result.synthetic, config, result.model, workdir=run_dir, progress=progress)
    compared, trained = {}, {}
    # the baselines train for the recipe's optimiser steps (the oracle, a reference, for its own): a gain
    # over them is not more steps
    steps = result.steps if config.train.steps is None and result.steps else None
    equal = replace(config, train=replace(config.train, steps=steps)) if steps else config
    for baseline in baselines:
        done_file = run_dir / "baselines" / f"{baseline.name}.json"
        own = config if baseline.name == "oracle" else equal
        if _trained_for(done_file) != own.train.steps:  # not yet, or for another budget (an older synthaug)
            b = baseline.run(task, own, workdir=run_dir / "baselines" / baseline.name, progress=progress,
                             trained=trained)
            atomic_write_json(done_file, {"test": b.metrics, "seconds": b.seconds, "steps": b.steps,
                                          "for_steps": own.train.steps})
            shutil.rmtree(run_dir / "baselines" / baseline.name, ignore_errors=True)
        compared[baseline.name] = json.loads(done_file.read_text())
    metrics = {
        "recipe": config.recipe,
        "description": recipe.description,
        "dataset": data.name,
        "seed": config.seed,
        "task": task.describe(),
        "test": result.metrics,
        "seconds": {"load_data": load_seconds, **result.seconds},
        "history": result.history,
        **({"curve": result.curve} if result.curve else {}),
        **result.extra,
        "compared": compare,
    }
    if auto is not None:
        metrics["auto"] = auto
    if validation is not None:
        metrics["validation"] = validation
    if compared:
        metrics["baselines"] = compared
        metrics["baseline_steps"] = equal.train.steps  # None: the baselines' own schedule
    # the metrics first: a report that fails (and is redone by the next run) loses nothing
    atomic_write_json(run_dir / "metrics.json", metrics)
    if compare and config.report.html:
        from .report import write_report

        sections = (lambda: recipe.report(result, task.train)) if recipe.report is not None else None
        write_report(run_dir / "report.html", metrics, task.train, result.synthetic, dump_config(config), sections,
                     replayed=result.replayed)
    remove_checkpoints(run_dir, keep=kept)
    return run_dir, metrics


# the training checkpoints a recipe's stages leave in its run folder, named one by one (a glob over the folder
# could meet a store's class folder of the same name): they resume an interrupted run and serve no finished one
# (the validation stage and the filter's scorer drop their own)
CHECKPOINTS = ("checkpoint", "early-checkpoint", "labeller-checkpoint", "checkpoint-synthetic-only", "rounds/r*/valuation")


def remove_checkpoints(run_dir: Path, keep: tuple[str, ...] = ()):
    """Drop the stages' training checkpoints from a finished run's folder (`CHECKPOINTS`), but
    those named in `keep`. Only what lies in the run folder itself: a link on the way leads out."""
    inside = run_dir.resolve()
    for pattern in (p for p in CHECKPOINTS if p not in keep):
        for leftover in run_dir.glob(pattern):
            if leftover.resolve().is_relative_to(inside) and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def seeds_run(config: RunConfig, seeds: list[int], *, progress: bool = True, force: bool = False) -> tuple[Path, dict]:
    """`train_run` with the baselines for each of `seeds`, one run folder per seed (so an
    interrupted sweep resumes where it stopped), then the paired comparison against the best
    classical baseline (`verdict.compare`): `<output_dir>/<name>-seeds-<seeds>/` with
    summary.json, summary.md and report.html, the verdict first. The generator is shared
    through its cache; so is the store (`<summary folder>/synthetic`) when the recipe's images
    do not depend on the classifier seed (`Recipe.shared_store`) and no store_dir is set."""
    from .report import write_seeds_report
    from .verdict import compare, compare_tied, headline

    if len(set(seeds)) != len(seeds) or len(seeds) < 2:
        raise SynthaugError(f"--seeds {','.join(map(str, seeds))}: give two or more different seeds, e.g. --seeds 0,1,2")
    if config.recipe == "auto":  # resolved once for every seed, from the split
        from .analyse import resolve_auto

        preflight(config, config.report.every_baseline())
        data = load_dataset(config.data.dataset, image_size=config.data.image_size, channels=config.data.channels,
                            cache_dir=config.data.cache_dir, defer_cache=True)
        config, _ = resolve_auto(config, make_task(data, config.split))
    configs = [replace(config, seed=s, name=f"{config.name}-s{s}" if config.name else None) for s in seeds]
    base = config.name or configs[0].run_name().removesuffix(f"-s{seeds[0]}")
    summary_dir = Path(config.output_dir) / check_name(f"{base}-seeds-{'-'.join(map(str, seeds))}", "name")
    section = get_recipe(config.recipe).shared_store
    if section and getattr(config, section).store_dir is None:
        shared = replace(getattr(config, section), store_dir=str(summary_dir / "synthetic"))
        configs = [replace(c, sections={**c.sections, section: shared}) for c in configs]
    for c in configs:
        preflight(c, c.report.every_baseline())  # the run name included
    if summary_dir.exists() and not marked(summary_dir, MARKER):
        raise SynthaugError(f"'{summary_dir}' exists and is not a folder synthaug made: choose another name or output_dir")
    if (summary_dir / "config.yaml").exists():  # a run's folder carries the same marker
        raise SynthaugError(f"'{summary_dir}' is a run's folder, not a --seeds summary: choose another name or output_dir")
    checked(configs[0], compare=True)  # the data's checks: the seeds share the data, the split and the recipe
    for c in configs:
        check_run_dir(Path(c.output_dir) / c.run_name(), c, force=force)
    make_folders(summary_dir, "the summary folder")  # every check above passed
    if not marked(summary_dir, MARKER):
        write_marker(summary_dir / MARKER, "a --seeds summary made by synthaug\n")
    runs = {}
    for c in configs:
        run_dir, metrics = train_run(c, progress=progress, force=force, compare=True)
        runs[c.seed] = (run_dir, metrics)
    # the seeds share their data, so groups are in every run's test or in none
    metric, second = headline(runs[seeds[0]][1]["test"])

    def scores_of(key: str) -> dict[str, dict[int, float]]:
        out = {config.recipe: {s: m["test"][key] for s, (_, m) in runs.items()}}
        for s, (_, m) in runs.items():
            for name, b in m.get("baselines", {}).items():
                if name != config.recipe:  # a run from before baselines left out the recipe itself
                    out.setdefault(name, {})[s] = b["test"][key]
        return out
    scores, seconds = scores_of(metric), scores_of(second)
    found = compare(scores, config.recipe, tiebreak=seconds)
    tied = compare_tied(found, seconds)  # every seed the same score (every worst group 0): read the second
    line = found.line_with_tie(tied, METRIC_NAMES[second]) if found else None
    summary = {"recipe": config.recipe, "dataset": config.data.dataset, "seeds": seeds, "metric": metric,
               "scores": scores, "runs": {s: str(d) for s, (d, _) in runs.items()},
               "verdict": found.to_dict() if found else None, "verdict_line": line,
               "tied": tied.to_dict() if tied else None}
    atomic_write_json(summary_dir / "summary.json", summary)
    table = seeds_table(summary)
    atomic_write_text(summary_dir / "summary.md", table)
    if config.report.html:
        write_seeds_report(summary_dir / "report.html", summary, table)
    return summary_dir, summary


METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "worst_group_accuracy": "worst-group accuracy",
                "accuracy": "accuracy"}


def seeds_table(summary: dict) -> str:
    """The verdict's metric per method, mean ± std over the seeds, in Markdown, verdict first."""
    import statistics

    lines = [summary["verdict_line"] or "no classical baseline to compare with", "",
             f"| method | {METRIC_NAMES[summary['metric']]} (%), mean ± std | seeds |", "|---|---|---|"]
    for name, by_seed in summary["scores"].items():
        values = [100 * v for v in by_seed.values()]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(values):.2f} ± {spread:.2f} | {len(values)} |")
    return "\n".join(lines) + "\n"
