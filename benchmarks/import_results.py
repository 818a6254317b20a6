"""One-off: the rows the former benchmark scripts (benchmarks/{synaug,tada,augcond,utilgen}.py,
removed when `synthaug bench` replaced them) wrote, as `synthaug bench` results, one folder per
shipped suite under benchmarks/results/bench/.

    python benchmarks/import_results.py

Each old row becomes the row of the suite cell that runs the same protocol (the same settings,
method overrides, seeds and optimiser steps; float32, which the suites pin). The row keeps the
commit and device that measured it and says where it came from (`imported_from`); it carries the
cell's fingerprint, so `synthaug bench <suite> --out benchmarks/results/bench/<suite>` treats it
as finished and runs only the cells that have no row. baselines.jsonl is not imported: the
SYNAuG benchmark ran the same baselines in the same settings (its rows are the ones shown).
"""

from __future__ import annotations

import json
from pathlib import Path

from synthaug.bench import load_suite, write_leaderboard
from synthaug.bench.suite import settings_of

HERE = Path(__file__).resolve().parent
OLD = HERE / "results"
OUT = HERE / "results" / "bench"
# old file -> {old setting name: (suite, setting)}
SOURCES = {
    "synaug": {"MNIST-5k-LT r50": ("longtail-small", "MNIST-5k-LT r50"),
               "Fashion-MNIST-LT r100": ("longtail-small", "Fashion-MNIST-LT r100")},
    "tada": {"Fashion-MNIST 10%": ("targeted-small", "Fashion-MNIST 10%")},
    "augcond": {"Fashion-MNIST 5-shot": ("fewshot-small", "Fashion-MNIST 5-shot"),
                "Fashion-MNIST 10-shot": ("fewshot-small", "Fashion-MNIST 10-shot"),
                "CIFAR-10 5-shot": ("cifar10-gpu", "CIFAR-10 5-shot"),
                "CIFAR-10 10-shot": ("cifar10-gpu", "CIFAR-10 10-shot")},
    "utilgen": {"Fashion-MNIST 10-shot": ("fewshot-small", "Fashion-MNIST 10+3-shot (UtilGen)"),
                "CIFAR-10 10-shot": ("cifar10-gpu", "CIFAR-10 10+3-shot (UtilGen)")},
}
METRICS = ("accuracy", "balanced_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
           "worst_class_accuracy", "synthetic_only_accuracy")


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main():
    suites = {name: load_suite(name) for name in {s for m in SOURCES.values() for s, _ in m.values()}}
    rows: dict[str, dict[str, dict]] = {name: {} for name in suites}
    for source, settings in SOURCES.items():
        old = read(OLD / f"{source}.jsonl")
        generators = {(r["setting"], r.get("generator_seed", 0)): r for r in old if r.get("kind") == "generator"}
        first_generative: set = set()
        for r in old:
            if r.get("kind", "run") != "run" or r["setting"] not in settings:
                continue
            suite_name, setting = settings[r["setting"]]
            suite = suites[suite_name]
            cells = [c for c in suite.cells_ if c.setting == setting and c.recipe == r["method"] and c.seed == r["seed"]
                     and c.generator_seed in (None, r.get("generator_seed", 0))]
            if len(cells) != 1:
                raise SystemExit(f"{source}: no single cell for {r['setting']} / {r['method']} / seed {r['seed']}")
            cell = cells[0]
            seconds = dict(r.get("seconds") or {"train": r.get("train_seconds", 0.0)})
            images = r.get("synthetic_images", r.get("generated_images", 0)) or 0
            if cell.generates and source == "utilgen":
                images = r.get("train_images", 0) * 5  # the final synthetic set: 5x the real images
            row = {
                "suite": suite.name, "setting": setting, "recipe": cell.recipe, "recipe_name": cell.config.recipe,
                "generator_seed": cell.generator_seed, "seed": cell.seed, "cell": cell.key,
                "fingerprint": cell.fingerprint, "metric": next(s.metric for s in suite.settings if s.name == setting),
                "metrics": {k: r[k] for k in METRICS if r.get(k) is not None}, "per_class": {},
                "seconds": seconds, "wall_seconds": r.get("wall_seconds"), "images_generated": images,
                "generated_now": r.get("generated_now", 0) or 0, "memorization": r.get("memorization"),
                "generator": None, "generator_train_seconds": None, "train_steps": cell.config.train.steps,
                "device": r.get("device", "CPU"), "machine": r.get("machine"), "threads": r.get("threads"),
                "torch": r.get("torch"), "commit": r.get("commit") or None, "version": "0.1.0",
                "imported_from": f"benchmarks/results/{source}.jsonl",
                "settings": json.loads(json.dumps(settings_of(cell.config), default=str)),
            }
            if cell.generates:
                row["generator"] = f"{source}:{r['setting']}:g{cell.generator_seed}"
                gen = generators.get((r["setting"], cell.generator_seed or 0))
                if source == "utilgen" and r.get("generator_seconds"):
                    gen = {"train_seconds": r["generator_seconds"]}
                if gen and row["generator"] not in first_generative:  # its training, counted once
                    first_generative.add(row["generator"])
                    row["generator_train_seconds"] = gen.get("train_seconds")
                    if gen.get("generate_seconds") and gen.get("generated_now"):  # SYNAuG's store, filled up front
                        row["seconds"]["generate"] = gen["generate_seconds"]
                        row["generated_now"] = gen["generated_now"]
            rows[suite_name][cell.key] = row  # the newest row of a cell wins, as in the scripts' tables
    for name, found in rows.items():
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        (out / ".synthaug-run").write_text("a benchmark folder made by synthaug\n")
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in found.values()))
        write_leaderboard(suites[name], list(found.values()), out)
        print(f"{name}: {len(found)} of {len(suites[name].cells_)} cells imported -> {out}")


if __name__ == "__main__":
    main()
