"""One registry helper for every extension point (recipes, models, sources, selectors,
feature spaces, executors), as timm's `_registry`: a decorator to register, `get` with a
did-you-mean error (`lookup`; `get` stays dict.get), and the names in registration order."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import SynthaugError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Names to entries. `kind` names what is registered, in error messages ("unknown
    recipe 'x' (did you mean 'y'?): use one of ...")."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str, wrap: Callable[[Callable], T] | None = None):
        """A decorator that registers the function under `name` (`wrap(fn)` is stored
        instead when given) and returns the function unchanged."""

        def decorator(fn):
            self[name] = wrap(fn) if wrap else fn
            return fn

        return decorator

    def lookup(self, name: str, *, also: tuple[str, ...] = ()) -> T:
        """The entry registered as `name`; unknown names are one line with the close match
        and the choices (`also`: other valid values the caller accepts, listed first)."""
        if name in self:
            return self[name]
        choices = [*also, *self]
        close = difflib.get_close_matches(str(name), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SynthaugError(f"unknown {self.kind} '{name}'{hint}: use one of {', '.join(choices)}")

    def names(self) -> list[str]:
        return list(self)
