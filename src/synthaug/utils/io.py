"""Atomic file writes, and training state (model, optimizer, scheduler, RNG) saved as
safetensors + JSON, never pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def atomic_write_text(path: str | os.PathLike, text: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


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
    """Save a nested dict of tensors and plain values (state_dicts, RNG states, counters) as
    `state.safetensors` + `state.json`. The JSON is written last and names the tensor file's
    size, so a state cut off mid-write is detected and ignored."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "s", tensors)
    tmp = folder / ".state.safetensors.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, folder / "state.safetensors")
    atomic_write_json(folder / "state.json", {"skeleton": skeleton, "bytes": (folder / "state.safetensors").stat().st_size})


def load_state(folder: str | os.PathLike) -> dict | None:
    """The state saved by `save_state`, or None if there is none (or it is incomplete)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta, blob = folder / "state.json", folder / "state.safetensors"
    if not (meta.exists() and blob.exists()):
        return None
    info = json.loads(meta.read_text())
    if blob.stat().st_size != info["bytes"]:
        return None
    try:
        tensors = load_file(blob)
    except Exception as e:
        from ..errors import SynthaugError

        raise SynthaugError(f"checkpoint '{blob}' is corrupt ({str(e).splitlines()[0]}): delete '{folder}' to start over") from None
    return _join_tensors(info["skeleton"], tensors)
