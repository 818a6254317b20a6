"""The first stage: look at the data before deciding what to synthesise. `synthaug analyse DATA`
and `recipe: auto`.

- **Profile**: class counts, imbalance ratio (largest / smallest class), the smallest classes,
  the unlabelled pool, image size and per-channel statistics, blank images; with groups (a
  colour, a sensitive attribute), the (class, group) cells: their sizes and how many are empty.
- **Duplicates**: exact copies (the same bytes) within the training split and shared with the
  test split (a leak), and near copies (16x16 grey thumbnails within `NEAR` RMS of each
  other, same class; compared within a class, at most `SAMPLE` images per class).
- **Probe**: a short training (a few epochs of the run's classifier with balanced softmax):
  each class's test accuracy (its difficulty) and TADA's slow-learnable share (k-means on
  each example's loss).
- **Recommendation**: the first recipe to try, from the rules in `RULES`, each grounded in
  the shipped benchmark suites' results (`EVIDENCE`; tests/test_analyse.py checks every
  number against benchmarks/results/bench/). It says plainly when no generative recipe is
  expected to beat the classical baseline."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from .data.dataset import ImageDataset

NEAR = 0.02  # RMS difference of [0, 1] grey 16x16 thumbnails below which two images are near copies
SAMPLE = 3000  # images per class compared for near copies


@dataclass(frozen=True)
class Evidence:
    """One measured comparison of the shipped suites: a recipe against the setting's best
    classical baseline, paired over the suite's classifier seeds (points; 95% interval)."""

    suite: str
    setting: str
    recipe: str
    baseline: str
    difference: float
    low: float
    high: float
    verdict: str

    def line(self) -> str:
        return (f"{self.setting} ({self.suite}): {self.recipe} against {self.baseline} {self.difference:+.2f} points "
                f"(95% interval {self.low:+.2f} to {self.high:+.2f}), {self.verdict}")


STEPS = "none, augment-all's steps"
GR_6000 = "group-reweighted, replay's steps"
EVERY_95 = "Coloured MNIST-5k, agreement 0.95, every test colour"
BS_960, BS_4690 = "balanced-softmax, replay's steps (960)", "balanced-softmax, replay's steps"
EVIDENCE = {
    "groups": [  # the baseline: group reweighting for SYNAuG's 6,000 steps; worst-group accuracy
        Evidence("longtail", EVERY_95, "synaug, cells sqrt + agreement filter + group reweighting, replay's steps",
                 GR_6000, -2.00, -11.35, 7.35, "no significant difference"),
        Evidence("longtail", EVERY_95, "synaug, cells sqrt + agreement filter + Group DRO, replay's steps",
                 GR_6000, -7.90, -16.25, 0.45, "no significant difference")],
    "longtail-tiny-tail": [  # the baseline: Balanced Softmax for SYNAuG's 960 steps (3.6x its own 270)
        Evidence("longtail", "MNIST-5k-LT r50", "synaug, Min-SNR float32, replay share 0.5", BS_960, -0.23, -0.76,
                 0.30, "no significant difference"),
        Evidence("longtail", "MNIST-5k-LT r50", "synaug, Min-SNR float32", BS_960, -0.12, -0.92, 0.68,
                 "no significant difference"),
        Evidence("longtail", "MNIST-5k-LT r50", "real replay", BS_960, -1.30, -1.93, -0.67, "loss")],
    "longtail-large-tail": [  # the baseline: Balanced Softmax for SYNAuG's 4,690 steps
        Evidence("longtail", "Fashion-MNIST-LT r100", "synaug, Min-SNR float32, replay share 0.5", BS_4690, -0.94, -1.25,
                 -0.63, "loss"),
        Evidence("longtail", "Fashion-MNIST-LT r100", "real replay", BS_4690, -0.76, -1.18, -0.34, "loss")],
    "few-labels-pool": [
        Evidence("fewshot", "Fashion-MNIST 10-shot", "DPT on FixMatch + RandAugment + Mixup",
                 "FixMatch + RandAugment + Mixup", -2.24, -2.82, -1.66, "loss"),
        Evidence("fewshot", "Fashion-MNIST 10-shot", "DPT", "FixMatch + RandAugment + Mixup", -4.41, -5.84, -2.99,
                 "loss"),
        Evidence("fewshot", "Fashion-MNIST 10-shot", "FixMatch + label-only generation",
                 "FixMatch + RandAugment + Mixup", -4.70, -5.14, -4.25, "loss")],
    "few-labels": [
        Evidence("fewshot-small", "Fashion-MNIST 5-shot", "AugCond embed-cutmix-dropout + RandAugment + Mixup",
                 "RandAugment + Mixup", -1.45, -6.69, 3.79, "no significant difference"),
        Evidence("fewshot-small", "Fashion-MNIST 10-shot", "AugCond embed-cutmix-dropout + RandAugment + Mixup",
                 "RandAugment + Mixup", -1.16, -1.53, -0.79, "loss"),
        Evidence("fewshot-small", "Fashion-MNIST 10+3-shot (UtilGen)", "SYNAuG", "RandAugment + Mixup", -1.89, -2.40,
                 -1.37, "loss"),
        Evidence("cifar10-gpu", "CIFAR-10 10-shot", "AugCond mixup", "RandAugment + Mixup", -3.24, -4.97, -1.50, "loss")],
    "balanced-moderate": [  # the baseline: ce trained for augment-all's steps (6x the 15 epochs)
        Evidence("longtail", "Fashion-MNIST 10%", "augment-all", STEPS, -1.00, -1.47, -0.53, "loss"),
        Evidence("longtail", "Fashion-MNIST 10%", "tada", STEPS, -1.49, -1.90, -1.09, "loss"),
        Evidence("longtail", "Fashion-MNIST 10%", "tada, top 35%, synthetic weight 0.3", STEPS, -0.72, -1.07, -0.37,
                 "loss"),
        Evidence("longtail", "Fashion-MNIST 10%", "tada, augment-all's steps", STEPS, -0.33, -0.76, 0.10,
                 "no significant difference")],
}


