"""Is the coloured generator good enough for SYNAuG's (class x colour) filling? Each generator of
the longtail suite's coloured setting, judged by its images per (class, colour) cell.

    python benchmarks/coloured_generator.py                   # agreement 0.95, generator seed 0
    python benchmarks/coloured_generator.py --variants "2400 steps" --seeds 0 1
    python benchmarks/coloured_generator.py --agreement 0.99 --variants "2400 steps, Min-SNR 5, cells sqrt"

Coloured MNIST-5k at agreement 0.95 (or 0.99, the suite's two coloured settings): a majority cell
is a class in its own colour (~95% of the class's images), a minority cell a class in another
colour (0-7 images at 0.95; 0-3 at 0.99, where 57 of the 90 have none).
Each generator draws `--per-cell` images for every one of the 100 cells (the same seeds for
every generator) with the suite's sampler, and each image is read twice:
- the digit, by the oracle: a small CNN trained on all of MNIST-5k coloured at random (the
  suite's oracle set), so the colour tells it nothing;
- the colour, exactly: the mean colour of the image's bright pixels, scaled to its largest
  channel, and the nearest of the split's ten colours (scaled the same way).
A cell is usable when both are right. The first row reads the real coloured test images, so the
readers' own error is on the page. Generators come from (and train into) the suite's folder,
benchmarks/results/bench/longtail/generators, so a generator trained here is the suite's.

Variants: the suite's generator (plain loss, as the suite pins it) at 800 and 2,400 steps, and
at 2,400 steps with Min-SNR-5 (synthaug's default generator loss); that one also sampled with
the class's and the group's guidance at their own scales (`generator.guidance_scale` /
`generator.group_guidance_scale`; 3 / 3 otherwise), and trained with each class's colours drawn
by sqrt(n) or equally often (`generator.group_sampler`).

Resumable: a finished (setting, variant, seed) is a row of benchmarks/results/coloured_generator.jsonl.
Each setting's table goes to benchmarks/results/coloured_generator[-0.99].md and into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from common import HERE, append_row, environment, read_rows, splice, trained_oracle

from synthaug.bench.suite import load_suite, with_locations
from synthaug.classify import predict_logits
from synthaug.data import load_dataset
from synthaug.data.splits import COLOURS
from synthaug.generate.cache import generator_for, sampler_config
from synthaug.task import make_task

SETTINGS = {"0.95": "Coloured MNIST-5k, agreement 0.95", "0.99": "Coloured MNIST-5k, agreement 0.99"}
RECIPE = "synaug, generator 2400 steps"
OUT = HERE / "results" / "bench" / "longtail"
RESULTS = HERE / "results" / "coloured_generator.jsonl"
SCORES = tuple(f"{what}_{cells}" for what in ("digit", "colour", "both") for cells in ("majority", "minority")) + (
    "cells_half_usable", "cells")
VARIANTS = {  # the suite's generator section with these changes
    "800 steps": {"steps": 800},
    "2400 steps": {"steps": 2400},
    "2400 steps, Min-SNR 5": {"steps": 2400, "min_snr_gamma": 5.0},
    # the same generator, sampled with the class's and the group's guidance at their own scales (class / group)
    **{f"2400 steps, Min-SNR 5, guidance {c:g} / {g:g}": {"steps": 2400, "min_snr_gamma": 5.0, "guidance_scale": c,
                                                         "group_guidance_scale": g}
       for c, g in ((3.0, 1.0), (3.0, 1.5), (3.0, 5.0), (5.0, 1.5), (5.0, 3.0))},
    # trained with each class's colours drawn by sqrt(n) or equally (`generator.group_sampler`), so the colour's
    # direction is learnt from every digit, not mostly from the colour's majority digit
    **{f"2400 steps, Min-SNR 5, cells {s}": {"steps": 2400, "min_snr_gamma": 5.0, "group_sampler": s}
       for s in ("sqrt", "balanced")},
}


def read_colour(images: torch.Tensor) -> torch.Tensor:
    """The nearest split colour to each uint8 RGB image's bright pixels, brightness scaled out."""
    x = images.float() / 255
    bright = x.amax(1, keepdim=True)  # (N, 1, H, W)
    mask = (bright > 0.5 * bright.amax((2, 3), keepdim=True)).float()
    mean = (x * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)  # (N, 3)
    mean = mean / mean.amax(1, keepdim=True).clamp(min=1e-6)
    palette = torch.tensor([rgb for _, rgb in COLOURS])
    palette = palette / palette.amax(1, keepdim=True)
    return torch.cdist(mean, palette).argmin(1)


