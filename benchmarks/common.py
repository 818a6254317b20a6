"""Helpers shared by the benchmark scripts: result rows (JSON lines, resumable), mean ± std
tables, and splicing a table into BENCHMARKS.md between markers."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_row(path: Path, row: dict):
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    return {"commit": commit, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}


def fmt(values, scale: float = 100.0, digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = scale * statistics.fmean(values)
    std = scale * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def splice(path: Path, key: str, text: str):
    """Replace the block between <!-- key:start --> and <!-- key:end --> in `path`."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def seconds_per_image(runs: list[dict]) -> float | None:
    """Generation seconds per image, over the runs that generated images themselves (runs
    that found their images in a shared store generated none)."""
    made = [(r["generate_seconds"], r["generated_now"]) for r in runs if r.get("generated_now")]
    return sum(s for s, _ in made) / sum(n for _, n in made) if made else None


def publish(results: Path, key: str, table: str, *, to_benchmarks: bool):
    """Write the table beside the results and, for a full run, into BENCHMARKS.md."""
    results.with_suffix(".md").write_text(table)
    if to_benchmarks:
        splice(HERE.parent / "BENCHMARKS.md", key, table)
    print(table)
