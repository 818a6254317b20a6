"""Classical long-tail baselines side by side, in one run, over several seeds.

    python benchmarks/baselines.py            # 3 seeds, both settings (~30 min on 2 CPU cores)
    python benchmarks/baselines.py --quick    # 1 seed, 1 epoch: checks the script end to end

Settings: Fashion-MNIST-LT (ratio 100) and MNIST-5k-LT (ratio 50), exponential profile,
split seed 0; balanced test sets. Every method trains the same small CNN with the same
schedule; the oracle trains on the full balanced training set for the same epochs.
Rows go to benchmarks/results/baselines.jsonl as they finish (a re-run skips finished
rows); the summary table goes to benchmarks/results/baselines.md and into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import HERE, append_row, environment, fmt, read_rows, splice

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.recipes import get_recipe
from synthaug.task import make_task

SETTINGS = {
    "Fashion-MNIST-LT r100": ["data.dataset=fashion-mnist", "split.ratio=100", "train.epochs=10"],
    "MNIST-5k-LT r50": ["data.dataset=mnist-5k", "split.ratio=50", "train.epochs=30"],
}
METHODS = ["ce", "class-balanced", "balanced-softmax", "posthoc-la", "crt", "oracle"]
COLUMNS = ["balanced_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy", "worst_class_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, separate results file")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "baselines.jsonl")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.results = [0], args.results.with_name("baselines-quick.jsonl")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["method"], r["seed"]) for r in read_rows(args.results)}
    env = environment()

    for setting, overrides in SETTINGS.items():
        if args.quick:
            overrides = [*overrides, "train.epochs=1"]
        data = None
        for seed in args.seeds:
            trained = {}  # ce, posthoc-la and crt share one trained model per seed
            for method in METHODS:
                if (setting, method, seed) in done:
                    continue
                config = load_config(None, [*overrides, f"recipe={method}", f"seed={seed}"])
                if data is None:
                    data = load_dataset(config.data.dataset)
                    task = make_task(data, config.split)
                t0 = time.perf_counter()
                result = get_recipe(method).run(task, config, trained=trained)
                row = {
                    "setting": setting, "method": method, "seed": seed,
                    **{k: result.metrics.get(k) for k in ["accuracy", *COLUMNS]},
                    "train_seconds": sum(v for k, v in result.seconds.items() if k != "evaluate"),
                    "wall_seconds": time.perf_counter() - t0,
                    "train_images": len(task.oracle if method == "oracle" else task.train),
                    "epochs": config.train.epochs, "model": config.train.model,
                    "shot_thresholds": result.metrics.get("shot_thresholds"),
                    **env,
                }
                append_row(args.results, row)
                print(f"{setting:22s} {method:17s} seed {seed}  balanced acc {100 * row['balanced_accuracy']:.2f}"
                      f"  ({row['train_seconds']:.0f} s)", flush=True)
    table = summarise(read_rows(args.results))
    (args.results.with_suffix(".md")).write_text(table)
    if not args.quick:
        splice(HERE.parent / "BENCHMARKS.md", "baselines", table)
    print(table)


def summarise(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        srows = [r for r in rows if r["setting"] == setting]
        seeds = sorted({r["seed"] for r in srows})
        t = srows[0].get("shot_thresholds") or {}
        lines += [
            f"**{setting}** ({srows[0]['model']}, {srows[0]['epochs']} epochs, seeds {seeds}; many-shot > "
            f"{t.get('many_above', 0):g} images, few-shot < {t.get('few_below', 0):g})",
            "",
            "| method | balanced acc | many | medium | few | worst class | train s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for method in dict.fromkeys(r["method"] for r in srows):
            m = [r for r in srows if r["method"] == method]
            cells = [fmt([r[c] for r in m]) for c in COLUMNS]
            secs = [r["train_seconds"] for r in m]
            sec = f"{statistics.fmean(secs):.0f} ± {statistics.stdev(secs) if len(secs) > 1 else 0:.0f}"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {sec} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