@dataclass
class Recommendation:
    recipe: str  # a registered recipe
    overrides: list[str]  # with it (key=value)
    label: str
    why: str
    rule: str  # the rule's key in RULES
    generative_expected: bool  # whether a generative recipe is expected to beat the classical baseline
    try_generative: str | None  # the generative recipe to measure against it (with --seeds), if any
    evidence: list[str] = field(default_factory=list)
    remarks: list[str] = field(default_factory=list)


RULES = """\
g. groups: the split has groups (split.kind=colored, or group ids) and its (class, group) cells are
   imbalanced beyond chance (the smallest, or an empty one, at most a third of the mean cell, and the
   mean cell 10 images or more: smaller cells are empty by chance alone) -> group-reweighted (each
   image's loss weighted by 1 / its cell's size) for SYNAuG's optimiser steps (every cell filled to
   the largest). On coloured MNIST-5k tested in every colour it was the best classical recipe at
   agreement 0.95 (worst group 86.6, 10 points above Group DRO at the same steps) and at 0.99 (the
   best average; every classical worst group is 0 there), and SYNAuG's filtered images trained with
   it or with Group DRO tied it at 0.95.
0. few-labels-pool: 10 to 20 labelled images per class and an unlabelled pool -> fixmatch
   with RandAugment + Mixup on its labelled images: the best trainer of the fewshot suite at
   10-shot, and every generation on top of it lost. At 5-shot it tied RandAugment + Mixup
   (seeds 6 points apart), so below 10 per class rule 1 holds.
1. few-labels: the largest class has at most 20 labelled images -> ce with RandAugment + Mixup.
   Every generative recipe tied or lost to it in the few-shot suites (5, 10, 10+3 per class).
2. longtail-tiny-tail: imbalance ratio >= 10 and the smallest class under 50 images ->
   balanced-softmax for SYNAuG's optimiser steps (the schedule's epochs over every class filled
   to the largest): on MNIST-5k-LT r50 it beat itself at its own, shorter schedule and tied or
   beat every SYNAuG row that generates, each of which trains that long.
3. longtail-large-tail: imbalance ratio >= 10 and the smallest class 50 images or more ->
   the same, balanced-softmax for SYNAuG's steps: on Fashion-MNIST-LT r100 it beat class-balanced
   sampling and real replay at those steps, and every SYNAuG row that generates.
4. imbalanced: imbalance ratio between 3 and 10 -> balanced-softmax; no suite measures this range.
5. balanced-moderate: balanced (ratio < 3), 100 to 1,000 images per class -> ce trained 6x
   as long (the optimiser steps that variants of every image, 5 per image, would take). On
   Fashion-MNIST 10% every TADA row gained over a 15-epoch ce only through its extra steps:
   ce trained as long beat each of them, and tied TADA trained as long (RandAugment + Mixup was
   not in that comparison). The
   generative recipe to measure against it: tada (its defaults, the top 35% weighted 0.3, beat
   variants of every image with 35% of them).
6. balanced-other: otherwise -> ce with RandAugment + Mixup; no suite measures this range
   (21 to 99 per class lies between the few-shot and the 10% settings; above 1,000 per class
   generated images were not tried)."""


