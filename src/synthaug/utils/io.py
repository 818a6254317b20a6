"""Atomic file writes, and training state (model, optimizer, scheduler, counters) saved as
safetensors, never pickle."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from ..errors import SynthaugError


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an exclusive lock on the file `path` (created if missing) for the block, so processes
    that would make the same cached thing at once take turns and the later ones read what the first
    saved (parallel bench cells sharing a scorer). Without `fcntl` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def temp_for(path: str | os.PathLike) -> Path:
    """The temporary file a write to `path` goes through before it is renamed into place, refused
    where a link stands: synthaug writes its own files, never through a link to another's."""
    path = Path(path)
    return not_a_link(path.with_name(f".{path.name}.tmp"))


def marked(folder: str | os.PathLike, marker: str) -> bool:
    """Whether `folder` carries synthaug's `marker`: a plain file (a link in its place marks nothing)."""
    path = Path(folder) / marker
    return path.is_file() and not path.is_symlink()


def write_marker(path: str | os.PathLike, text: str):
    """Write a folder's marker (or lock) file, refused where a link stands in its place."""
    not_a_link(Path(path)).write_text(text)


def not_a_link(path: Path) -> Path:
    """`path`, refused where a link stands at it."""
    if path.is_symlink():
        raise SynthaugError(f"'{path}' is a link, not a file synthaug wrote: remove it, then run again")
    return path


def atomic_write_text(path: str | os.PathLike, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_for(path)
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def atomic_save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    """A safetensors file written whole: through `temp_for`, synced, renamed into place (a write
    stopped midway leaves the old file or none, and no temporary file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_for(path)
    try:
        save_file(tensors, tmp, metadata=metadata)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_new_json(path: str | os.PathLike, obj) -> bool:
    """Write `obj` to `path` whole, only where no file is there: a temporary file of a unique name
    is linked into place, which fails rather than replace one that appeared meanwhile. Returns
    whether it was written."""
    import tempfile

    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(json.dumps(obj, indent=2, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: create the file exclusively and copy into it
            with open(path, "x") as out, open(tmp) as f:
                out.write(f.read())
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def read_keyed(path: str | os.PathLike, key: dict) -> dict | None:
    """The JSON object `atomic_write_json` saved at `path` with `"key": key`, or None when there
    is none, it cannot be read, or it was made under another key (compared as JSON)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == json.loads(json.dumps(key)) else None


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _split_tensors(obj, prefix, tensors):
    """Replace every tensor in a nested dict/list by a reference, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_split_tensors(k, f"{prefix}.k{i}", tensors), _split_tensors(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_tensors(obj, tensors):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_state(folder: str | os.PathLike, state: dict):
    """Save a nested dict of tensors and plain values (state_dicts, counters, history) as one
    `state.safetensors`: the tensors, with the rest as JSON in the file's metadata. One file
    renamed into place, so a checkpoint is either the old one or the new one, never a mix."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "s", tensors)
    atomic_save_tensors(folder / "state.safetensors", tensors, {"synthaug_state": json.dumps(skeleton)})


def load_state(folder: str | os.PathLike) -> dict | None:
    """The state saved by `save_state`, or None if there is none."""
    from safetensors import safe_open

    blob = Path(folder) / "state.safetensors"
    if not blob.exists():
        return None
    try:
        with safe_open(str(blob), framework="pt") as f:
            skeleton = json.loads(f.metadata()["synthaug_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        from ..errors import SynthaugError

        raise SynthaugError(f"checkpoint '{blob}' is corrupt ({str(e).splitlines()[0]}): delete '{folder}' to start over") from None
    return _join_tensors(skeleton, tensors)


def _fsync(path: Path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
