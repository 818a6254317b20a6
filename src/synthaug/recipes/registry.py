"""Recipes compose the stages into a method. Register one with
`@register_recipe("name", "one line")` on `fn(task, config, *, workdir, progress, trained)`
returning a `RecipeResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..classify.models import Classifier
from ..config import READERS
from ..data.dataset import ImageDataset
from ..utils.registry import Registry


@dataclass
class RecipeResult:
    metrics: dict  # test metrics (see classify.evaluate.classification_metrics)
    model: Classifier
    history: list[dict]  # per-epoch training log
    seconds: dict[str, float]  # wall time per stage
    extra: dict = field(default_factory=dict)  # more results for metrics.json (plan, rounds, generator, ...)
    synthetic: ImageDataset | None = None  # the generated images the model trained on (for the report)
    replayed: ImageDataset | None = None  # real images added to the training set: drawn again (replay controls) or
    # left out by the split (synaug.unseen)
    figures: dict = field(default_factory=dict)  # images only the report shows (name: uint8 tensor)
    curve: list[dict] = field(default_factory=list)  # test accuracy against steps (eval.curve_every)
    steps: int | None = None  # the tested classifier's optimiser steps (the report's baselines train as long)


@dataclass
class Recipe:
    name: str
    description: str
    run: Callable[..., RecipeResult]  # run(task, config, *, workdir, progress, trained) -> RecipeResult
    check: Callable | None = None  # check(task, config): raise SynthaugError before anything is written
    report: Callable | None = None  # report(result, real) -> HTML: the recipe's own sections of report.html
    # the config section whose store_dir runs that differ only in the classifier seed may share,
    # because the recipe's images do not depend on that seed (None: no store, or images that do)
    shared_store: str | None = None
    generates: bool = False  # it makes synthetic images (a benchmark runs it once per generator seed)
    ssl: bool = False  # its classifier can train semi-supervised on the split's unlabelled pool (train.ssl)
    selects: bool = False  # its images go through `select_stage` (select.method, select.boundary)


RECIPES: Registry[Recipe] = Registry("recipe")


def register_recipe(name: str, description: str, check: Callable | None = None, report: Callable | None = None,
                    shared_store: str | None = None, generates: bool | None = None, ssl: bool = False,
                    options: str | None = None, selects: bool = False):
    """`generates` defaults to whether the recipe has a store to share; `options`, the config
    section it reads, to its `shared_store` section, else the section named like the recipe."""
    generates = shared_store is not None if generates is None else generates
    READERS.setdefault(options or shared_store or name, set()).add(name)
    return RECIPES.register(name, lambda fn: Recipe(name, description, fn, check, report, shared_store, generates, ssl,
                                                   selects))


def get_recipe(name: str) -> Recipe:
    return RECIPES.lookup(name)


def classifier_inputs(task, config) -> dict:
    """What a recipe's final classifier trains on besides its labelled images: the split's
    unlabelled pool when `train.ssl` is set, and the test set to score every
    `eval.curve_every` steps (the accuracy-against-steps curve; nothing is chosen by it)."""
    return {"unlabeled": task.unlabeled if config.train.ssl != "none" else None,
            "monitor": task.test if config.eval.curve_every else None, "monitor_every": config.eval.curve_every}


def train_and_evaluate(data: ImageDataset, task, config, *, workdir, progress: bool = False, **kwargs):
    """Train the classifier from scratch on `data` (the run's training config; semi-supervised
    with `train.ssl`) and test it: the last stage of the generative recipes. Returns the
    training result, the test metrics and the seconds of each."""
    import time
    from pathlib import Path

    from ..classify import evaluate, fit_classifier

    result = fit_classifier(data, config.train, seed=config.seed, checkpoint_dir=Path(workdir) / "checkpoint",
                            progress=progress, **classifier_inputs(task, config), **kwargs)
    t0 = time.perf_counter()
    metrics = evaluate(result.model, task.test, train_counts=task.train.class_counts(),
                       many_threshold=config.eval.many_threshold, few_threshold=config.eval.few_threshold)
    return result, metrics, {"train": result.seconds, "evaluate": time.perf_counter() - t0}