LONGER = 6  # rule 5: the schedule's multiple, the training set's growth under augment-all (1 + 5 variants)


def longer(train, times: int) -> list[str]:
    """`train`'s schedule (its steps when set, else its epochs) `times` as long, as overrides."""
    if train.steps:
        return [f"train.steps={train.steps * times}"]
    return [f"train.epochs={train.epochs * times}"]


def uniformized_steps(profile: dict, train) -> list[str]:
    """SYNAuG's optimiser steps on this data, as overrides: `train`'s epochs over every class
    filled to the largest (none when `train.steps` is set: SYNAuG takes those too)."""
    if train.steps:
        return []
    images = profile["classes"] * profile["largest_count"]
    return [f"train.steps={train.epochs * math.ceil(images / train.batch_size)}"]


def randaugment_mixup(augment: str) -> list[str]:
    parts = [p for p in augment.split("+") if p not in ("none", "randaugment")]
    return [f"train.augment={'+'.join([*parts, 'randaugment'])}", "train.mix=mixup"]


def recommend(profile: dict, probe: dict | None = None, augment: str = "crop", train=None) -> Recommendation:
    """The first recipe to try for data with this profile (see RULES); `train` (a TrainConfig,
    default the default one) is the schedule a rule may lengthen."""
    if train is None:
        from .classify import TrainConfig
        train = TrainConfig()
    ratio, smallest, largest = profile["imbalance_ratio"], profile["smallest_count"], profile["largest_count"]
    pool = profile.get("unlabeled_images", 0)
    cells = profile.get("cells")
    if cells and cells["mean"] >= 10 and 3 * cells["smallest"] <= cells["mean"]:
        filled = {**profile, "largest_count": cells["largest"] * cells["groups"]}  # every cell filled to the largest
        r = Recommendation("group-reweighted", uniformized_steps(filled, train), "group-reweighted, SYNAuG's steps",
                           f"{cells['groups']} groups whose (class, group) cells hold {cells['smallest']} to "
                           f"{cells['largest']} images ({cells['empty']} empty): group reweighting trained for the steps "
                           "SYNAuG would take here (every cell filled to the largest) was the best classical recipe "
                           "in the coloured benchmark settings, and SYNAuG's filtered images trained with it or with "
                           "Group DRO tied it", "groups", False, "synaug")
    elif 10 <= smallest and largest <= 20 and pool:
        r = Recommendation("fixmatch", randaugment_mixup(augment), "fixmatch + RandAugment + Mixup",
                           f"{smallest} to {largest} labelled images per class and {pool} unlabelled: semi-supervised "
                           "training with strong augmentation of the labelled images was the best trainer in the "
                           "few-shot benchmark with a pool at 10 per class, and every generation on top of it lost",
                           "few-labels-pool", False, "dpt")
    elif largest <= 20:
        r = Recommendation("ce", randaugment_mixup(augment), "ce + RandAugment + Mixup",
                           f"at most {largest} labelled images per class: no generative recipe beat strong classical "
                           "augmentation in the few-shot benchmarks (most lost to it)", "few-labels", False, "augcond")
    elif ratio >= 10:
        tiny = smallest < 50
        r = Recommendation("balanced-softmax", uniformized_steps(profile, train), "balanced-softmax, SYNAuG's steps",
                           f"long-tailed (ratio {ratio:.0f}) with a tail of {smallest} images: Balanced Softmax trained "
                           "for the optimiser steps SYNAuG would take here (every class filled to the largest) was the "
                           "best recipe in the benchmark setting of that shape; "
                           + ("every SYNAuG row that generates tied or lost to it" if tiny
                              else "every SYNAuG row that generates and real replay lost to it"),
                           "longtail-tiny-tail" if tiny else "longtail-large-tail", False, "synaug")
    elif ratio >= 3:
        r = Recommendation("balanced-softmax", [], "balanced-softmax",
                           f"imbalanced (ratio {ratio:.1f}): a logit-adjusted loss is the safe first step; no benchmark "
                           "measures generated data at this imbalance", "imbalanced", False, "synaug")
    elif 100 <= smallest and largest <= 1000:
        r = Recommendation("ce", longer(train, LONGER), f"ce, {LONGER}x the schedule",
                           f"balanced, {smallest} to {largest} images per class: image-guided variants of the training "
                           "images gained in the benchmark setting of that shape only through the optimiser steps they "
                           f"add; the same classifier trained {LONGER}x as long (the steps of variants of every image) "
                           "beat every one of them (TADA trained as long tied it)", "balanced-moderate", False, "tada")
    else:
        r = Recommendation("ce", randaugment_mixup(augment), "ce + RandAugment + Mixup",
                           f"balanced, {smallest} to {largest} images per class: no benchmark measures generated data "
                           "here; strong classical augmentation first", "balanced-other", False, None)
    r.evidence = [e.line() for e in EVIDENCE.get(r.rule, [])]
    if probe and probe.get("balanced_accuracy", 0) >= 0.98 and r.rule != "groups":
        r.remarks.append(f"the probe already reaches {100 * probe['balanced_accuracy']:.1f}% balanced accuracy after "
                         f"{probe['steps']} steps: little room for any method")
    if pool and r.rule == "few-labels":
        r.remarks.append(f"{pool} unlabelled images: FixMatch with RandAugment + Mixup on the labelled images tied "
                         "this at 5 labelled images per class (unstable across seeds) and beat it at 10 (the fewshot "
                         "suite in BENCHMARKS.md); recipe fixmatch with the same overrides is worth measuring with --seeds")
    elif pool and r.rule != "few-labels-pool":
        r.remarks.append(f"{profile['unlabeled_images']} unlabelled images: measure semi-supervised training on them "
                         "too (recipe fixmatch, or train.ssl=fixmatch under another recipe; dpt adds images generated "
                         "from the pseudo-labelled pool); the fewshot suite's tables in BENCHMARKS.md say where it paid")
    return r


