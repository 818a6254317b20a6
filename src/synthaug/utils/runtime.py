"""Device choice, seeding and progress bars."""

from __future__ import annotations

import contextlib

import torch

from ..errors import SynthaugError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device(device: str, key: str = "device") -> str:
    """`device` if it names a device kind synthaug runs on (auto, cpu, cuda, cuda:N, mps)."""
    try:
        kind = "auto" if device == "auto" else torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in ("auto", *DEVICE_KINDS):
        raise SynthaugError(f"{key} is {device!r}: use auto, cpu, cuda, cuda:<index> or mps")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU. A device this machine lacks is one line."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(check_device(device))
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SynthaugError(f"device {device!r} asked for, but this machine has no CUDA GPU: use auto or cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise SynthaugError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s): use a lower index")
    if resolved.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SynthaugError(f"device {device!r} asked for, but Apple MPS is not available here: use auto or cpu")
    return resolved


@torch.no_grad()
def infer(module: torch.nn.Module, images: torch.Tensor, fn=None, *, batch_size: int = 512,
          empty: tuple = (0,)) -> torch.Tensor:
    """The one batched-inference loop: `fn(module, x, rows)` (default `module(x)`) over uint8
    `images` in batches, `x` the batch as floats in [0, 1] on the module's device (eval mode),
    `rows` its slice of the whole; the outputs concatenated on the CPU."""
    module.eval()
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float() / 255
        out.append((module(x) if fn is None else fn(module, x, slice(i, i + batch_size))).cpu())
    return torch.cat(out) if out else torch.empty(empty)


def progress_bar(enabled: bool = True):
    """A rich progress bar, or a silent stand-in with the same `add_task`/`update` calls."""
    if not enabled:
        return contextlib.nullcontext(_Silent())
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    )


class _Silent:
    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass
