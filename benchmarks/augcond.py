"""AugCond in the few-shot protocol: each conditioning mode against label-only generation,
no synthetic data and the strongest classical augmentation (RandAugment + Mixup), and
generation with that augmentation on top, side by side in one run.

    python benchmarks/augcond.py                                   # Fashion-MNIST 5- and 10-shot, 3 seeds
    python benchmarks/augcond.py --settings "CIFAR-10 5-shot" "CIFAR-10 10-shot"
    python benchmarks/augcond.py --quick                           # digits, tiny generator: checks the script

Protocol (METHODS.md section 3, issue 4): k labelled images per class, the rest of the
training set as an unlabelled pool (never the test set). One image-conditioned generator
per split trains on the labelled images and on the pool (under the null class, half of
each batch), and is cached. Every generative method fills each class to TARGET images;
every mode's rows live in one shared store. All methods train the same classifier for
the same number of optimisation steps (few labelled images would otherwise get almost no
training). Rows go to benchmarks/results/augcond.jsonl (a re-run skips finished rows);
the tables go to benchmarks/results/augcond.md and BENCHMARKS.md.
"""

from __future__ import annotations

import math
import statistics
import time

from common import (
    HERE,
    append_row,
    environment,
    fmt,
    minutes_per_device,
    parse_args,
    publish,
    ran_on,
    read_rows,
    seconds_per_image,
    short_device,
    with_randaugment,
)

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.generate.image_condition import OPERATORS
from synthaug.generate.stage import generator_stage
from synthaug.recipes import get_recipe
from synthaug.task import make_task
from synthaug.verdict import compare

TARGET = 100  # images per class after filling
STEPS = 1500  # classifier optimisation steps, every method
BATCH = 64
FASHION = ["data.dataset=fashion-mnist", "split.kind=few-shot", "generator.sampling_steps=10", "generator.steps=1600",
           "generator.guidance_scale=5.0", "train.augment=crop"]
CIFAR = ["data.dataset=cifar10", "split.kind=few-shot", "generator.sampling_steps=10", "generator.guidance_scale=5.0",
         "train.augment=crop+flip"]
SETTINGS = {
    "Fashion-MNIST 5-shot": [*FASHION, "split.k=5"],
    "Fashion-MNIST 10-shot": [*FASHION, "split.k=10"],
    "CIFAR-10 5-shot": [*CIFAR, "split.k=5"],
    "CIFAR-10 10-shot": [*CIFAR, "split.k=10"],
}
QUICK = {"digits 5-shot": ["data.dataset=digits", "split.kind=few-shot", "split.k=5", "generator.preset=tiny",
                           "generator.steps=20", "generator.sampling_steps=4", "train.augment=crop"]}
MODES = [m for m in OPERATORS if m != "label-only"]
METHODS = {
    "no synthetic data": ["recipe=ce"],
    "RandAugment + Mixup": ["recipe=ce", "+randaugment", "train.mix=mixup"],
    "label-only generation": ["recipe=augcond", "augcond.mode=label-only"],
    **{f"AugCond {m}": ["recipe=augcond", f"augcond.mode={m}"] for m in MODES},
    # do generated images add to the strongest classical augmentation? (the default mode, fixed in advance)
    "label-only generation + RandAugment + Mixup": ["recipe=augcond", "augcond.mode=label-only", "+randaugment",
                                                    "train.mix=mixup"],
    "AugCond embed-cutmix-dropout + RandAugment + Mixup": ["recipe=augcond", "augcond.mode=embed-cutmix-dropout",
                                                           "+randaugment", "train.mix=mixup"],
}


# methods with no generated images: the bar a generative method must clear
CLASSICAL = ["no synthetic data", "RandAugment + Mixup"]


def overrides_for(method: str, setting_overrides: list[str]) -> list[str]:
    """The method's overrides; '+randaugment' appends RandAugment to the setting's augmentation."""
    return with_randaugment(METHODS[method], setting_overrides)


