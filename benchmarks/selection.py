"""Data selection and validation (issue 6): the accuracy gain of each selection method at
equal final synthetic-set size against no selection, and how well each validation metric
predicts the downstream gain (rank correlation), in one long-tailed and one few-shot setting.

    python benchmarks/selection.py                   # MNIST-5k-LT r50 (SYNAuG) and Fashion-MNIST 5-shot (AugCond), 3 seeds
    python benchmarks/selection.py --quick           # digits, tiny generator: checks the script

Protocol. Each setting reuses its recipe benchmark's generator and store (the SYNAuG and AugCond
suites), so "no selection" is the plan those benchmarks trained on; every
selection method generates 2x the plan per class (the extra candidates are generated once
and shared) and keeps the plan's count. The scorer is a classifier trained on the real
split with balanced softmax (one per seed). Validation metrics are measured for every
synthetic set (seed 0) in one fixed feature space: a classifier trained on the full real
training set (the oracle's data), so that sets are compared with one ruler. The rank
correlation is taken over every synthetic set of the setting: the selection variants and,
in the few-shot setting, also each AugCond conditioning mode of benchmarks/augcond.py
(their accuracies from benchmarks/results/augcond.jsonl). Rows go to
benchmarks/results/selection.jsonl (a re-run skips finished rows); the tables go to
benchmarks/results/selection.md and BENCHMARKS.md.
"""

from __future__ import annotations

import math
import statistics
import time

from common import HERE, append_row, environment, fmt, parse_args, publish, read_rows

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.generate.cache import generator_for
from synthaug.generate.image_condition import OPERATORS
from synthaug.plan import conditioned_plan
from synthaug.recipes import get_recipe
from synthaug.select.stage import validation_stage
from synthaug.store import SyntheticStore
from synthaug.task import make_task

# the settings of the SYNAuG and AugCond tables (configs/bench/longtail-small.yaml, fewshot-small.yaml),
# whose generators and stores this benchmark reuses
FEW_SHOT_TARGET, FEW_SHOT_STEPS, FEW_SHOT_BATCH = 100, 1500, 64
FASHION = ["data.dataset=fashion-mnist", "split.kind=few-shot", "generator.sampling_steps=10", "generator.steps=1600",
           "generator.guidance_scale=5.0", "train.augment=crop"]
SETTINGS = {
    "MNIST-5k-LT r50": ["recipe=synaug", "data.dataset=mnist-5k", "split.ratio=50", "train.epochs=30",
                        "generator.lr=0.0002"],
    "Fashion-MNIST 5-shot": ["recipe=augcond", *FASHION, "split.k=5", f"augcond.target_per_class={FEW_SHOT_TARGET}",
                             f"train.batch_size={FEW_SHOT_BATCH}", "select.scorer_epochs=300"],
}
QUICK = {
    "digits LT r10": ["recipe=synaug", "data.dataset=digits", "split.ratio=10", "train.epochs=2", "generator.preset=tiny",
                      "generator.steps=20", "generator.sampling_steps=4"],
    "digits 5-shot": ["recipe=augcond", "data.dataset=digits", "split.kind=few-shot", "split.k=5", "generator.preset=tiny",
                      "generator.steps=20", "generator.sampling_steps=4", "train.augment=crop",
                      f"augcond.target_per_class={FEW_SHOT_TARGET}", f"train.batch_size={FEW_SHOT_BATCH}",
                      "select.scorer_epochs=30"],
}
OVERGENERATE = 2.0
METHODS = {
    "no selection": ["select.method=none"],
    "random": ["select.method=random"],
    "confidence top-k": ["select.method=confidence"],
    "agreement filter": ["select.method=agreement", "select.threshold=0.5"],
    "realism": ["select.method=realism"],
    "cluster": ["select.method=cluster"],
}
# validation metrics, with the direction a better synthetic set should move them
METRICS = {"frechet_distance": "lower", "kid": "lower", "precision": "higher", "recall": "higher", "density": "higher",
           "coverage": "higher", "diversity_ratio": "higher", "domain_gap": "lower", "cas": "higher"}


def flat_validation(v: dict) -> dict | None:
    if v.get("skipped"):
        return None
    return {"frechet_distance": v["frechet_distance"], "kid": v["kernel_distance"]["mean"], "precision": v["precision"],
            "recall": v["recall"], "density": v["density"], "coverage": v["coverage"],
            "diversity_ratio": v["diversity_ratio"]["mean"], "domain_gap": v["domain_gap"],
            "cas": (v.get("cas") or {}).get("balanced_accuracy"), "images": v["synthetic_images"]}


