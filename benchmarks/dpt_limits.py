"""What limits DPT in the fewshot suite, measured: how right the labels are at each step.

    python benchmarks/dpt_limits.py      # after `make bench-ssl` has made DPT's pseudo-labels and store

DPT's chain is labeller -> pseudo-labelled pool -> generator -> generated images -> classifier.
For each DPT row of the suite (`CHAINS`: a setting and a labeller) whose seed-0 cell has run,
this measures, with a classifier trained on the whole labelled Fashion-MNIST training set
(the oracle; never used by any method):
- the pseudo-labels' accuracy on the pool (all of it, and the confident part the generator
  trains under its class, `dpt.confidence`, from which the control draws its images), per class;
- the share of DPT's generated images that the oracle recognises as their class, per class.
A generated image whose class the oracle does not recognise is a wrong label for the
classifier trained on it, as a wrong pseudo-label is. Rows go to
benchmarks/results/dpt_limits.jsonl, a table to BENCHMARKS.md (`dpt-limits`).
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

import torch
from common import HERE, environment, publish, read_rows, trained_oracle
from safetensors.torch import load_file

from synthaug.bench.suite import load_suite, with_locations
from synthaug.classify import evaluate
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.dataset import ImageDataset
from synthaug.recipes.dpt import labeller_key
from synthaug.store import SyntheticStore
from synthaug.task import make_task

OUT = HERE / "results" / "bench" / "fewshot"
# (setting, the suite's DPT row): DPT with FixMatch as its labeller (label-only images, and AugCond's best mode
# conditioned on pseudo-labelled images), and with FixMatch + RandAugment + Mixup (at confidence 0.5 and 0.9)
CHAINS = [("Fashion-MNIST 5-shot", "DPT"), ("Fashion-MNIST 5-shot", "DPT + AugCond mixup"),
          ("Fashion-MNIST 10-shot", "DPT"), ("Fashion-MNIST 10-shot", "DPT + AugCond cutmix"),
          ("Fashion-MNIST 10-shot", "DPT on FixMatch + RandAugment + Mixup"),
          ("Fashion-MNIST 10-shot", "DPT on FixMatch + RandAugment + Mixup, confidence 0.9")]
RESULTS = HERE / "results" / "dpt_limits.jsonl"


def true_labels(pool: ImageDataset, full: ImageDataset) -> torch.Tensor:
    """The pool's labels, found by matching each image's bytes in the labelled training set."""
    by_bytes = {hashlib.sha1(img.numpy().tobytes()).hexdigest(): int(y) for img, y in zip(full.images, full.labels)}
    return torch.tensor([by_bytes[hashlib.sha1(img.numpy().tobytes()).hexdigest()] for img in pool.images])


def per_class(correct: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    return {name: float(correct[labels == c].float().mean()) for c, name in enumerate(classes) if (labels == c).any()}


def main():
    if not (OUT / "results.jsonl").exists():
        raise SystemExit("no fewshot results yet: run `make bench-ssl` first")
    suite = load_suite("fewshot")
    full = load_dataset("fashion-mnist")
    oracle = None
    rows = []
    for setting, recipe in CHAINS:
        cell = next(c for c in suite.cells_ if c.setting == setting and c.recipe == recipe and c.seed == 0)
        config = with_locations(cell, OUT)
        task = make_task(full, config.split)
        labels_file = OUT / "generators" / "pseudo-labels" / labeller_key(task, config) / "labels.safetensors"
        # DPT's images: the store folder of the generator its seed-0 row used (the folder holds one per generator)
        ran = next((r for r in read_rows(OUT / "results.jsonl") if r["cell"] == cell.key), None)
        made_by = OUT / "generators" / str(ran and ran["generator"]) / "generator.json"
        folder = Path(config.dpt.store_dir) / json.loads(made_by.read_text())["fingerprint"][:16] if made_by.exists() else None
        if not labels_file.exists() or folder is None or not (folder / "train" / "metadata.jsonl").exists():
            print(f"{setting}, {recipe}: not run yet, skipped")
            continue
        if oracle is None:
            oracle = trained_oracle(full.train, load_config(None, ["train.epochs=10"]).train)
        saved = load_file(labels_file)
        truth = true_labels(task.unlabeled, full.train)
        confident = saved["confidence"] >= config.dpt.confidence
        right = saved["labels"] == truth
        store = SyntheticStore(folder, task.train.classes)
        generated = store.load()
        recognised = evaluate(oracle, generated)
        row = {
            "setting": setting, "recipe": recipe, "labeller_test_accuracy": json.loads(
                (labels_file.parent / "done.json").read_text())["test_accuracy"], "pool": len(truth), "confident_share": float(confident.float().mean()),
            "pseudo_label_accuracy": float(right.float().mean()),
            "confident_pseudo_label_accuracy": float(right[confident].float().mean()),
            "confident_per_class": per_class(right[confident], truth[confident], task.train.classes),
            "generated_images": len(generated), "generated_recognised": recognised["accuracy"],
            "generated_per_class": recognised["per_class_accuracy"], "store": str(folder.relative_to(HERE.parent)),
            **environment(),
        }
        rows.append(row)
        print(f"{setting}, {recipe}: pseudo-labels {100 * row['pseudo_label_accuracy']:.1f}% right "
              f"({100 * row['confident_pseudo_label_accuracy']:.1f}% of the confident), generated images "
              f"recognised {100 * row['generated_recognised']:.1f}%", flush=True)
    if not rows:
        return
    # a chain skipped now (its labeller or store not on this machine) keeps the row measured before
    chain = lambda r: (r["setting"], r.get("recipe", "DPT"))  # noqa: E731  (the first rows were DPT's alone)
    measured = {chain(r): r for r in read_rows(RESULTS)} | {chain(r): r for r in rows}
    rows = [measured[c] for c in CHAINS if c in measured]
    RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    publish(RESULTS, "dpt-limits", summarise(rows), to_benchmarks=True)


def summarise(rows: list[dict]) -> str:
    classes = list(rows[0]["generated_per_class"])
    lines = ["| setting | DPT row | labeller's test accuracy | pool pseudo-labels right | confident share | "
             "confident pseudo-labels right | DPT's images recognised | lowest class (confident labels / images) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = min(classes, key=lambda c: r["generated_per_class"].get(c, 1.0))
        labeller = f"{100 * r['labeller_test_accuracy']:.1f}%" if "labeller_test_accuracy" in r else "-"
        lines.append(f"| {r['setting']} | {r.get('recipe', 'DPT')} | {labeller} | {100 * r['pseudo_label_accuracy']:.1f}% "
                     f"| {100 * r['confident_share']:.0f}% | {100 * r['confident_pseudo_label_accuracy']:.1f}% | "
                     f"{100 * r['generated_recognised']:.1f}% | "
                     f"{worst}: {100 * r['confident_per_class'].get(worst, float('nan')):.0f}% / "
                     f"{100 * r['generated_per_class'][worst]:.0f}% |")
    mean_gap = statistics.fmean(r["confident_pseudo_label_accuracy"] - r["generated_recognised"] for r in rows)
    lines += ["", "The oracle: small-cnn on all 60,000 labelled Fashion-MNIST training images, 10 epochs. "
              f"Mean gap between the generator's training labels and its images: {100 * mean_gap:+.1f} points."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
