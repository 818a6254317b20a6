"""BENCHMARKS.md's method tables, from `synthaug bench` results: each shipped suite's folder
under benchmarks/results/bench/ gets its leaderboard rewritten from its results.jsonl, and each
setting's table is spliced into BENCHMARKS.md between <!-- bench:<suite>:<setting>:start/end -->
(a setting without those markers, one still running, is left out).

    python benchmarks/tables.py          # make bench-tables

Run a suite into its folder first (it resumes; finished cells are never redone), e.g.
    synthaug bench longtail-small --out benchmarks/results/bench/longtail-small
"""

from __future__ import annotations

import json

from common import HERE, splice

from synthaug.bench import load_suite, read_results, write_leaderboard
from synthaug.bench.leaderboard import generator_training, setting_tables
from synthaug.utils.io import atomic_write_text

SUITES = ["longtail-small", "targeted-small", "fewshot-small", "cifar10-gpu", "longtail", "fewshot"]
# suites whose rows are also kept flat, one JSON object per cell (the issues' format)
EXPORTS = {"longtail": "longtail.jsonl", "fewshot": "fewshot.jsonl"}
FLAT = ("accuracy", "balanced_accuracy", "few_shot_accuracy", "worst_class_accuracy", "worst_group_accuracy")


def backfill(rows: list[dict], out) -> bool:
    """Rows written before rows carried these get them from their cell's metrics.json (when the
    cell's folder is here): the accuracy-against-steps curve; a replay control's images counted as
    replayed, not generated; the generator's whole training time as it records it (rows carried it
    only in the cell that trained it, and of a resumed training only that run's part), and where that
    folder is gone, the time another row recorded for the same generator. Returns whether any row
    changed."""
    changed = False
    for row in rows:
        found = out / row.get("run", "-") / "metrics.json"
        if not (row.get("run") and found.exists()):
            continue
        metrics = json.loads(found.read_text())
        if "curve" not in row and (curve := metrics.get("curve")):
            row["curve"], changed = curve, True
        if "images_replayed" not in row and (metrics.get("synthetic") or {}).get("replay"):
            row["images_replayed"], row["images_generated"], changed = row["images_generated"], 0, True
        trained = (metrics.get("generator") or {}).get("train_seconds")
        if row.get("generator") and trained and row.get("generator_train_seconds") != trained:
            row["generator_train_seconds"], changed = trained, True
    # a generator is one generator in every setting: a row without its time takes the longest any row recorded
    known = generator_training(rows)
    for row in rows:
        if row.get("generator") in known and not row.get("generator_train_seconds"):
            row["generator_train_seconds"], changed = known[row["generator"]], True
    return changed


def flat(row: dict) -> dict:
    curve = row.get("curve")
    return {"setting": row["setting"], "method": row["recipe"], "seed": row["seed"],
            "generator_seed": row["generator_seed"], **{k: row["metrics"].get(k) for k in FLAT},
            "synthetic_images": row["images_generated"],
            "replayed_images": row.get("images_replayed", 0), "unseen_images": row.get("images_unseen", 0), "seconds": row["seconds"], "wall_seconds": row.get("wall_seconds"),
            "device": row.get("device"), "commit": row.get("commit"), **({"curve": curve} if curve else {})}


def main():
    for name in SUITES:
        out = HERE / "results" / "bench" / name
        suite, rows = load_suite(name), read_results(out)
        if not rows:
            print(f"{name}: no results in {out}: skipped")
            continue
        if backfill(rows, out) and not (out / ".synthaug-bench.lock").exists():
            atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        write_leaderboard(suite, rows, out)
        document = (HERE.parent / "BENCHMARKS.md").read_text()
        for setting, table in setting_tables(suite, rows).items():
            key = f"bench:{name}:{setting}"
            if f"<!-- {key}:start -->" in document:  # a setting appears once BENCHMARKS.md has its place
                splice(HERE.parent / "BENCHMARKS.md", key, table.strip())
        if name in EXPORTS:
            (HERE / "results" / EXPORTS[name]).write_text("".join(json.dumps(flat(r)) + "\n" for r in rows))
        print(f"{name}: {len(rows)} of {len(suite.cells_)} cells -> {out / 'leaderboard.md'}")


if __name__ == "__main__":
    main()
