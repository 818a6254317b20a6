"""Cache keys that outlive new options. Caches (trained labellers, scorers, checkpoints,
shared stores, trained generators) are named by a hash of the settings that made them; an
option added to synthaug later would rename every cache made before it. A settings class
lists such options in `ADDED`, each with its *former* value: what synthaug did before the
option existed. `key_dict` leaves an option out of the key while it is at that value, so a
cache made before the option keeps its name, and a changed default (Min-SNR on) names the
new caches apart from the old ones."""

from __future__ import annotations

from dataclasses import asdict


def key_dict(settings) -> dict:
    """`asdict(settings)` for a cache key: the options of the class's `ADDED` are left out
    while at their former values, so a cache made before they existed keeps its name."""
    return drop_former(asdict(settings), type(settings))


def drop_former(d: dict, kind: type) -> dict:
    """`d` (a dict of `kind`'s fields) without `kind.ADDED`'s options that are at their former values."""
    former = getattr(kind, "ADDED", {})
    return {k: v for k, v in d.items() if not (k in former and v == former[k])}
