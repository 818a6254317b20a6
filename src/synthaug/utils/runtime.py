"""Device choice, seeding and progress bars."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ..errors import SynthaugError

DEVICE_KINDS = ("cpu", "cuda", "mps")


def machine_kind() -> str:
    """The kind of machine a result holds on (bench rows and tests/test_unchanged.py record it): the
    CPU's vendor and the instruction sets that choose float32 and bfloat16 kernels (oneDNN and MKL
    pick other ones with AVX512-BF16, AVX512-FP16, AMX or VNNI, and on AMD), so a CPU of another
    kind can draw other images from the same seed."""
    probes = sorted(name[4:-10] for name in dir(torch.cpu) if name.startswith("_is_") and name.endswith("_supported")
                    and getattr(torch.cpu, name)())
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    vendor = next((word for word in flags if word in ("GenuineIntel", "AuthenticAMD")), platform.processor() or "?")
    isa = probes + [flag for flag in ("avx512_fp16", "amx_bf16") if flag in flags]
    return f"{platform.machine()} {vendor} {'+'.join(isa)} torch {torch.__version__.split('+')[0]}"


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


def bfloat16_native(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware: a CUDA GPU that supports it, or a CPU
    with AVX512-BF16 or AMX (on other CPUs bfloat16 is emulated, and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                            "_is_amx_tile_supported"))
    return False


def fast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The reduced precision to compute in (autocast) for setting `precision` on `device`, or
    None for float32. `auto` is bfloat16 where the hardware computes it natively, else float32."""
    if precision == "bfloat16" or (precision == "auto" and bfloat16_native(device)):
        return torch.bfloat16
    if precision not in ("auto", "float32"):
        raise SynthaugError(f"precision is {precision!r}: use auto, float32 or bfloat16")
    return None


def send(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor to `device` without waiting: a blocking copy to a GPU first waits for every
    step queued there, so the CPU could not prepare the next step meanwhile (a no-op on the CPU)."""
    return t.to(device, non_blocking=True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision in `dtype` (weights stay float32), or nothing for None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


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
    """A rich progress bar on a terminal; plain lines every ~30 s when the output goes to a
    log or a pipe (`ProgressLines`); or, when not `enabled`, a silent stand-in with the same
    `add_task`/`update`/`advance` calls."""
    if not enabled:
        return contextlib.nullcontext(_Silent())
    if not sys.stdout.isatty():
        return contextlib.nullcontext(ProgressLines())
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


def shown_steps(items, progress: bool, description: str):
    """`items` (a range, a list), iterated with a progress bar (`progress_bar`) advanced per item."""
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(items), info="")
        for n, item in enumerate(items, 1):
            yield item
            bar.update(task, completed=n)


class ProgressLines:
    """Progress for a log file, CI or `nohup`: one plain line per task every `every` seconds
    (default 30, or $SYNTHAUG_PROGRESS_SECONDS) and when it completes, e.g.
    `train generator: 350/800 (44%), 2.1/s, ETA 3:35, loss 0.0312`."""

    def __init__(self, every: float | None = None, stream=None):
        self.every = float(os.environ.get("SYNTHAUG_PROGRESS_SECONDS", 30)) if every is None else every
        self.stream = stream
        self.tasks: list[dict] = []

    def add_task(self, description: str, total: float | None = None, completed: float = 0, info: str = "", **_):
        now = time.monotonic()
        self.tasks.append({"description": description, "total": total, "completed": completed, "info": info,
                           "start": now, "start_completed": completed, "printed": now, "ended": False})
        return len(self.tasks) - 1

    def update(self, task: int, *, completed: float | None = None, advance: float = 0, info: str | None = None, **_):
        t = self.tasks[task]
        t["completed"] = (t["completed"] if completed is None else completed) + advance
        if info is not None:
            t["info"] = info
        now = time.monotonic()
        ended = t["total"] is not None and t["completed"] >= t["total"]
        if (ended and not t["ended"]) or now - t["printed"] >= self.every:
            t["printed"], t["ended"] = now, ended
            print(self.line(t, now), file=self.stream or sys.stdout, flush=True)

    def advance(self, task: int, advance: float = 1):
        self.update(task, advance=advance)

    @staticmethod
    def line(t: dict, now: float) -> str:
        done, total = t["completed"], t["total"]
        rate = (done - t["start_completed"]) / max(now - t["start"], 1e-9)
        count = f"{done:g}/{total:g} ({100 * done / max(total, 1):.0f}%)" if total is not None else f"{done:g}"
        parts = [f"{t['description']}: {count}", f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.3g}/s"]
        if total is not None and rate > 0 and done < total:
            left = int((total - done) / rate)
            parts.append(f"ETA {left // 60}:{left % 60:02d}")
        return ", ".join(parts + ([t["info"]] if t["info"] else []))


class _Silent:
    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass

    def advance(self, *args, **kwargs):
        pass
