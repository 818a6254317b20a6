"""Cache keys that outlive new options. Caches (trained labellers, scorers, checkpoints,
shared stores) are named by a hash of the settings that made them; an option added to
synthaug later would rename every cache made before it. A settings class lists such options
in `ADDED`, and `key_dict` leaves them out of the key while they are at their defaults."""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields


def key_dict(settings) -> dict:
    """`asdict(settings)` for a cache key: the options of the class's `ADDED` are left out
    while at their defaults, so a cache made before they existed keeps its name."""
    d = asdict(settings)
    return drop_added_defaults(d, type(settings))


def drop_added_defaults(d: dict, kind: type) -> dict:
    """`d` (a dict of `kind`'s fields) without `kind.ADDED`'s options that are at their defaults."""
    defaults = {f.name: f.default for f in fields(kind) if f.default is not MISSING}
    return {k: v for k, v in d.items() if not (k in getattr(kind, "ADDED", ()) and v == defaults.get(k))}
