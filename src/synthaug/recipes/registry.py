"""Recipes compose the stages into a method. Register one with
`@register_recipe("name", "one line")` on `fn(task, config, *, workdir, progress, trained)`
returning a `RecipeResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..classify.models import Classifier
from ..errors import SynthaugError


@dataclass
class RecipeResult:
    metrics: dict  # test metrics (see classify.evaluate.classification_metrics)
    model: Classifier
    history: list[dict]  # per-epoch training log
    seconds: dict[str, float]  # wall time per stage
    extra: dict = field(default_factory=dict)


@dataclass
class Recipe:
    name: str
    description: str
    fn: Callable[..., RecipeResult]
    check: Callable | None = None  # check(task, config): raise SynthaugError before anything is written


RECIPES: dict[str, Recipe] = {}


def register_recipe(name: str, description: str, check: Callable | None = None):
    def wrap(fn):
        RECIPES[name] = Recipe(name, description, fn, check)
        return fn

    return wrap


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise SynthaugError(f"unknown recipe '{name}': use one of {', '.join(RECIPES)}")
    return RECIPES[name]
