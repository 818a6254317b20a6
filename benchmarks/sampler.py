"""Sampler settings of the embedded generator, judged by the images they give.

    python benchmarks/sampler.py          # needs the generator trained by benchmarks/synaug.py (or trains it)

For one trained generator (MNIST-5k-LT r50, the synaug benchmark's), draw the same labels
and seeds with each sampler variant and measure: the share of images that a classifier
trained on the full balanced real data recognises (overall and per class), the Fréchet
distance between the images and real test images in that classifier's feature space (lower
is closer to real data, diversity included), the mean of the top and bottom three pixel
rows (real MNIST borders are 0: a grey or noisy background shows here), and the time.
The first variant is the sampler synaug used first (deterministic DPM-Solver++, "leading"
spacing, no clipping); the variants are built here from diffusers' scheduler options.
Rows go to benchmarks/results/sampler.jsonl, a table to benchmarks/results/sampler.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import HERE, append_row, environment, read_rows, splice, trained_oracle
from scipy import linalg

from synthaug.classify import evaluate
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.dataset import ImageDataset
from synthaug.generate import diffusion
from synthaug.generate.cache import generator_for
from synthaug.task import make_task

# name: (algorithm, timestep spacing, clip the predicted clean image, steps, guidance)
VARIANTS = {
    "first: dpm-solver++ leading, no clip, 15 steps, g2": ("dpmsolver++", "leading", False, 15, 2.0),
    "dpm-solver++ trailing, clip, 15 steps, g2": ("dpmsolver++", "trailing", True, 15, 2.0),
    "dpm-solver++ trailing, clip, 15 steps, g3": ("dpmsolver++", "trailing", True, 15, 3.0),
    "sde-dpm-solver++ trailing, clip, 15 steps, g1": ("sde-dpmsolver++", "trailing", True, 15, 1.0),
    "sde-dpm-solver++ trailing, clip, 15 steps, g2": ("sde-dpmsolver++", "trailing", True, 15, 2.0),
    "sde-dpm-solver++ trailing, clip, 10 steps, g3": ("sde-dpmsolver++", "trailing", True, 10, 3.0),
    "sde-dpm-solver++ trailing, clip, 15 steps, g3 (default)": ("sde-dpmsolver++", "trailing", True, 15, 3.0),
    "sde-dpm-solver++ trailing, clip, 25 steps, g3": ("sde-dpmsolver++", "trailing", True, 25, 3.0),
}


def scheduler_factory(algorithm, spacing, clip):
    def build(config, sampler):
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(diffusion.build_train_scheduler(config).config,
                                                       algorithm_type=algorithm, timestep_spacing=spacing,
                                                       thresholding=clip, sample_max_value=1.0)
    return build


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@torch.no_grad()
def features(model, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return torch.cat([model.forward_features(images[i : i + 512].float() / 255)
                      for i in range(0, len(images), 512)]).double().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--generator", nargs="*", default=["generator.lr=0.0002", "generator.steps=2400"],
                        help="generator overrides (default: the synaug benchmark's generator)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    results = HERE / "results" / "sampler.jsonl"
    label = ", ".join(o.removeprefix("generator.") for o in args.generator)
    done = {(r["generator_settings"], r["variant"]) for r in read_rows(results)}
    cache = HERE / "results" / "cache"
    config = load_config(None, ["data.dataset=mnist-5k", "split.ratio=50", "train.epochs=30",
                                f"generator.cache_dir={cache / 'generators'}", *args.generator])
    task = make_task(load_dataset(config.data.dataset), config.split)
    generator, _ = generator_for(task.train, config.generator, cache_root=cache / "generators", progress=True)
    oracle = trained_oracle(task.oracle, config.train, progress=False)
    reference = features(oracle, task.test.images)
    labels = torch.arange(task.train.num_classes).repeat_interleave(args.per_class)
    seeds = list(range(len(labels)))
    env = environment()
    for name in args.variants:
        algorithm, spacing, clip, steps, guidance = VARIANTS[name]
        if (label, name) in done:
            continue
        diffusion.build_sampler = scheduler_factory(algorithm, spacing, clip)
        t0 = time.perf_counter()
        images = generator.generate(labels, seeds, sampler=diffusion.SamplerConfig(steps=steps, guidance_scale=guidance))
        seconds = time.perf_counter() - t0
        recognised = evaluate(oracle, ImageDataset(images, labels, classes=task.train.classes))
        border = torch.cat([images[..., :3, :], images[..., -3:, :]], -2).float().mean().item()
        append_row(results, {
            "generator_settings": label, "variant": name, "images": len(images), "generator": generator.fingerprint(),
            "oracle_accuracy": recognised["accuracy"], "per_class": recognised["per_class_accuracy"],
            "frechet_distance": frechet_distance(features(oracle, images), reference),
            "border_mean": border, "real_border_mean": torch.cat([task.test.images[..., :3, :],
                                                                  task.test.images[..., -3:, :]], -2).float().mean().item(),
            "images_per_second": len(images) / seconds, **env,
        })
        print(f"{name}: recognised {100 * recognised['accuracy']:.1f}%", flush=True)
    rows = read_rows(results)
    lines = [f"MNIST-5k-LT r50, {rows[0]['images']} images per row (same labels and seeds); real border mean "
             f"{rows[0]['real_border_mean']:.1f}.", "",
             "| generator (small preset) | sampler | oracle recognises | lowest class | Fréchet distance (oracle features) "
             "| border mean (0-255) | images/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = min(r["per_class"], key=r["per_class"].get)
        lines.append(f"| {r['generator_settings']} | {r['variant']} | {100 * r['oracle_accuracy']:.1f}% | "
                     f"{worst}: {100 * r['per_class'][worst]:.0f}% | "
                     f"{r['frechet_distance']:.2f} | {r['border_mean']:.1f} | {r['images_per_second']:.1f} |")
    table = "\n".join(lines) + "\n"
    (HERE / "results" / "sampler.md").write_text(table)
    splice(HERE.parent / "BENCHMARKS.md", "sampler", table)
    print(table)


if __name__ == "__main__":
    main()