def data_profile(task) -> dict:
    train = task.train
    counts = train.class_counts().tolist()
    order = sorted(range(len(counts)), key=lambda c: counts[c])
    images = train.images.float() / 255
    std = images.flatten(1).std(dim=1)
    return {
        "classes": train.num_classes, "images": len(train), "test_images": len(task.test),
        "unlabeled_images": len(task.unlabeled) if task.unlabeled is not None else 0,
        "image_size": list(train.image_size), "channels": train.channels,
        "class_counts": dict(zip(train.classes, counts)),
        "imbalance_ratio": max(counts) / max(1, min(counts)), "largest_count": max(counts), "smallest_count": min(counts),
        "smallest_classes": [(train.classes[c], counts[c]) for c in order[:3]],
        "channel_mean": images.mean(dim=(0, 2, 3)).tolist(), "channel_std": images.std(dim=(0, 2, 3)).tolist(),
        "blank_images": int((std < 2 / 255).sum()),
        "cells": cell_profile(train),
    }


def cell_profile(train: ImageDataset) -> dict | None:
    """The (class, group) cells' sizes, where the split has groups."""
    if train.groups is None or not len(train.groups):
        return None
    groups = len(train.group_names) if train.group_names else int(train.groups.max()) + 1
    labelled = train.labels >= 0
    counts = torch.bincount(train.labels[labelled] * groups + train.groups[labelled], minlength=train.num_classes * groups)
    return {"groups": groups, "cells": len(counts), "largest": int(counts.max()), "smallest": int(counts.min()),
            "mean": float(counts.float().mean()), "empty": int((counts == 0).sum())}


