"""The generator's tail levers (issue 21, item 3), each judged by the images it gives and what
it costs.

    python benchmarks/generator_levers.py                  # MNIST-5k-LT r50, generator seed 0
    python benchmarks/generator_levers.py --seeds 0 1      # a second generator seed
    python benchmarks/generator_levers.py --again --levers today "base preset"   # measured again here

On MNIST-5k-LT r50 (the longtail suite's setting and generator: 800 steps at lr 1e-3, 10 SDE
sampling steps), one generator per lever (and seed), each the longtail suite's generator with
one change: square-root or class-balanced sampling of its training images, Min-SNR-5 loss
weighting, CBDM's regulariser (tau 1), an EMA half-life of 10% of the run, twice the steps,
the base preset's network (alone, and on Min-SNR), the Min-SNR generator sampled at a lower
classifier-free guidance (2 and 1.5; the same trained generator), and the Min-SNR generator trained
with non-leaking augmentation (`generator.augment`), at 800 steps and, beside Min-SNR alone, at 2,400, and
the Min-SNR generator sampled with feedback guidance (`generator.feedback`, select's scorer guiding), and
sampled with classifier-free guidance only at the middle noise levels (`generator.guidance_interval`), and
trained with CBDM's regulariser below the paper's strength (tau 0.1, 0.3, 1; its other class by frequency
or uniformly, `generator.cbdm_draw`).
Each draws the same labels and seeds (`--per-class` per class) and is measured against a
classifier trained on the full balanced real training set (the oracle): the share of images
it recognises, overall and on the tail (the few-shot classes, under 4% of the largest), the
Fréchet distance to the real test images in its feature space, the tail's memorisation ratio
(distance to the nearest training image against a held-out real image's: about 1 is new
images, well below 1 copies) and diversity ratio (the tail's mean pairwise distance against
the real test images'), and the generator's training minutes on this machine.

Resumable: a finished (lever, seed) is a row of benchmarks/results/generator_levers.jsonl;
an interrupted generator resumes from its checkpoint. Training minutes compare only on one
kind of machine: `--again` measures the chosen levers again (a trained generator of the same
fingerprint trained on this kind of machine is reused), and the table gives each lever a
line per kind of machine. The table goes to
benchmarks/results/generator_levers.md and into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import torch
from common import HERE, append_row, environment, read_rows, splice, trained_oracle

from synthaug.classify import evaluate
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.dataset import ImageDataset
from synthaug.data.splits import shot_thresholds
from synthaug.generate.cache import generator_for, sampler_config
from synthaug.select.features import classifier_features
from synthaug.select.metrics import diversity_ratio, frechet_distance, memorization_ratio
from synthaug.select.stage import scorer_for
from synthaug.task import make_task

SETTING = ["data.dataset=mnist-5k", "split.kind=long-tail", "split.ratio=50", "train.epochs=30",
           "generator.steps=800", "generator.sampling_steps=10", "generator.min_snr_gamma=0"]
GUIDE = ["train.precision=float32", "select.scorer_epochs=107"]  # the guiding scorer's training (feedback rows)
LEVERS = {
    "today": [],  # the plain loss: synthaug's generator before these rows made Min-SNR its default
    "sqrt class sampling": ["generator.class_sampler=sqrt"],
    "class-balanced sampling": ["generator.class_sampler=class-balanced"],
    "Min-SNR gamma 5": ["generator.min_snr_gamma=5"],
    "CBDM tau 1": ["generator.cbdm_weight=1"],
    "EMA half-life 10% of the run": ["generator.ema_half_life=0.1"],
    "2x steps (1600)": ["generator.steps=1600"],
    # capacity: the base preset (64/128/128 channels, 2 layers a block, attention at 7 px; 6.5M parameters
    # against the small preset's 1.0M), alone and on the Min-SNR generator the longtail rows use
    "base preset": ["generator.preset=base"],
    "Min-SNR gamma 5, base preset": ["generator.min_snr_gamma=5", "generator.preset=base"],
    # the sampler's classifier-free guidance on the Min-SNR generator (the same trained generator: guidance is
    # not part of its fingerprint); at 2 the sampler table's 2,400-step generator had its closest features
    "Min-SNR gamma 5, guidance 2": ["generator.min_snr_gamma=5", "generator.guidance_scale=2"],
    "Min-SNR gamma 5, guidance 1.5": ["generator.min_snr_gamma=5", "generator.guidance_scale=1.5"],
    # non-leaking augmentation of its training images (CBDM's long-tail code: p 0.12), on the Min-SNR generator
    "Min-SNR gamma 5, augment 0.12": ["generator.min_snr_gamma=5", "generator.augment=0.12"],
    # the same at three times the steps, with and without it: whether a longer training learns the augmented views
    "Min-SNR gamma 5, 3x steps (2400)": ["generator.min_snr_gamma=5", "generator.steps=2400"],
    "Min-SNR gamma 5, augment 0.12, 3x steps (2400)": ["generator.min_snr_gamma=5", "generator.augment=0.12",
                                                       "generator.steps=2400"],
    # feedback guidance (session 53) on the Min-SNR generator, as the longtail rows guide it: select's scorer (Balanced
    # Softmax on the real split, float32, 107 epochs = 960 steps) at the generator's seed climbs its reading's entropy
    "Min-SNR gamma 5, feedback 0.03": ["generator.min_snr_gamma=5", "generator.feedback=0.03", *GUIDE],
    "Min-SNR gamma 5, feedback 0.1": ["generator.min_snr_gamma=5", "generator.feedback=0.1", *GUIDE],
    # guidance only at the middle noise levels (session 55, `generator.guidance_interval`; Kynkaanniemi et al. 2024's
    # EDM2 interval): the first two of the 10 steps and the last sample the class alone
    "Min-SNR gamma 5, guidance 3 in (0.28, 5.42]": ["generator.min_snr_gamma=5", "generator.guidance_interval=[0.28,5.42]"],
    "Min-SNR gamma 5, guidance 4 in (0.28, 5.42]": ["generator.min_snr_gamma=5", "generator.guidance_scale=4",
                                                    "generator.guidance_interval=[0.28,5.42]"],
    "Min-SNR gamma 5, guidance 3 in (0.28, 2.5]": ["generator.min_snr_gamma=5", "generator.guidance_interval=[0.28,2.5]"],
    # CBDM below the paper's strength (session 56), on the Min-SNR generator: y' by the class frequencies (the
    # reference code's training) or uniformly (its fine-tuning)
    "Min-SNR gamma 5, CBDM tau 0.1": ["generator.min_snr_gamma=5", "generator.cbdm_weight=0.1"],
    "Min-SNR gamma 5, CBDM tau 0.1, y' uniform": ["generator.min_snr_gamma=5", "generator.cbdm_weight=0.1",
                                                  "generator.cbdm_draw=uniform"],
    "Min-SNR gamma 5, CBDM tau 0.3, y' uniform": ["generator.min_snr_gamma=5", "generator.cbdm_weight=0.3",
                                                  "generator.cbdm_draw=uniform"],
    "Min-SNR gamma 5, CBDM tau 1, y' uniform": ["generator.min_snr_gamma=5", "generator.cbdm_weight=1",
                                                "generator.cbdm_draw=uniform"],
}
RESULTS = HERE / "results" / "generator_levers.jsonl"


def measure(lever: str, seed: int, args, oracle, task, env) -> dict:
    config = load_config(None, [*SETTING, f"generator.seed={seed}", *LEVERS[lever]])
    root = HERE / "results" / "cache"
    # --again: trained, and so timed, on this kind of machine (its generators and guides apart)
    machine = [hashlib.sha256(env["machine"].encode()).hexdigest()[:12]] if args.again else []
    generator, made = generator_for(task.train, config.generator, cache_root=root.joinpath("generators", *machine),
                                    progress=True)
    labels = torch.arange(task.train.num_classes).repeat_interleave(args.per_class)
    guide = None
    if config.generator.feedback:  # select's scorer at the generator's seed, as generate_stage asks for it
        guide = scorer_for(task.train, config, root.joinpath("scorers", *machine), seed=seed, progress=True)
    t0 = time.perf_counter()  # the sampling alone
    images = generator.generate(labels, list(range(len(labels))), sampler=sampler_config(config.generator), guide=guide,
                                progress=True)
    seconds = time.perf_counter() - t0
    synthetic = ImageDataset(images, labels, classes=task.train.classes)
    counts = task.train.class_counts()
    _, few = shot_thresholds(int(counts.max()))
    tail = torch.nonzero(counts < few).flatten()
    tail = tail if len(tail) else counts.argmin()[None]  # no few-shot class: the smallest
    on_tail = torch.isin(labels, tail)
    recognised = evaluate(oracle, synthetic)
    test_tail = torch.isin(task.test.labels, tail)
    memorised = memorization_ratio(synthetic, task.train, task.test)
    tail_names = [task.train.classes[c] for c in tail.tolist()]
    features = classifier_features(oracle)
    return {
        "setting": "MNIST-5k-LT r50", "lever": lever, "generator_seed": seed, "overrides": LEVERS[lever],
        "generator": generator.fingerprint(), "images": len(images), "tail_classes": tail_names,
        "oracle_recognition": recognised["accuracy"],
        "tail_recognition": statistics.fmean(recognised["per_class_accuracy"][n] for n in tail_names),
        "frechet_distance": frechet_distance(features(task.test.images), features(images)),
        "tail_memorisation_ratio": statistics.median(memorised["per_class"][n] for n in tail_names),
        "tail_diversity_ratio": diversity_ratio(synthetic.subset(torch.nonzero(on_tail).flatten()),
                                                task.test.subset(torch.nonzero(test_tail).flatten())),
        "train_minutes": generator.train_seconds / 60, "trained_now": made.get("trained_now", False),
        "images_per_second": len(images) / seconds, **env,
    }


def machine_label(row: dict) -> str:
    """A short name for the kind of machine a row ran on; the first rows, whose record named no CPU
    kind ('x86_64'), ran on the reference machine."""
    machine = row.get("machine", "")
    return "AMX" if "amx" in machine else "AVX512-BF16" if "bf16" in machine else "reference" if machine == "x86_64" \
        else machine or "?"


def table(rows: list[dict]) -> str:
    """One line per lever and kind of machine (training minutes compare only on one), the mean of
    each generator seed's latest row there."""
    latest = {(r["lever"], r["generator_seed"], machine_label(r)): r for r in rows}
    lines = [f"MNIST-5k-LT r50, the longtail suite's generator with one change per row; {rows[0]['images']} images "
             f"per generator (same labels and seeds), tail = {', '.join(rows[0]['tail_classes'])}; mean over the "
             "generator seeds (n); training minutes compare only on one machine.", "",
             "| generator | n | oracle recognises | tail recognised | Fréchet distance (oracle features) "
             "| tail memorisation ratio | tail diversity ratio | training (CPU min) | machine |",
             "|---|---|---|---|---|---|---|---|---|"]
    machines = sorted({machine for _, _, machine in latest}, key=lambda m: m != "reference")
    for lever in LEVERS:
        for machine in machines:
            mine = [r for (name, _, kind), r in latest.items() if name == lever and kind == machine]
            if not mine:
                continue
            mean = {k: statistics.fmean(r[k] for r in mine) for k in ("oracle_recognition", "tail_recognition",
                    "frechet_distance", "tail_memorisation_ratio", "tail_diversity_ratio", "train_minutes")}
            lines.append(f"| {lever} | {len(mine)} | {100 * mean['oracle_recognition']:.1f}% | "
                         f"{100 * mean['tail_recognition']:.1f}% | {mean['frechet_distance']:.2f} | "
                         f"{mean['tail_memorisation_ratio']:.2f} | {mean['tail_diversity_ratio']:.2f} | "
                         f"{mean['train_minutes']:.1f} | {machine} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="generator seeds")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--again", action="store_true", help="measure the levers again where no row ran on this kind of "
                        "machine (training minutes compare only on one); the table gives each machine its line")
    args = parser.parse_args()
    env = environment()
    # --again: done where a row ran on this kind of machine (so an interrupted --again resumes too)
    done = {(r["lever"], r["generator_seed"]) for r in read_rows(RESULTS) if not args.again
            or r.get("machine") == env["machine"]}
    todo = [(lever, seed) for seed in args.seeds for lever in args.levers if (lever, seed) not in done]
    if todo:
        config = load_config(None, SETTING)
        task = make_task(load_dataset(config.data.dataset), config.split)
        oracle = trained_oracle(task.oracle, config.train)
        for i, (lever, seed) in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {lever}, generator seed {seed}", flush=True)
            row = measure(lever, seed, args, oracle, task, env)
            append_row(RESULTS, row)
            print(f"  recognised {100 * row['oracle_recognition']:.1f}%, tail {100 * row['tail_recognition']:.1f}%, "
                  f"FD {row['frechet_distance']:.2f}, {row['train_minutes']:.1f} min", flush=True)
    rows = read_rows(RESULTS)
    if rows:
        text = table(rows)
        (HERE / "results" / "generator_levers.md").write_text(text)
        splice(HERE.parent / "BENCHMARKS.md", "generator-levers", text)
        print(text)


if __name__ == "__main__":
    main()
