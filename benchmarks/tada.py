"""TADA against its baselines on a balanced low-data split, side by side in one run.

    python benchmarks/tada.py                  # Fashion-MNIST 10% (600 per class), 3 seeds (~1.5 h on 2 CPU cores)
    python benchmarks/tada.py --quick          # digits, tiny generator, 1 seed: checks the script

Methods (METHODS.md section 2): no augmentation by generation (the usual augmentation only),
TADA (image-guided variants of the slow-learnable examples), augment-all (variants of every
example), upsample-subset (the slow-learnable examples duplicated), random subset (variants
of as many examples as TADA targets, drawn at random: does the targeting matter, or only the
number of images?), with SGD and with SAM.
One generator is trained on the split and cached; every variant of every example is a row
of one shared store, so TADA's rows for any seed are a subset of augment-all's and each
image is generated once. The generation cost of each method is reported as the number of
images it needs times the measured seconds per image. Rows go to benchmarks/results/tada.jsonl
(a re-run skips finished rows); the table goes to benchmarks/results/tada.md and BENCHMARKS.md.
"""

from __future__ import annotations

import statistics
import time

from common import (
    HERE,
    append_row,
    environment,
    fmt,
    parse_args,
    publish,
    read_rows,
    seconds_per_image,
)

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.generate.stage import generator_stage
from synthaug.recipes import get_recipe
from synthaug.task import make_task

SETTINGS = {
    # 10% of Fashion-MNIST's training set, balanced; the paper's CIFAR setting used 5 variants per example
    "Fashion-MNIST 10%": ["data.dataset=fashion-mnist", "split.kind=few-shot", "split.k=600", "split.unlabeled_pool=false",
                          "train.epochs=15", "generator.sampling_steps=10", "tada.variants=5", "tada.strength=0.5"],
}
QUICK = {"digits 30%": ["data.dataset=digits", "split.kind=few-shot", "split.k=40", "split.unlabeled_pool=false",
                        "train.epochs=3", "tada.variants=2", "generator.preset=tiny", "generator.steps=20",
                        "generator.sampling_steps=4"]}
SAM = ["train.sam_rho=0.05"]
METHODS = {
    "none": ["recipe=ce"],
    "tada": ["recipe=tada"],
    "augment-all": ["recipe=tada-all"],
    "upsample-subset": ["recipe=tada-upsample"],
    "random subset": ["recipe=tada-random"],  # control: as many examples as TADA targets, at random
    "none + SAM": ["recipe=ce", *SAM],
    "tada + SAM": ["recipe=tada", *SAM],
}
GENERATES = ("tada", "augment-all", "tada + SAM")


def main():
    args, settings, results = parse_args(__doc__, "tada", SETTINGS, QUICK, METHODS, list(SETTINGS))
    cache = HERE / "results" / "cache"
    done = {(r["setting"], r["kind"], r.get("method"), r.get("seed")) for r in read_rows(results)}
    env = environment()

    for setting in args.settings:
        base = [*settings[setting], *args.extra, f"generator.cache_dir={cache / 'generators'}", f"output_dir={cache / 'runs'}"]
        config = load_config(None, base)
        task = make_task(load_dataset(config.data.dataset), config.split)
        generator, info = generator_stage(task.train, config, progress=True)
        if (setting, "generator", None, None) not in done:
            append_row(results, {"setting": setting, "kind": "generator", "fingerprint": info["fingerprint"],
                                 "source": info["source"], "train_seconds": info["train_seconds"],
                                 "steps": config.generator.steps, "images": len(task.train), **env})
        store = cache / "stores" / f"tada-{setting}-{info['fingerprint']}-{config.generator.sampling_steps}".replace(" ", "_")
        for seed in args.seeds:
            for method in args.methods:
                if (setting, "run", method, seed) in done:
                    continue
                config = load_config(None, [*base, *METHODS[method], f"seed={seed}", f"tada.store_dir={store}"])
                workdir = cache / "runs" / f"tada-{setting}{args.tag}".replace(" ", "_") / method.replace(" ", "") / str(seed)
                t0 = time.perf_counter()
                result = get_recipe(config.recipe).run(task, config, workdir=workdir)
                targeted, synthetic = result.extra.get("targeted", {}), result.extra.get("synthetic", {})
                append_row(results, {
                    "setting": setting, "kind": "run", "method": method, "seed": seed,
                    "accuracy": result.metrics["accuracy"], "balanced_accuracy": result.metrics["balanced_accuracy"],
                    "slow_learnable_share": targeted.get("slow_learnable_share"), "targeted": targeted.get("targeted"),
                    "generated_images": synthetic.get("images", 0), "generated_now": synthetic.get("generated_now", 0),
                    "generate_seconds": result.seconds.get("generate", 0.0), "train_seconds": result.seconds["train"],
                    "early_seconds": result.seconds.get("early_training", 0.0), "seconds": result.seconds,
                    "wall_seconds": time.perf_counter() - t0, "train_images": len(task.train), **env,
                })
                print(f"{setting:20s} {method:16s} seed {seed}  accuracy {100 * result.metrics['accuracy']:.2f}  "
                      f"generated {synthetic.get('images', 0)}", flush=True)
    publish(results, "tada", summarise(read_rows(results)), to_benchmarks=not args.quick and not args.tag)


def summarise(rows: list[dict]) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == setting and r["kind"] == "run"]
        gens = [r for r in rows if r["setting"] == setting and r["kind"] == "generator"]
        per_image = seconds_per_image(runs)
        seeds = sorted({r["seed"] for r in runs})
        out.append(f"**{setting}** ({runs[0]['train_images'] if runs else '?'} training images), small-cnn, "
                   f"{len(seeds)} seed(s); generator trained in {gens[0]['train_seconds'] / 60:.1f} min" if gens else "")
        out.append("")
        out.append("| method | test accuracy (%) | slow-learnable share | generated images | generation cost (min) "
                   "| classifier training (min) |")
        out.append("|---|---|---|---|---|---|")
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            share = [r["slow_learnable_share"] for r in mine if r["slow_learnable_share"] is not None]
            images = statistics.fmean(r["generated_images"] for r in mine)
            cost = f"{images * per_image / 60:.1f}" if per_image and images else "0"
            out.append(f"| {method} | {fmt([r['accuracy'] for r in mine])} | "
                       f"{fmt(share, digits=1) + ' %' if share else '-'} | {images:.0f} | {cost} | "
                       f"{statistics.fmean(r['train_seconds'] + r['early_seconds'] for r in mine) / 60:.1f} |")
        out.append("")
        if per_image:
            out.append(f"Generation: {1 / per_image:.1f} images/s (SDEdit, measured over the images generated in this run).")
            out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