def _thumbnails(data: ImageDataset) -> torch.Tensor:
    x = data.images.float().mean(dim=1, keepdim=True) / 255
    return torch.nn.functional.interpolate(x, size=(16, 16), mode="area").flatten(1)


def duplicates(train: ImageDataset, test: ImageDataset, *, near: float = NEAR, sample: int = SAMPLE,
               seed: int = 0) -> dict:
    """Exact and near copies within the training split and between it and the test split."""
    train_hashes, test_hashes = train.image_hashes(), test.image_hashes()
    seen: dict[str, int] = {}
    for h in train_hashes:
        seen[h] = seen.get(h, 0) + 1
    exact_train = sum(n - 1 for n in seen.values() if n > 1)
    exact_test = sum(h in seen for h in test_hashes)
    g = torch.Generator().manual_seed(seed)
    thumbs_train, thumbs_test = _thumbnails(train), _thumbnails(test)
    near_train = near_test = 0
    sampled = False
    threshold = near * near * thumbs_train.shape[1]  # squared L2 of an RMS difference `near`
    for c in range(train.num_classes):
        idx = (train.labels == c).nonzero().flatten()
        if len(idx) > sample:
            idx, sampled = idx[torch.randperm(len(idx), generator=g)[:sample]], True
        a = thumbs_train[idx]
        d = torch.cdist(a, a).pow(2)
        d.fill_diagonal_(float("inf"))
        near_train += int(((d < threshold).any(dim=1)).sum())  # images with a near copy in the split
        b = thumbs_test[test.labels == c]
        if len(b) and len(a):
            near_test += int((torch.cdist(b, a).pow(2) < threshold).any(dim=1).sum())
    return {"exact_within_train": exact_train, "exact_train_test": exact_test,
            "near_within_train": near_train, "near_train_test": near_test, "near_rms": near,
            "near_sampled_per_class": sample if sampled else None}


def probe(task, config, *, steps: int = 300, progress: bool = False) -> dict:
    """A short training (`steps` optimiser steps of the run's classifier, balanced softmax):
    each class's test accuracy and TADA's slow-learnable share."""
    from .classify import evaluate, fit_classifier
    from .classify.evaluate import example_losses
    from .plan import slow_learnable

    cfg = replace(config.train, steps=steps, loss="balanced-softmax", refit_head=False, mix="none", sam_rho=0.0,
                  ssl="none")
    result = fit_classifier(task.train, cfg, seed=config.seed, progress=progress)
    metrics = evaluate(result.model, task.test, train_counts=task.train.class_counts())
    losses = example_losses(result.model, task.train)
    slow = slow_learnable(losses, seed=config.seed)
    per_class_slow = {name: float(slow[task.train.labels == c].float().mean()) if bool((task.train.labels == c).any())
                      else 0.0 for c, name in enumerate(task.train.classes)}
    hardest = sorted(metrics["per_class_accuracy"].items(), key=lambda kv: kv[1])[:3]
    return {"steps": steps, "epochs": len(result.history), "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
            "per_class_accuracy": metrics["per_class_accuracy"], "hardest_classes": hardest,
            "slow_learnable_share": float(slow.float().mean()), "slow_learnable_per_class": per_class_slow,
            "seconds": result.seconds}