def main():
    args, settings, results = parse_args(__doc__, "selection", SETTINGS, QUICK, METHODS, list(SETTINGS))
    cache = HERE / "results" / "cache"
    done = {(r["setting"], r.get("generator"), r["kind"], r.get("method"), r.get("seed")) for r in read_rows(results)}
    env = environment()

    for setting in args.settings:
        overrides = settings[setting]
        few_shot = "split.kind=few-shot" in overrides
        base = [*overrides, *args.extra, f"generator.cache_dir={cache / 'generators'}", f"output_dir={cache / 'runs'}",
                f"select.overgenerate={OVERGENERATE}"]
        config = load_config(None, base)
        task = make_task(load_dataset(config.data.dataset), config.split)
        embed_dim = config.augcond.embed_dim if few_shot else 0
        generator, _ = generator_for(task.train, config.generator, cache_root=cache / "generators", progress=True,
                                     unlabeled=task.unlabeled if few_shot else None, image_embed_dim=embed_dim)
        if few_shot:  # the augcond benchmark's store and fixed number of optimisation steps
            store = cache / "stores" / f"augcond-{setting}-{generator.fingerprint()}".replace(" ", "_")
            images = FEW_SHOT_TARGET * task.train.num_classes
            epochs = max(1, math.ceil((30 if args.quick else FEW_SHOT_STEPS) / math.ceil(images / FEW_SHOT_BATCH)))
            base += [f"augcond.store_dir={store}", f"train.epochs={epochs}"]
        else:
            store = cache / "stores" / store_name(setting, generator, config.generator)
            base += [f"synaug.store_dir={store}"]
        fingerprint = generator.fingerprint()  # rows and runs of another generator are not reused
        workroot = cache / "runs" / f"selection-{setting}{args.tag}-{fingerprint}".replace(" ", "_")
        reference = reference_classifier(task, base, workroot / "reference-classifier")

        for seed in args.seeds:
            for method in args.methods:
                if (setting, fingerprint, "run", method, seed) in done:
                    continue
                validate = [f"validate.features={reference}", "validate.max_per_class=300"]
                config = load_config(None, [*base, *METHODS[method], f"seed={seed}", *validate])
                workdir = workroot / method.replace(" ", "_") / str(seed)
                t0 = time.perf_counter()
                result = get_recipe(config.recipe).run(task, config, workdir=workdir)
                synthetic = result.extra["synthetic"]
                row = {"setting": setting, "generator": fingerprint, "kind": "run", "method": method, "seed": seed,
                       "accuracy": result.metrics["accuracy"], "balanced_accuracy": result.metrics["balanced_accuracy"],
                       "synthetic_images": synthetic["images"], "selection": synthetic.get("selection"),
                       "seconds": result.seconds, "wall_seconds": time.perf_counter() - t0, **env}
                if seed == args.seeds[0]:
                    row["validation"] = flat_validation(validation_stage(task, result.synthetic, config, None,
                                                                         workdir=workdir))
                append_row(results, row)
                print(f"{setting:22s} {method:18s} seed {seed}  balanced acc {100 * row['balanced_accuracy']:.2f}", flush=True)

        if few_shot:  # every other AugCond mode's synthetic set, for the rank correlation
            for mode in OPERATORS:
                if mode == config.augcond.mode or (setting, fingerprint, "augcond-mode", mode, None) in done:
                    continue  # the run's own mode is the "no selection" set
                config = load_config(None, [*base, f"augcond.mode={mode}", f"validate.features={reference}",
                                            "validate.max_per_class=300"])
                plan = conditioned_plan(task.train, target_per_class=FEW_SHOT_TARGET, mode=mode,
                                        seed=config.generator.plan_seed, dropout=config.augcond.dropout)
                store_rows = SyntheticStore(store, task.train.classes)
                if not store_rows.done_ids() >= {r["id"] for r in plan}:
                    print(f"{setting}: AugCond {mode} is not in the store yet (run benchmarks/augcond.py first)")
                    continue
                synthetic = store_rows.load(ids=[r["id"] for r in plan])
                v = validation_stage(task, synthetic, config, None, workdir=workroot / "augcond-modes" / mode)
                append_row(results, {"setting": setting, "generator": fingerprint, "kind": "augcond-mode", "method": mode,
                                     "validation": flat_validation(v), **env})
    augcond_results = HERE / "results" / ("augcond-quick.jsonl" if args.quick else "augcond.jsonl")
    publish(results, "selection", summarise(read_rows(results), read_rows(augcond_results)),
            to_benchmarks=not args.quick and not args.tag)


