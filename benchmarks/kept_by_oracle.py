"""How the oracle reads what a selection kept and dropped (issue 21, session 55).

    python benchmarks/kept_by_oracle.py "synaug, replay share 0.5, hard filter"

For a longtail row with `select.method` set (MNIST-5k-LT r50), every store its cells used: each
candidate's group (kept; dropped; for the `hard` selector, dropped with the scorer under 50% sure of
its class, which are the ones it misread wherever no kept image is that unsure) by the store's
recorded selection (the last classifier seed's), and the share of each group the oracle (a
classifier trained on the full balanced training set) reads as its class, over every class and over
the tail (the classes under 4% of the largest); and per store, its candidates' share on each tail
class. Prints; writes only the oracle into the benchmarks' cache the first time
(`common.trained_oracle`).
"""

from __future__ import annotations

import argparse
import json

from common import HERE, trained_oracle

from synthaug.classify.evaluate import predict_logits
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.splits import shot_thresholds
from synthaug.store import SyntheticStore
from synthaug.task import make_task

SETTING = ["data.dataset=mnist-5k", "split.kind=long-tail", "split.ratio=50", "train.epochs=30"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", help="the longtail row's label")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (HERE / "results" / "bench" / "longtail" / "results.jsonl").open()]
    cells = [r for r in rows if r["setting"] == "MNIST-5k-LT r50" and r["recipe"] == args.row]
    method = cells[0]["settings"]["select.method"] if cells else "none"
    if method == "none":
        raise SystemExit(f"no MNIST-5k-LT cell of '{args.row}' selects its images")
    stores = {}  # store -> the generator seed that made it
    for c in cells:
        metrics = json.loads((HERE / "results" / "bench" / "longtail" / c["run"] / "metrics.json").read_text())
        stores[metrics["synthetic"]["store"]] = c["generator_seed"]
    config = load_config(None, SETTING)
    task = make_task(load_dataset(config.data.dataset), config.split)
    oracle = trained_oracle(task.oracle, config.train)
    counts = task.train.class_counts()
    tail = set((counts < shot_thresholds(int(counts.max()))[1]).nonzero().flatten().tolist())
    read = {}
    per_store = []
    for folder, generator_seed in sorted(stores.items(), key=lambda item: item[1]):
        store = SyntheticStore(HERE.parent / folder, task.train.classes)
        made = store.rows()
        images = store.load([r["id"] for r in made])
        right = (predict_logits(oracle, images.images).argmax(1) == images.labels).tolist()
        on_tail = {c: [ok for row, ok in zip(made, right) if row["label"] == c] for c in sorted(tail)}
        per_store.append(f"  generator seed {generator_seed}: every candidate {100 * sum(right) / len(right):.1f}% read "
                         "as its class; " + ", ".join(f"class {c} {100 * sum(v) / max(1, len(v)):.0f}%"
                                                       for c, v in on_tail.items()))
        for row, ok in zip(made, right):
            scores = row["scores"]
            group = ("kept" if scores[f"selected_{method}"] else
                     "dropped, under 50% sure" if method == "hard" and scores["select_hard"] > 0.5 else "dropped")
            for scope in ("every class", "tail") if row["label"] in tail else ("every class",):
                for name in (group, "every candidate"):
                    read.setdefault((scope, name), []).append(ok)
    print(f"{args.row}: {len(stores)} stores, select.method={method}, tail = {sorted(tail)}")
    print("\n".join(per_store))
    for (scope, group), oks in sorted(read.items()):
        print(f"  {scope:12s} {group:22s} {len(oks):6d} images, the oracle reads {100 * sum(oks) / len(oks):.1f}% as their class")


if __name__ == "__main__":
    main()