def analyse(config, *, probe_steps: int = 300, progress: bool = False) -> dict:
    """The whole analysis of the configured data and split (loads the data; writes nothing)."""
    from .data import load_dataset
    from .task import make_task

    data = load_dataset(config.data.dataset, image_size=config.data.image_size, channels=config.data.channels,
                        cache_dir=config.data.cache_dir, defer_cache=True)
    task = make_task(data, config.split)
    data.save_cache()  # the checks passed: keep the decoded folder for the next command
    found = {"dataset": data.name, "split": asdict(config.split), "profile": data_profile(task),
             "duplicates": duplicates(task.train, task.test, seed=config.seed)}
    found["probe"] = probe(task, config, steps=probe_steps, progress=progress) if probe_steps > 0 else None
    found["recommendation"] = asdict(recommend(found["profile"], found["probe"], config.train.augment, config.train))
    return found


def resolve_auto(config, task) -> tuple[object, dict]:
    """`recipe: auto`: the config with the recommended recipe and its overrides applied, and
    the record of why (from the split's profile; no probe, so it costs nothing)."""
    import yaml

    found = recommend(data_profile(task), None, config.train.augment, config.train)
    sections = {}
    for item in found.overrides:  # section.key=value, validated by the section's own checks
        key, value = item.split("=", 1)
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = yaml.safe_load(value)
    resolved = replace(config, recipe=found.recipe,
                       **{s: replace(getattr(config, s), **values) for s, values in sections.items()})
    return resolved, {"recipe": found.recipe, "overrides": found.overrides, "rule": found.rule, "why": found.why,
                      "generative_expected": found.generative_expected, "evidence": found.evidence}


def summary_lines(found: dict) -> list[str]:
    """The analysis in a few plain lines."""
    p, d, r = found["profile"], found["duplicates"], found["recommendation"]
    lines = [f"{p['images']} training images in {p['classes']} classes ({p['channels']} x "
             f"{'x'.join(map(str, p['image_size']))}), {p['test_images']} test"
             + (f", {p['unlabeled_images']} unlabelled" if p["unlabeled_images"] else ""),
             f"imbalance ratio {p['imbalance_ratio']:.1f} (largest class {p['largest_count']}, smallest "
             + ", ".join(f"'{n}' {c}" for n, c in p["smallest_classes"]) + ")",
             f"duplicates: {d['exact_within_train']} exact and {d['near_within_train']} near within the training split; "
             f"{d['exact_train_test']} exact and {d['near_train_test']} near test images also in it",
             f"per channel mean {', '.join(f'{m:.3f}' for m in p['channel_mean'])}, std "
             f"{', '.join(f'{s:.3f}' for s in p['channel_std'])}; {p['blank_images']} blank images"]
    if p.get("cells"):
        c = p["cells"]
        lines.append(f"{c['groups']} groups: {c['cells']} (class, group) cells of {c['smallest']} to {c['largest']} "
                     f"images, {c['empty']} empty")
    if found.get("probe"):
        q = found["probe"]
        lines.append(f"probe ({q['steps']} steps, {q['epochs']} epochs): balanced accuracy "
                     f"{100 * q['balanced_accuracy']:.1f}%; hardest "
                     + ", ".join(f"'{c}' {100 * a:.0f}%" for c, a in q["hardest_classes"])
                     + f"; slow-learnable share {100 * q['slow_learnable_share']:.0f}%")
    lines.append(f"recommendation: {r['label']}" + (f" ({', '.join(r['overrides'])})" if r["overrides"] else "")
                 + f": {r['why']}")
    lines.append("a generative recipe is expected to beat the classical baseline here" if r["generative_expected"] else
                 "no generative recipe is expected to beat the classical baseline here"
                 + (f" (measure {r['try_generative']} against it with --seeds if you want to know)"
                    if r["try_generative"] else ""))
    lines += [f"  evidence: {e}" for e in r["evidence"]]
    lines += [f"  note: {m}" for m in r["remarks"]]
    return lines