def reference_classifier(task, base: list[str], folder) -> str:
    """A classifier trained on the full real training set: the fixed feature space of the
    validation metrics (saved once per setting)."""
    if not (folder / "model.safetensors").exists():  # 5 epochs: a feature space, not a contender
        config = load_config(None, [*base, "recipe=oracle", "seed=0", "train.epochs=5"])
        get_recipe("oracle").run(task, config, workdir=folder.parent / "reference-work").model.save_pretrained(folder)
    return str(folder)


def spearman(pairs: list[tuple[float, float]]) -> float | None:
    from scipy.stats import spearmanr

    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y).statistic)


def store_name(setting, generator, section) -> str:
    """The store the SYNAuG benchmark filled for this generator and sampler."""
    return f"{setting}-{generator.fingerprint()}-{section.sampler}-{section.sampling_steps}-g{section.guidance_scale}"


def summarise(rows: list[dict], augcond_rows: list[dict]) -> str:
    """The tables, from the rows of the latest generator of each setting."""
    latest = {r["setting"]: r.get("generator") for r in rows}
    rows = [r for r in rows if r.get("generator") == latest[r["setting"]]]
    out = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == setting and r["kind"] == "run"]
        base = [r["balanced_accuracy"] for r in runs if r["method"] == "no selection"]
        seeds = sorted({r["seed"] for r in runs})
        out += [f"**{setting}**, {len(seeds)} seed(s); every method keeps the plan's count per class from "
                f"{OVERGENERATE:g} x candidates (the agreement filter may keep fewer)", "",
                "| method | balanced accuracy (%) | gain over no selection (points) | images kept | selection (s) |",
                "|---|---|---|---|---|"]
        points = []  # (validation, mean accuracy) of every synthetic set of the setting
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method]
            if not mine:
                continue
            accs = [r["balanced_accuracy"] for r in mine]
            gain = f"{100 * (statistics.fmean(accs) - statistics.fmean(base)):+.2f}" if base else "n/a"
            sel = [r["selection"]["seconds"] for r in mine if r.get("selection")]
            out.append(f"| {method} | {fmt(accs)} | {gain} | {statistics.fmean(r['synthetic_images'] for r in mine):.0f} | "
                       f"{statistics.fmean(sel):.0f} |" if sel else
                       f"| {method} | {fmt(accs)} | {gain} | {statistics.fmean(r['synthetic_images'] for r in mine):.0f} | - |")
            v = next((r["validation"] for r in mine if r.get("validation")), None)
            if v:
                points.append((method, v, statistics.fmean(accs)))
        for r in rows:
            if r["setting"] == setting and r["kind"] == "augcond-mode":
                name = "label-only generation" if r["method"] == "label-only" else f"AugCond {r['method']}"
                accs = [a["balanced_accuracy"] for a in augcond_rows
                        if a.get("setting") == setting and a.get("kind") == "run" and a.get("method") == name]
                if accs and r["validation"]:
                    points.append((name, r["validation"], statistics.fmean(accs)))
        if len(points) >= 3:
            out += ["", f"Validation metrics of each synthetic set (seed 0) and their rank correlation (Spearman) with the "
                    f"set's balanced accuracy, over the {len(points)} sets:", "",
                    "| set | " + " | ".join(METRICS) + " | balanced acc. (%) |", "|---" * (len(METRICS) + 2) + "|"]
            for name, v, acc in points:
                out.append(f"| {name} | " + " | ".join("n/a" if v[m] is None else f"{v[m]:.3g}" for m in METRICS)
                           + f" | {100 * acc:.2f} |")
            rhos = [spearman([(v[m], a) for _, v, a in points if v[m] is not None]) for m in METRICS]
            out.append("| **rank correlation with accuracy** | " + " | ".join("n/a" if r is None else f"{r:+.2f}" for r in rhos)
                       + " | |")
            out.append("| (a better set should have) | " + " | ".join(d for d in METRICS.values()) + " | |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