def scores(oracle, images, labels, groups) -> dict:
    """Digit, colour and both right, on majority cells (group == label) and minority cells."""
    digit = predict_logits(oracle, images).argmax(1).cpu() == labels
    colour = read_colour(images) == groups
    both = digit & colour
    majority = groups == labels
    out = {}
    for name, right in (("digit", digit), ("colour", colour), ("both", both)):
        out[f"{name}_majority"] = right[majority].float().mean().item()
        out[f"{name}_minority"] = right[~majority].float().mean().item()
    cells = labels * 10 + groups
    per_cell = torch.zeros(100).index_add_(0, cells, both.float()) / torch.bincount(cells, minlength=100).clamp(min=1)
    present = torch.bincount(cells, minlength=100) > 0
    out["cells_half_usable"] = int((per_cell[present] >= 0.5).sum())
    out["cells"] = int(present.sum())
    return out


def measure(setting: str, variant: str, seed: int, per_cell: int, config, task, oracle, env) -> dict:
    section = dataclasses.replace(config.generator, **VARIANTS[variant], seed=seed)
    generator, made = generator_for(task.train, section, cache_root=Path(section.cache_dir), progress=True)
    labels = torch.arange(10).repeat_interleave(10 * per_cell)
    groups = torch.arange(10).repeat_interleave(per_cell).repeat(10)
    t0 = time.perf_counter()
    images = generator.generate(labels, list(range(len(labels))), groups, sampler=sampler_config(section),
                                progress=True)
    seconds = time.perf_counter() - t0
    return {"setting": setting, "variant": variant, "overrides": VARIANTS[variant], "generator_seed": seed, "generator": generator.fingerprint(),
            "images": len(images), "train_minutes": generator.train_seconds / 60,
            "trained_now": made.get("trained_now", False), "images_per_second": len(images) / seconds,
            **scores(oracle, images, labels, groups), **env}


def table(setting: str, rows: list[dict], real: dict) -> str:
    rows = [r for r in rows if r["setting"] == setting]
    lines = [f"{setting}: {rows[0]['images'] if rows else 0} images per generator ({rows[0]['images'] // 100 if rows else 0} "
             "per (class, colour) cell, the same seeds); the digit read by an oracle trained on randomly coloured "
             "MNIST-5k, the colour read exactly; majority = a class in its own colour. Mean over generator seeds (n).",
             "", "| images | n | digit (majority / minority) | colour (majority / minority) "
             "| both right (majority / minority) | cells with >= 50% both right | training (CPU min) |",
             "|---|---|---|---|---|---|---|"]

    def line(name, mine):
        m = {k: statistics.fmean(r[k] for r in mine) for k in SCORES + ("train_minutes",) if k in mine[0]}
        pair = lambda k: f"{100 * m[k + '_majority']:.1f}% / {100 * m[k + '_minority']:.1f}%"  # noqa: E731
        minutes = f"{m['train_minutes']:.1f}" if "train_minutes" in m else "-"
        return (f"| {name} | {len(mine)} | {pair('digit')} | {pair('colour')} | {pair('both')} | "
                f"{m['cells_half_usable']:.0f} of {m['cells']:.0f} | {minutes} |")

    lines.append(line("real test images", [real]))
    for variant in VARIANTS:
        if mine := [r for r in rows if r["variant"] == variant]:
            lines.append(line(f"generator, {variant}", mine))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="generator seeds")
    parser.add_argument("--per-cell", type=int, default=5)
    parser.add_argument("--agreement", default="0.95", choices=list(SETTINGS), help="the coloured setting")
    args = parser.parse_args()
    setting = SETTINGS[args.agreement]
    suite = load_suite("longtail")
    cell = next(c for c in suite.cells_ if c.setting == setting and c.recipe == RECIPE)
    config = with_locations(cell, OUT)
    task = make_task(load_dataset(config.data.dataset), config.split)
    oracle = trained_oracle(task.oracle, config.train)
    test = task.test
    real = scores(oracle, test.images, test.labels, test.groups)
    done = {(r["variant"], r["generator_seed"]) for r in read_rows(RESULTS) if r["setting"] == setting}
    env = environment()
    for variant in args.variants:
        for seed in args.seeds:
            if (variant, seed) in done:
                continue
            print(f"{variant}, generator seed {seed}", flush=True)
            row = measure(setting, variant, seed, args.per_cell, config, task, oracle, env)
            append_row(RESULTS, row)
            print(f"  both right: majority {100 * row['both_majority']:.1f}%, minority "
                  f"{100 * row['both_minority']:.1f}%", flush=True)
    text = table(setting, read_rows(RESULTS), real)
    suffix = "" if args.agreement == "0.95" else f"-{args.agreement}"
    (HERE / "results" / f"coloured_generator{suffix}.md").write_text(text)
    splice(HERE.parent / "BENCHMARKS.md", f"coloured-generator{suffix}", text)
    print(text)


if __name__ == "__main__":
    main()
