"""Behaviour unchanged across refactors: short same-seed runs of every generative recipe
give the images and metrics recorded before the refactor (`data/unchanged.json`).

Re-record only when a change is meant to alter results, and say so in the commit:
`SYNTHAUG_RECORD=1 python -m pytest tests/test_unchanged.py` (it adds or replaces this machine
kind's record). A record holds on the machine kind and torch version it was made with
(floating-point kernels differ elsewhere); on a kind without one, the test is skipped with a
line saying why."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from synthaug.config import load_config
from synthaug.runs import train_run
from synthaug.utils.runtime import machine_kind as machine

RECORD = Path(__file__).parent / "data" / "unchanged.json"
TINY = ["data.dataset=digits", "generator.precision=float32", "train.precision=float32", "train.channels_last=false",
        "train.epochs=2", "train.batch_size=32", "train.augment=none", "generator.preset=tiny",
        "generator.steps=6", "generator.batch_size=8", "generator.sampling_steps=3", "generator.sampling_batch_size=64",
        "report.html=false", "report.baselines=[]"]
RUNS = {
    "synaug": ["recipe=synaug", "split.ratio=8", "select.method=confidence", "select.overgenerate=1.5"],
    "tada": ["recipe=tada", "split.kind=few-shot", "split.k=20", "tada.early_epochs=1", "tada.variants=2"],
    "augcond": ["recipe=augcond", "split.kind=few-shot", "split.k=5", "augcond.expand=3", "augcond.embed_dim=8"],
    "utilgen": ["recipe=utilgen", "split.kind=few-shot", "split.k=10", "split.val_per_class=3", "utilgen.rounds=2",
                "utilgen.valuation_epochs=1", "utilgen.embedding_steps=4", "utilgen.dpo_steps=4",
                "utilgen.sampling_steps=4", "utilgen.final_multiple=2"],
}


def observe(run_dir: Path, metrics: dict) -> dict:
    """What must not change: every stored image (pixels, by id) and the test metrics."""
    from synthaug.store import SyntheticStore

    store = SyntheticStore(metrics["synthetic"]["store"], metrics["task"]["train"]["class_counts"].keys())
    images = store.load()
    pixels = {row["id"]: hashlib.sha256(images.images[i].numpy().tobytes()).hexdigest()[:16]
              for i, row in enumerate(images.info["rows"])}
    test = metrics["test"]
    return {"images": dict(sorted(pixels.items())), "generator": metrics["generator"]["fingerprint"],
            "accuracy": round(test["accuracy"], 6), "balanced_accuracy": round(test["balanced_accuracy"], 6),
            "per_class": {k: round(v, 6) for k, v in test["per_class_accuracy"].items()}}


@pytest.mark.parametrize("recipe", list(RUNS))
def test_same_seed_runs_give_the_recorded_images_and_metrics(recipe, tmp_path):
    records = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    kind = machine()
    if not os.environ.get("SYNTHAUG_RECORD") and kind not in records:
        pytest.skip(f"recorded on {', '.join(records) or 'no machine'}; this is {kind}")
    config = load_config(None, [*TINY, *RUNS[recipe], f"output_dir={tmp_path}"])
    run_dir, metrics = train_run(config, progress=False, compare=True)
    seen = observe(run_dir, metrics)
    if os.environ.get("SYNTHAUG_RECORD"):
        records[kind] = {**records.get(kind, {}), recipe: seen}
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        return
    want = records[kind][recipe]
    assert seen["images"].keys() == want["images"].keys()
    changed = [i for i in want["images"] if seen["images"][i] != want["images"][i]]
    assert not changed, f"{len(changed)} of {len(want['images'])} images changed, e.g. {changed[:3]}"
    assert seen == want
