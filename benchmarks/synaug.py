"""SYNAuG and its ablations against the classical baselines, side by side in one run.

    python benchmarks/synaug.py                                  # MNIST-5k-LT r50, 3 seeds (~45 min, 2 CPU cores)
    python benchmarks/synaug.py --settings "Fashion-MNIST-LT r100"   # needs hours on a CPU: use a GPU
    python benchmarks/synaug.py --quick                          # tiny generator, 1 seed: checks the script

Per setting: one generator per generator seed is trained on the long-tailed training split
(cached by fingerprint under benchmarks/results/cache/), its uniformizing plan is generated
once into a shared store, and every classifier seed trains every method. Also measured:
generator training time and sampling throughput, our generation path (per-image seeds,
PNG + metadata writes) against a bare diffusers sampling loop over the same network, the
oracle classifier's accuracy on the synthetic images per class, and the memorisation ratio.
Rows go to benchmarks/results/synaug.jsonl (a re-run skips finished rows); the tables go
to benchmarks/results/synaug.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch
from common import HERE, append_row, environment, fmt, read_rows, splice

from synthaug.classify import evaluate
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.generate.cache import generator_for, provenance, sampler_config
from synthaug.generate.network import build_sampler
from synthaug.plan import balance_plan
from synthaug.recipes import get_recipe
from synthaug.select.metrics import memorization_ratio
from synthaug.store import SyntheticStore
from synthaug.task import make_task

SETTINGS = {
    # the table in BENCHMARKS.md was measured with the generator's first learning rate (2e-4, 2,400 steps)
    "MNIST-5k-LT r50": ["data.dataset=mnist-5k", "split.ratio=50", "train.epochs=30", "generator.lr=0.0002"],
    # ~48,000 images to generate: 10 sampling steps (as good as 15 in the sampler table, 1.6x faster)
    "Fashion-MNIST-LT r100": ["data.dataset=fashion-mnist", "split.ratio=100", "train.epochs=10",
                              "generator.sampling_steps=10"],
}
METHODS = {
    "ce": ["recipe=ce"],
    "class-balanced": ["recipe=class-balanced"],
    "balanced-softmax": ["recipe=balanced-softmax"],
    "posthoc-la": ["recipe=posthoc-la"],
    "crt": ["recipe=crt"],
    "synaug": ["recipe=synaug"],
    "synaug w/o domain mixup": ["recipe=synaug", "synaug.domain_mixup=false"],
    "synaug w/o head re-fit": ["recipe=synaug", "synaug.refit_head=false"],
    "oracle": ["recipe=oracle"],
}
BASELINES = ("ce", "class-balanced", "balanced-softmax", "posthoc-la", "crt")
COLUMNS = ["balanced_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy", "worst_class_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["MNIST-5k-LT r50"], choices=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generator-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for every run (e.g. synaug.mix_alpha=0.2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tag", default="", help="suffix for the results file (for tuning runs)")
    parser.add_argument("--quick", action="store_true", help="tiny generator, 1 epoch, 1 seed: checks the script")
    args = parser.parse_args()
    name = "synaug-quick" if args.quick else f"synaug{args.tag}"
    results = HERE / "results" / f"{name}.jsonl"
    cache = HERE / "results" / "cache"
    extra = list(args.extra)
    if args.quick:
        args.seeds = [0]
        extra += ["train.epochs=1", "generator.preset=tiny", "generator.steps=20", "generator.sampling_steps=4"]
    done = {(r["setting"], r["kind"], r.get("method"), r.get("seed"), r.get("generator_seed")) for r in read_rows(results)}
    env = environment()

    for setting in args.settings:
        base = [*SETTINGS[setting], *extra, f"generator.cache_dir={cache / 'generators'}", f"output_dir={cache / 'runs'}"]
        config = load_config(None, base)
        task = make_task(load_dataset(config.data.dataset), config.split)
        trained: dict = {}
        oracle_model = None
        for gseed in args.generator_seeds:
            gconfig = load_config(None, [*base, f"generator.seed={gseed}"])
            t0 = time.perf_counter()
            generator, info = generator_for(task.train, gconfig.generator, cache_root=cache / "generators", progress=True)
            store_dir = cache / "stores" / store_name(setting, generator, gconfig.generator)
            if (setting, "generator", None, None, gseed) in done:
                continue
            # generate the uniformizing plan into the shared store, timed
            plan = balance_plan(task.train, seed=gseed)
            sampling = sampler_config(gconfig.generator)
            store = SyntheticStore(store_dir, task.train.classes)
            t1 = time.perf_counter()
            written = store.fill(plan, partial(generator.generate_rows, sampler=sampling), batch_size=sampling.batch_size,
                                 extra=provenance(generator, sampling), progress=True)
            generate_seconds = time.perf_counter() - t1
            synthetic = store.load(ids=[r["id"] for r in plan])  # not the selection benchmark's extra candidates
            ours, bare = sampling_throughput(generator, sampling, store_dir.parent / f"speed-{gseed}", n=256)
            # quality: the oracle classifier (full balanced real data) on the synthetic images
            if oracle_model is None:
                oracle_config = load_config(None, [*base, "recipe=oracle", "seed=0"])
                oracle_model = get_recipe("oracle").run(task, oracle_config, trained=trained).model
            recognised = evaluate(oracle_model, synthetic)
            memo = memorization_ratio(synthetic, task.train, task.test)
            append_row(results, {
                "setting": setting, "kind": "generator", "generator_seed": gseed, "fingerprint": generator.fingerprint(),
                "source": info["source"], "train_seconds": generator.train_seconds,
                "steps": gconfig.generator.steps, "batch_size": gconfig.generator.batch_size,
                "parameters": sum(p.numel() for p in generator.unet.parameters()), "preset": gconfig.generator.preset,
                "planned": len(plan), "generated_now": written, "generate_seconds": generate_seconds,
                "sampler": f"{sampling.sampler}, {sampling.steps} steps, guidance {sampling.guidance_scale}",
                "images_per_second_ours": ours, "images_per_second_bare": bare,
                "oracle_accuracy_on_synthetic": recognised["accuracy"],
                "oracle_per_class_on_synthetic": recognised["per_class_accuracy"],
                "memorization": memo, "wall_seconds": time.perf_counter() - t0, **env,
            })
            print(f"{setting}: generator seed {gseed}: {len(plan)} images, oracle recognises "
                  f"{100 * recognised['accuracy']:.1f}%, memorisation ratio (median) {memo['median']:.2f}", flush=True)

        for seed in args.seeds:
            gseed = args.generator_seeds[seed % len(args.generator_seeds)]
            for method in args.methods:
                overrides = METHODS[method]
                if (setting, "run", method, seed, gseed) in done:
                    continue
                config = load_config(None, [*base, *overrides, f"seed={seed}", f"generator.seed={gseed}"])
                store_dir = None
                if config.recipe == "synaug":
                    generator, _ = generator_for(task.train, config.generator, cache_root=cache / "generators")
                    store_dir = cache / "stores" / store_name(setting, generator, config.generator)
                    config = load_config(None, [*base, *overrides, f"seed={seed}", f"generator.seed={gseed}",
                                                f"synaug.store_dir={store_dir}"])
                workdir = cache / "runs" / f"{setting}{args.tag}" / method.replace(" ", "_").replace("/", "_") / str(seed)
                t0 = time.perf_counter()
                result = get_recipe(config.recipe).run(task, config, workdir=workdir, trained=trained)
                append_row(results, {
                    "setting": setting, "kind": "run", "method": method, "seed": seed, "generator_seed": gseed,
                    **{k: result.metrics.get(k) for k in ["accuracy", *COLUMNS]},
                    "train_seconds": sum(v for k, v in result.seconds.items() if k in ("train", "refit_head")),
                    "seconds": result.seconds, "wall_seconds": time.perf_counter() - t0,
                    "synthetic_images": result.extra.get("synthetic", {}).get("images", 0),
                    "epochs": config.train.epochs, "model": config.train.model, **env,
                })
                print(f"{setting:22s} {method:24s} seed {seed}  balanced acc {100 * result.metrics['balanced_accuracy']:.2f}",
                      flush=True)
    table = summarise(read_rows(results))
    results.with_suffix(".md").write_text(table)
    if not args.quick and not args.tag:
        splice(HERE.parent / "BENCHMARKS.md", "synaug", table)
    print(table)


def store_name(setting, generator, section) -> str:
    return f"{setting}-{generator.fingerprint()}-{section.sampler}-{section.sampling_steps}-g{section.guidance_scale}"


@torch.no_grad()
def sampling_throughput(generator, sampling, folder: Path, n: int) -> tuple[float, float]:
    """Images per second: our path (per-image seeds, written to a store) and a bare
    diffusers loop (one noise tensor, the same scheduler, network and guidance)."""
    import shutil

    labels = torch.arange(n) % generator.config.num_classes
    shutil.rmtree(folder, ignore_errors=True)
    store = SyntheticStore(folder, generator.config.classes)
    rows = [{"id": f"speed-{i}", "label": int(labels[i]), "seed": i} for i in range(n)]
    t0 = time.perf_counter()
    store.fill(rows, partial(generator.generate_rows, sampler=sampling), batch_size=sampling.batch_size)
    ours = n / (time.perf_counter() - t0)
    shutil.rmtree(folder, ignore_errors=True)

    unet, c, s = generator.unet, generator.config.channels, generator.config.image_size
    device = next(unet.parameters()).device
    t0 = time.perf_counter()
    for i in range(0, n, sampling.batch_size):
        y = labels[i : i + sampling.batch_size].to(device)
        null = torch.full_like(y, generator.config.num_classes)
        scheduler = build_sampler(generator.config, sampling.sampler)
        scheduler.set_timesteps(sampling.steps)
        x = torch.randn(len(y), c, s, s, device=device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(x, t)
            if sampling.guidance_scale == 1.0:
                eps = unet(model_in, t, class_labels=y).sample
            else:
                eps_c, eps_u = unet(torch.cat([model_in, model_in]), t, class_labels=torch.cat([y, null])).sample.chunk(2)
                eps = eps_u + sampling.guidance_scale * (eps_c - eps_u)
            x = scheduler.step(eps, t, x).prev_sample
    bare = n / (time.perf_counter() - t0)
    return ours, bare


def summarise(rows: list[dict]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        gens = [r for r in rows if r["setting"] == setting and r["kind"] == "generator"]
        runs = [r for r in rows if r["setting"] == setting and r["kind"] == "run"]
        if not runs:
            continue
        seeds = sorted({r["seed"] for r in runs})
        lines += [f"**{setting}** ({runs[0]['model']}, {runs[0]['epochs']} epochs, classifier seeds {seeds}, "
                  f"generator seeds {sorted({r['generator_seed'] for r in runs})})", "",
                  "| method | balanced acc | many | medium | few | worst class | synthetic images | train s/run | seeds |",
                  "|---|---|---|---|---|---|---|---|---|"]
        means = {}
        for method in sorted(dict.fromkeys(r["method"] for r in runs), key=lambda m: list(METHODS).index(m)):
            m = [r for r in runs if r["method"] == method]
            means[method] = statistics.fmean(r["balanced_accuracy"] for r in m)
            secs = [r["train_seconds"] for r in m]
            lines.append(f"| {method} | " + " | ".join(fmt([r[c] for r in m]) for c in COLUMNS)
                         + f" | {m[0]['synthetic_images']} | {statistics.fmean(secs):.0f} | {len(m)} |")
        best = max((b for b in BASELINES if b in means), key=means.get, default=None)
        if best and "oracle" in means and "synaug" in means:
            gap = means["oracle"] - means[best]
            closed = 100 * (means["synaug"] - means[best]) / gap if gap > 0 else float("nan")
            lines += ["", f"Best classical baseline: {best} ({100 * means[best]:.2f}); oracle {100 * means['oracle']:.2f}; "
                          f"SYNAuG {100 * means['synaug']:.2f}: **{closed:.0f}% of the gap closed** (target 60%)."]
        for g in gens:
            per_class = ", ".join(f"{k} {100 * v:.0f}" for k, v in g["oracle_per_class_on_synthetic"].items())
            lines += ["", f"Generator seed {g['generator_seed']} ({g['preset']}, {g['parameters'] / 1e6:.2f}M parameters, "
                          f"{g['steps']} steps at batch {g['batch_size']}): trained in {g['train_seconds'] / 60:.1f} min; "
                          f"{g['planned']} images generated in {g['generate_seconds'] / 60:.1f} min ({g['sampler']}). "
                          f"Sampling: {g['images_per_second_ours']:.1f} images/s through synthaug (per-image seeds, PNG + "
                          f"metadata) vs {g['images_per_second_bare']:.1f} images/s in a bare diffusers loop "
                          f"(ratio {g['images_per_second_ours'] / g['images_per_second_bare']:.2f}). "
                          f"The oracle classifier recognises {100 * g['oracle_accuracy_on_synthetic']:.1f}% of the "
                          f"synthetic images (per class: {per_class}). Memorisation ratio (median over classes) "
                          f"{g['memorization']['median']:.2f}, lowest {g['memorization']['min']:.2f}."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
