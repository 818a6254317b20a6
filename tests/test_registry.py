"""The one registry helper, over every extension point: a misspelt name is one line with the
close match and the choices; a registered entry is found by name."""

import pytest

from synthaug.classify.models import MODELS
from synthaug.config import SECTIONS
from synthaug.data.sources import SOURCES
from synthaug.errors import SynthaugError
from synthaug.generate.cache import GENERATORS
from synthaug.generate.executors import EXECUTORS
from synthaug.recipes import RECIPES
from synthaug.select.features import FEATURES
from synthaug.select.filters import SELECTORS
from synthaug.utils.registry import Registry

REGISTRIES = {"recipe": RECIPES, "model": MODELS, "dataset": SOURCES, "selection method": SELECTORS,
              "feature space": FEATURES, "executor": EXECUTORS, "generator": GENERATORS, "config section": SECTIONS}


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_registry_says_did_you_mean(kind):
    registry = REGISTRIES[kind]
    assert registry.kind == kind and registry.names()
    first = registry.names()[0]
    with pytest.raises(SynthaugError, match=f"unknown {kind} '{first}x' \\(did you mean '{first}'\\?\\): use one of"):
        registry.lookup(first + "x")
    assert registry.lookup(first) is registry[first]


def test_register_returns_the_function_and_stores_the_wrapped_entry():
    registry = Registry("thing")

    @registry.register("a", lambda fn: ("wrapped", fn))
    def a():
        return 1

    assert a() == 1 and registry.lookup("a") == ("wrapped", a)
    with pytest.raises(SynthaugError, match="use one of none, a"):
        registry.lookup("zzz", also=("none",))
