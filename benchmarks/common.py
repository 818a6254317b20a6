"""Helpers shared by the benchmark scripts: result rows (JSON lines, resumable), mean ± std
tables, and splicing a table into BENCHMARKS.md between markers."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from synthaug.bench.runner import environment as bench_environment

HERE = Path(__file__).resolve().parent
# the project's CIFAR-10 (JPEG) tarball, beside the checkout; the library itself looks only at SYNTHAUG_CIFAR10
SHARED_CIFAR10 = HERE.parents[1] / "shared" / "data" / "cifar10-jpg.tar.gz"
if SHARED_CIFAR10.exists():
    os.environ.setdefault("SYNTHAUG_CIFAR10", str(SHARED_CIFAR10))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_row(path: Path, row: dict):
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def environment() -> dict:
    """Where a row was measured: the suites' record (commit, marked `+changes` when the package's
    files are not as committed; device, threads, torch, version)."""
    return bench_environment()


def trained_oracle(train, config, *, seed: int = 0, progress: bool = True):
    """The classifier that judges images and labels in the scripts (trained on `train`, with
    `config`, a TrainConfig), trained once and kept under `results/cache/oracles/<key>/`: the
    scripts that train it on the same data with the same settings share it, and a rerun judges
    with the same one. The key names the arithmetic `auto` precision picks here."""
    import hashlib

    from synthaug.classify import fit_classifier
    from synthaug.classify.models import Classifier
    from synthaug.utils.keys import key_dict
    from synthaug.utils.runtime import fast_dtype, resolve_device

    dtype = fast_dtype(config.precision, resolve_device(config.device))
    key = {"data": train.fingerprint(), "config": {**key_dict(config), "precision": str(dtype)}, "seed": seed}
    folder = HERE / "results" / "cache" / "oracles" / hashlib.sha256(
        json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    if (folder / "model.safetensors").exists():
        return Classifier.from_pretrained(folder).eval()
    model = fit_classifier(train, config, seed=seed, progress=progress).model
    model.save_pretrained(folder)  # atomic: a folder without model.safetensors is trained again
    return model.eval()


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


def publish(results: Path, key: str, table: str, *, to_benchmarks: bool):
    """Write the table beside the results and, for a full run, into BENCHMARKS.md."""
    results.with_suffix(".md").write_text(table)
    if to_benchmarks:
        splice(HERE.parent / "BENCHMARKS.md", key, table)
    print(table)


def parse_args(doc: str, name: str, settings: dict, quick: dict, methods: dict, default_settings: list[str]):
    """The arguments every method-comparison benchmark takes. Returns the arguments (with
    `--quick` turned into the quick settings and one seed), every setting by name, and the
    results file (`<name><tag>.jsonl`, or `<name>-quick<tag>.jsonl` with `--quick`)."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=default_settings, choices=[*settings, *quick])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for every run")
    parser.add_argument("--tag", default="", help="suffix for the results file (for tuning runs)")
    parser.add_argument("--quick", action="store_true", help="digits, tiny generator, 1 seed: checks the script")
    args = parser.parse_args()
    if args.quick:
        args.settings, args.seeds = list(quick), [0]
    results = HERE / "results" / f"{name}{'-quick' if args.quick else ''}{args.tag}.jsonl"
    return args, {**settings, **quick}, results
