"""Diff-Mix's inter-class translation (`synaug.translate`), judged image by image: the longtail
suite's translated stores on MNIST-5k-LT r50 (each SYNAuG row with `synaug.translate`, one store
per generator seed and strength), read by a classifier trained on the full balanced training set
(the oracle). For each store: the share of the translated images it reads as the class they were
made for (the label they are trained on at weight strength^gamma), as the class of the real image
they started from, or as another class, overall and on the tail (classes 8 and 9); and the same
oracle on the replay share's plain generated images of the same generator, the images translation
replaces.

    python benchmarks/translation.py      # after the suite's translated rows ran; rows in results/translation.jsonl

A store already judged (same folder and images) is skipped; the table is printed and spliced into
BENCHMARKS.md (`translation` markers). Then the test confusions of the tail (8's and 9's recall, and how
many test images of the other classes each reads as 8 or 9) of the classifiers that the suite's cells kept,
translated at 0.9 against the boundary push 0.5 on the replay share's images (its own classifiers are gone),
rows in results/translation_confusions.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import HERE, append_row, environment, read_rows, splice, trained_oracle

from synthaug.classify.evaluate import predict_logits
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.store import SyntheticStore
from synthaug.task import make_task

RESULTS = HERE / "results" / "translation.jsonl"
CONFUSIONS = HERE / "results" / "translation_confusions.jsonl"
COMPARED = ["synaug, replay share 0.5, boundary push 0.5", "synaug, replay share 0.5, translated 0.9"]
SUITE = HERE / "results" / "bench" / "longtail"
SETTING = ["data.dataset=mnist-5k", "split.kind=long-tail", "split.ratio=50", "train.epochs=30"]
PREFIX = "MNIST-5k-LT_r50-synaug-"
TAIL = (8, 9)


def judge(oracle, store: Path, real, classes, selected: str | None = None) -> dict:
    """The oracle's reading of a store's generated rows: translated rows (with a source) if it
    has any, else its plain rows; with `selected` (a selector's metadata column, `selected_<method>`),
    only the rows that selector kept, as the last run that scored the store left them."""
    images = SyntheticStore(store, classes).load()
    rows = images.info["rows"]
    translated = torch.tensor([r.get("source") is not None for r in rows])
    kind = "translated" if translated.any() else "plain"
    keep = translated.clone() if translated.any() else torch.ones(len(rows), dtype=torch.bool)
    kind += suffix(rows, selected)
    if selected:
        keep &= torch.tensor([bool((r.get("scores") or {}).get(selected)) for r in rows])
    labels = images.labels[keep]
    read = predict_logits(oracle, images.images[keep]).argmax(1)
    tail = torch.isin(labels, torch.tensor(TAIL))
    row = {"store": store.name, "generator": rows[0].get("generator"), "kind": kind, "images": int(keep.sum()),
           "candidates": len(rows),
           "class_read": float((read == labels).float().mean()),
           "tail_class_read": float((read[tail] == labels[tail]).float().mean()) if tail.any() else None}
    if translated.any() and keep.any():
        picked = [r for r, k in zip(rows, keep.tolist()) if k]
        sources = real.labels[[r["source"] for r in picked]]
        strengths = sorted({r["strength"] for r in picked})
        row.update(strength=strengths[0] if len(strengths) == 1 else strengths,
                   source_read=float((read == sources).float().mean()),
                   tail_source_read=float((read[tail] == sources[tail]).float().mean()) if tail.any() else None)
    return row


def suffix(rows: list[dict], selected: str | None) -> str:
    """What part of a store a row judges: where a selector scored it, every candidate or the kept ones."""
    if selected:
        return ", kept by the " + selected.removeprefix("selected_") + " filter"
    return ", every candidate" if any(k.startswith("selected_") for r in rows for k in r.get("scores") or {}) else ""


def confusions(recipe: str, test) -> dict | None:
    """The mean test confusion (per 100 test images of a class) of a recipe's MNIST-5k-LT classifiers
    that are still in their cells, summed up for the tail."""
    from synthaug.classify.models import Classifier

    made, cells = torch.zeros(10, 10), 0
    for r in read_rows(SUITE / "results.jsonl"):
        folder = SUITE / str(r.get("run")) / "classifier"
        if r["recipe"] == recipe and r["setting"] == "MNIST-5k-LT r50" and (folder / "model.safetensors").exists():
            read = predict_logits(Classifier.from_pretrained(folder).eval(), test.images).argmax(1)
            made += torch.bincount(test.labels * 10 + read, minlength=100).reshape(10, 10).float()
            cells += 1
    if not cells:
        return None
    made = 100 * made / cells / test.class_counts().float()[:, None]
    return {"recipe": recipe, "cells": cells,
            "recall": {c: round(float(made[c, c]), 2) for c in TAIL},
            "misread_as": {c: {j: round(float(made[c, j]), 2) for j in range(10) if j != c and made[c, j] > 0}
                           for c in TAIL},
            "others_read_as": {c: round(float(made[:, c].sum() - made[c, c]) / 9, 2) for c in TAIL}}


def table(rows: list[dict]) -> str:
    lines = ["MNIST-5k-LT r50, the suite's stores: the generated images of the replay share's rows (plain) and of its "
             "translated rows, read by the oracle; mean over the generator seeds (n).", "",
             "| images | n | images judged per store (mean) | read as their class | tail: as their class | read as their source's class "
             "| tail: as their source's |", "|---|---|---|---|---|---|---|"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        name = r["kind"] if r["kind"] == "plain" else f"translated at {r['strength']}" + r["kind"].removeprefix("translated")
        groups.setdefault(name, []).append(r)

    def pct(key, mine):
        values = [r[key] for r in mine if r.get(key) is not None]
        return f"{100 * statistics.fmean(values):.1f}%" if values else "-"

    for name, mine in sorted(groups.items()):
        lines.append(f"| {name} | {len(mine)} | {statistics.fmean(r['images'] for r in mine):.0f} | {pct('class_read', mine)} | "
                     f"{pct('tail_class_read', mine)} | {pct('source_read', mine)} | {pct('tail_source_read', mine)} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain", nargs="*", default=["MNIST-5k-LT_r50-synaug-a5a87d6c37ef",
                                                       "MNIST-5k-LT_r50-synaug-e035bd60f1b7"],
                        help="the replay share's stores (plain generated images) to judge beside them")
    args = parser.parse_args()
    config = load_config(None, SETTING)
    task = make_task(load_dataset(config.data.dataset), config.split)
    done = {(r["store"], r.get("candidates", r["images"]), r["kind"]) for r in read_rows(RESULTS)}
    stores = [p for p in sorted((SUITE / "stores").glob(f"{PREFIX}*")) if (p / "train" / "metadata.jsonl").exists()]
    oracle = None
    for store in stores:
        rows = SyntheticStore(store, task.train.classes).rows()
        translated = any(r.get("source") is not None for r in rows)
        if not translated and store.name not in args.plain:
            continue
        for selected in [None, *sorted({k for r in rows for k in r.get("scores") or {} if k.startswith("selected_")})]:
            kind = ("translated" if translated else "plain") + suffix(rows, selected)
            if (store.name, len(rows), kind) in done:
                continue
            if oracle is None:
                oracle = trained_oracle(task.oracle, config.train)
            row = judge(oracle, store, task.train, task.train.classes, selected)
            append_row(RESULTS, {**row, **environment()})
            print(f"{store.name}: {row['kind']} {row.get('strength', '')}, read as their class "
                  f"{100 * row['class_read']:.1f}%", flush=True)
    text = table(read_rows(RESULTS))
    print(text)
    splice(HERE.parent / "BENCHMARKS.md", "translation", text)
    if not read_rows(CONFUSIONS):
        for recipe in COMPARED:
            row = confusions(recipe, task.test)
            if row is not None:
                append_row(CONFUSIONS, {**row, **environment()})
    for row in read_rows(CONFUSIONS):
        print(f"{row['recipe']} ({row['cells']} classifiers): tail recall {row['recall']}, other classes' test "
              f"images read as each tail class per 100 of a class {row['others_read_as']}")


if __name__ == "__main__":
    main()
