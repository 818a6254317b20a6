"""Where synthaug may write, in one place: names that become one path component, paths kept
under their root, folder options checked before anything is written, and folders created
so that a failure removes exactly what it created."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SynthaugError

# one path component: no separator, not '.' or '..', no leading dot (hidden / relative), no
# control characters
_PLAIN = re.compile(r"[^/\\\x00-\x1f\x7f]+")


def check_name(value, what: str) -> str:
    """`value` if it can name one file or folder inside a folder synthaug owns; else one line
    saying why. The one rule for run names, store row ids and shard names."""
    if not isinstance(value, str) or not _PLAIN.fullmatch(value) or value.startswith(".") or len(value) > 200:
        raise SynthaugError(f"{what} {value!r} must be one plain folder name (no '/' or '\\', "
                            "not starting with '.', at most 200 characters): e.g. my-run")
    return value


def inside(root: str | os.PathLike, relative: str, what: str) -> Path:
    """`root / relative`, refused unless it stays under `root` (no absolute paths, no '..'
    climbing out, no symlink pointing out)."""
    root = Path(root)
    path = root / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise SynthaugError(f"{what} '{relative}' points outside '{root}': remove that entry")
    return path


def check_folder(value, key: str) -> Path | None:
    """A folder option (None allowed): no existing part of the path may be a file. Writes nothing."""
    if value is None:
        return None
    if "\x00" in str(value):
        raise SynthaugError(f"{key} {str(value)!r} holds a NUL character: give a plain folder path")
    path = Path(value)
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                raise SynthaugError(f"{key} '{value}': '{part}' is a file, not a folder: give a folder path")
            break
    return path


def make_folders(path: str | os.PathLike, key: str) -> list[Path]:
    """Create `path` and its missing parents; returns the folders created (outermost first),
    so a caller that fails later can remove exactly those (`remove_created`). An OS error is
    one line naming the option."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_created(missing)
        raise SynthaugError(f"cannot write to {key} '{path}' ({e.strerror or e}): choose a folder you can write to") from None
    return missing


def remove_created(folders: list[Path]):
    """Remove the (empty) folders that `make_folders` created, innermost first."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass
