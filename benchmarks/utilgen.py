"""UtilGen's ablation (METHODS.md section 4) in the few-shot protocol, against SYNAuG and the
classical baselines, side by side in one run.

    python benchmarks/utilgen.py                       # Fashion-MNIST 10-shot, 3 seeds
    python benchmarks/utilgen.py --settings "CIFAR-10 10-shot"
    python benchmarks/utilgen.py --quick               # digits, tiny generator: checks the script

k = 13 labelled images per class, 3 of them held out as the clean validation split the
weight network is meta-learned on (10 train), the rest of the training set as an
unlabelled pool the generator also trains on (never the test set). UtilGen variants: the
base generator (no rounds), + model level (Diffusion-DPO), + embedding optimisation,
+ noise optimisation, all; each reported trained on the final synthetic set alone and on
synthetic + real, with the final set's memorisation ratio (about 1: new images) and
diversity ratio (its within-class pixel spread over the real images'). Controls: UtilGen's
base generator with SYNAuG's SDE sampler (UtilGen samples with DDIM, which noise inversion
needs), and ce trained on the 3 validation images as well (UtilGen uses them to value).
"all, SYNAuG's sampler" runs every step on the SDE sampler, where the noise step re-noises
the high-utility images instead of inverting them.
SYNAuG generates the same number of images per class. Each seed draws its own images from
the one trained generator (`generator.sample_seed`). Every classifier trains for about the
same number of steps. Rows go to benchmarks/results/utilgen.jsonl (a
re-run skips finished rows); the table goes to benchmarks/results/utilgen.md and BENCHMARKS.md.
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
    short_device,
    with_randaugment,
)

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.recipes import get_recipe
from synthaug.task import make_task

STEPS, BATCH, MULTIPLE = 1500, 64, 5.0
FEW = ["split.kind=few-shot", "split.k=13", "split.val_per_class=3", "generator.guidance_scale=3.0",
       f"utilgen.final_multiple={MULTIPLE}", "utilgen.per_round=4.0", "utilgen.valuation_epochs=30"]
SETTINGS = {
    "Fashion-MNIST 10-shot": ["data.dataset=fashion-mnist", *FEW, "train.augment=crop"],
    "CIFAR-10 10-shot": ["data.dataset=cifar10", *FEW, "train.augment=crop+flip"],
}
QUICK = {"digits 10-shot": ["data.dataset=digits", *FEW, "train.augment=crop", "generator.preset=tiny",
                            "generator.steps=20", "utilgen.sampling_steps=4", "utilgen.valuation_epochs=2",
                            "utilgen.embedding_steps=5", "utilgen.dpo_steps=5"]}
OFF = ["utilgen.embedding=false", "utilgen.noise=false", "utilgen.model_level=false"]
METHODS = {
    "ce": ["recipe=ce"],
    # UtilGen also sees the 3 validation images per class (it values on them): the same labelled budget, trained on
    "ce, validation images trained on": ["recipe=ce", "split.val_per_class=0"],
    "RandAugment + Mixup": ["recipe=ce", "+randaugment", "train.mix=mixup"],
    "SYNAuG": ["recipe=synaug"],
    "UtilGen: base generator": ["recipe=utilgen", "utilgen.rounds=0", *OFF],
    # UtilGen samples with deterministic DDIM (noise inversion needs it), SYNAuG with its SDE solver
    "UtilGen: base generator, SYNAuG's sampler": ["recipe=utilgen", "utilgen.rounds=0", *OFF,
                                                  "utilgen.sampler=sde-dpm-solver++", "utilgen.sampling_steps=15"],
    "UtilGen: + model level": ["recipe=utilgen", *OFF, "utilgen.model_level=true"],
    "UtilGen: + embedding": ["recipe=utilgen", *OFF, "utilgen.embedding=true"],
    "UtilGen: + noise": ["recipe=utilgen", *OFF, "utilgen.noise=true"],
    "UtilGen: all": ["recipe=utilgen"],
    # all of it on the SDE sampler: the noise step then re-noises the high-utility images (SDEdit at 0.8)
    "UtilGen: all, SYNAuG's sampler": ["recipe=utilgen", "utilgen.sampler=sde-dpm-solver++", "utilgen.sampling_steps=15"],
}


def overrides_for(method: str, setting: list[str], k_train: int, seed: int) -> list[str]:
    out = [*with_randaugment(METHODS[method], setting), f"seed={seed}"]
    if "recipe=ce" not in out:  # each seed draws its own images from the one trained generator
        out.append(f"generator.sample_seed={seed}")
    if "recipe=synaug" in out:  # the same number of generated images per class as UtilGen's final set
        out.append(f"synaug.target_per_class={round(k_train * (1 + MULTIPLE))}")
    return out


def policy_change(summary: dict) -> dict:
    """How far a round moved the generator: the share of DPO pairs ranked the right way at the
    last step, and the mean relative shift of the optimised class embeddings."""
    shift = summary.get("embedding", {}).get("relative_shift")
    return {"dpo_ranked_right": summary["dpo"][-1]["ranked_right"] if summary.get("dpo") else None,
            "embedding_shift": statistics.fmean(shift) if shift else None}


def main():
    args, settings, results = parse_args(__doc__, "utilgen", SETTINGS, QUICK, METHODS, ["Fashion-MNIST 10-shot"])
    steps = 30 if args.quick else STEPS
    cache = HERE / "results" / "cache"
    done = {(r["setting"], r.get("method"), r.get("seed")) for r in read_rows(results)}
    env = environment()
    for setting in args.settings:
        base = [*settings[setting], *args.extra, f"generator.cache_dir={cache / 'generators'}",
                f"output_dir={cache / 'runs'}", f"train.batch_size={BATCH}"]
        dataset = load_dataset(load_config(None, base).data.dataset)
        setting_task = make_task(dataset, load_config(None, base).split)
        k_train = len(setting_task.train) // setting_task.train.num_classes
        for seed in args.seeds:
            for method in args.methods:
                if (setting, method, seed) in done:
                    continue
                split = [o for o in METHODS[method] if o.startswith("split.")]  # a method with its own split
                task = make_task(dataset, load_config(None, [*base, *split]).split) if split else setting_task
                images = len(task.train) * (1 + (MULTIPLE if "recipe=ce" not in METHODS[method] else 0))
                epochs = max(1, math.ceil(steps / math.ceil(images / BATCH)))
                config = load_config(None, [*base, *overrides_for(method, settings[setting], k_train, seed),
                                            f"train.epochs={epochs}"])
                workdir = cache / "runs" / f"utilgen-{setting}{args.tag}".replace(" ", "_") / method.replace(" ", "") / str(seed)
                t0 = time.perf_counter()
                result = get_recipe(config.recipe).run(task, config, workdir=workdir)
                u = result.extra.get("utilgen", {})
                memo = result.extra.get("memorization") or {}
                append_row(results, {
                    "setting": setting, "method": method, "seed": seed, "accuracy": result.metrics["accuracy"],
                    "synthetic_only_accuracy": u.get("synthetic_only", {}).get("accuracy"),
                    "mean_utility": [(r["mean_utility_real"], r["mean_utility_synthetic"]) for r in u.get("rounds", [])],
                    "memorization": memo.get("median"),
                    "diversity_ratio": result.extra.get("diversity_ratio"),
                    "policy": [policy_change(r) for r in u.get("rounds", [])],
                    "seconds": result.seconds, "wall_seconds": time.perf_counter() - t0, "train_images": len(task.train),
                    "generator_seconds": result.extra.get("generator", {}).get("train_seconds"), **env,
                })
                print(f"{setting:22s} {method:26s} seed {seed}  accuracy {100 * result.metrics['accuracy']:.2f}", flush=True)
    publish(results, "utilgen", summarise(read_rows(results)), to_benchmarks=not args.quick and not args.tag)


def summarise(rows: list[dict]) -> str:
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == setting]
        gen = [(r["generator_seconds"], r.get("device", "CPU")) for r in runs if r.get("generator_seconds")]
        out += [f"**{setting}** ({min(r['train_images'] for r in runs)} training images, {len({r['seed'] for r in runs})} seed(s), on {ran_on(runs)}"
                + (f"; base generator trained in {gen[0][0] / 60:.1f} min on {gen[0][1]}" if gen else "") + ")", "",
                "| method | synthetic + real (%) | synthetic only (%) | memorisation / diversity ratio "
                "| compute without the base generator (min) |",
                "|---|---|---|---|---|"]
        moves = []
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            minutes = minutes_per_device(mine, lambda r: sum(v for k, v in r["seconds"].items()
                                                             if k not in ("generator", "load_data")),
                                         always_name=len({short_device(r) for r in runs}) > 1)
            alone = [r["synthetic_only_accuracy"] for r in mine if r["synthetic_only_accuracy"] is not None]
            ratios = " / ".join(f"{statistics.fmean(v):.2f}" if v else "-" for v in (
                [r["memorization"] for r in mine if r.get("memorization") is not None],
                [r["diversity_ratio"] for r in mine if r.get("diversity_ratio") is not None]))
            out.append(f"| {method} | {fmt([r['accuracy'] for r in mine])} | {fmt(alone) if alone else '-'} "
                       f"| {ratios} | {minutes} |")
            for i in range(len(mine[0].get("policy", []))):
                parts = []
                for key in ("dpo_ranked_right", "embedding_shift"):
                    values = [r["policy"][i][key] for r in mine if r["policy"][i][key] is not None]
                    if values:
                        parts.append(f"{key} {statistics.fmean(values):.3f}")
                if parts:
                    moves.append(f"{method} round {i + 1}: " + ", ".join(parts))
        out.append("")
        if moves:
            out += ["How far the rounds moved the generator (mean over seeds; DPO: share of pairs ranked the right "
                    "way at the last step; embedding: mean relative shift of the class vectors):", "",
                    *[f"- {m}" for m in moves], ""]
    return "\n".join(out)


if __name__ == "__main__":
    main()