def main():
    args, settings, results = parse_args(__doc__, "augcond", SETTINGS, QUICK, METHODS, ["Fashion-MNIST 5-shot", "Fashion-MNIST 10-shot"])
    steps = 30 if args.quick else STEPS
    cache = HERE / "results" / "cache"
    done = {(r["setting"], r["kind"], r.get("method"), r.get("seed")) for r in read_rows(results)}
    env = environment()

    for setting in args.settings:
        base = [*settings[setting], *args.extra, f"generator.cache_dir={cache / 'generators'}",
                f"output_dir={cache / 'runs'}", f"augcond.target_per_class={TARGET}", f"train.batch_size={BATCH}"]
        config = load_config(None, base)
        task = make_task(load_dataset(config.data.dataset), config.split)
        generator, info = generator_stage(task.train, config, progress=True, unlabeled=task.unlabeled,
                                          image_embed_dim=config.augcond.embed_dim)
        if (setting, "generator", None, None) not in done:
            append_row(results, {"setting": setting, "kind": "generator", "fingerprint": info["fingerprint"],
                                 "source": info["source"], "train_seconds": info["train_seconds"],
                                 "steps": config.generator.steps, "labelled": len(task.train),
                                 "unlabeled": len(task.unlabeled), **env})
        store = cache / "stores" / f"augcond-{setting}-{info['fingerprint']}".replace(" ", "_")
        for seed in args.seeds:
            for method in args.methods:
                if (setting, "run", method, seed) in done:
                    continue
                generative = "recipe=augcond" in METHODS[method]
                images = TARGET * task.train.num_classes if generative else len(task.train)
                epochs = max(1, math.ceil(steps / math.ceil(images / BATCH)))  # the same steps for every method
                config = load_config(None, [*base, *overrides_for(method, settings[setting]), f"seed={seed}",
                                            f"train.epochs={epochs}", f"augcond.store_dir={store}"])
                workdir = cache / "runs" / f"augcond-{setting}{args.tag}".replace(" ", "_") / method.replace(" ", "") / str(seed)
                t0 = time.perf_counter()
                result = get_recipe(config.recipe).run(task, config, workdir=workdir)
                synthetic = result.extra.get("synthetic", {})
                append_row(results, {
                    "setting": setting, "kind": "run", "method": method, "seed": seed,
                    "accuracy": result.metrics["accuracy"], "balanced_accuracy": result.metrics["balanced_accuracy"],
                    "generated_images": synthetic.get("images", 0), "generated_now": synthetic.get("generated_now", 0),
                    "generate_seconds": result.seconds.get("generate", 0.0), "train_seconds": result.seconds["train"],
                    "epochs": epochs, "seconds": result.seconds, "wall_seconds": time.perf_counter() - t0, **env,
                })
                print(f"{setting:22s} {method:30s} seed {seed}  accuracy {100 * result.metrics['accuracy']:.2f}", flush=True)
    publish(results, "augcond", summarise(read_rows(results)), to_benchmarks=not args.quick and not args.tag)


def summarise(rows: list[dict]) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == setting and r["kind"] == "run"]
        gen = next((r for r in rows if r["setting"] == setting and r["kind"] == "generator"), None)
        devices = sorted({short_device(r) for r in runs})
        per_image = {d: seconds_per_image([r for r in runs if short_device(r) == d]) for d in devices}
        seeds = sorted({r["seed"] for r in runs})
        head = f"**{setting}**, {len(seeds)} seed(s), on {ran_on(runs)}"
        if gen:
            head += (f"; generator trained on {gen['labelled']} labelled + {gen['unlabeled']} unlabelled images "
                     f"in {gen['train_seconds'] / 60:.1f} min on {short_device(gen)}")
        rates = [f"{1 / v:.1f} images/s on {d}" for d, v in per_image.items() if v]
        if rates:
            head += "; generation " + ", ".join(rates)
        scores = {m: {r["seed"]: r["accuracy"] for r in runs if r["method"] == m} for m in METHODS}
        best = None
        out += [head, "", "| method | test accuracy (%) | vs the best classical baseline, paired (points, 95% interval) "
                "| generated images | generation (s) | classifier (min) |", "|---|---|---|---|---|---|"]
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            images = statistics.fmean(r["generated_images"] for r in mine)
            costs = [f"{images * per_image[d]:.1f}" + (f" on {d}" if len(devices) > 1 else "")
                     for d in sorted({short_device(r) for r in mine}) if per_image[d]]
            cost = ", ".join(costs) if images and costs else "0"
            minutes = minutes_per_device(mine, lambda r: r["train_seconds"], always_name=len(devices) > 1)
            found = compare(scores, method, classical=CLASSICAL) if method not in CLASSICAL else None
            best = best or (found and found.baseline)
            paired = (f"{100 * found.difference:+.2f} ({100 * found.low:+.2f} to {100 * found.high:+.2f}): "
                      f"{found.verdict}" if found and len(found.seeds) > 1 else "-")
            out.append(f"| {method} | {fmt([r['accuracy'] for r in mine])} | {paired} | {images:.0f} | {cost} | {minutes} |")
        if best:
            out.append(f"\nThe best classical baseline here: {best} (highest mean); differences are paired by seed.")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
