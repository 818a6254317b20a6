"""Selection and validation as pipeline stages.

`select_stage` replaces `generate_stage` in a recipe: it generates `select.overgenerate` x
the plan's images per (class, group) cell, scores the candidates with a scorer (a
classifier trained on the real training split with balanced softmax, so that a long tail
does not bias it; with groups, on batches that draw each (class, group) cell equally, so that
it reads the class and not the group; cached in the store), keeps as many per cell as the
plan asked for with the chosen selector, and records each candidate's score and whether it
was kept in the store's metadata (`select_<method>`, `selected_<method>`). With groups and
`select.read_groups`, a group reader (the same classifier trained to tell the groups apart,
each (group, class) cell drawn equally) first drops the candidates it reads as another group
than the one they were generated for (`group_read` in the metadata): a minority cell's image
in the majority's colour teaches the spurious rule again.

With `select.boundary` (> 0), the kept images are then moved towards the boundary of
the rival class they are nearest to confusing with (the highest other logit) under the same
scorer (DBG, `select/boundary.py`), in the run only. The selection's and the push's seconds
are reported apart from the generation's (`stage_seconds`).

`validation_stage` measures a run's synthetic set against the real training images: the
feature-space metrics of `select/metrics.py`, the memorisation ratio, and the accuracy on
the real test set of a classifier trained on the synthetic images alone (CAS).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..classify import evaluate, fit_classifier
from ..classify.evaluate import predict_logits
from ..classify.models import Classifier
from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..generate.stage import generate_stage
from ..plan import plan_cells, row_seed
from ..store import SyntheticStore
from ..utils.io import atomic_write_json, exclusive
from ..utils.keys import key_dict
from ..utils.runtime import resolve_device
from .boundary import boundary_push
from .features import feature_extractor
from .filters import Candidates, get_selector
from .metrics import memorization_ratio, set_metrics


def overgenerate_plan(plan: list[dict], factor: float) -> list[dict]:
    """The plan's rows plus copies (ids `<id>~<j>`, their own seeds) so that each (class,
    group) cell has ceil(factor x its rows) candidates. The original rows come first and keep
    their ids, so a store filled without selection is reused."""
    if factor < 1:
        raise SynthaugError(f"select.overgenerate must be >= 1, got {factor}")
    out = list(plan)
    for rows in plan_cells(plan).values():
        for n in range(len(rows), math.ceil(round(factor * len(rows), 9))):
            row, j = rows[n % len(rows)], n // len(rows)
            copy_id = f"{row['id']}~{j}"
            out.append({**row, "id": copy_id, "seed": row_seed(row["seed"], copy_id)})
    return out


def scorer_settings(real: ImageDataset, config, seed: int) -> tuple:
    """The scorer's training settings on `real` at `seed`, and their key (the folder it is kept
    under, known before it trains)."""
    grouped = real.groups is not None
    train_cfg = replace(config.train, loss="ce" if grouped else "balanced-softmax", sampler="uniform", mix="none",
                        group_method="balanced-sampling" if grouped else "none", group_dro_balanced=False,
                        refit_head=False, ssl="none",
                        epochs=config.select.scorer_epochs or config.train.epochs,
                        steps=None if config.select.scorer_epochs else config.train.steps)
    key = hashlib.sha256(json.dumps([real.fingerprint(), key_dict(train_cfg), seed], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    return train_cfg, key


def scorer_for(real: ImageDataset, config, folder: Path, *, seed: int | None = None,
               progress: bool = False) -> Classifier:
    """The classifier that scores candidates: trained on the real split with balanced softmax
    (with groups: cross-entropy on cell-balanced batches, which balance the classes too), the
    run's other training settings, at `seed` (default: the run's), saved under
    `folder/<fingerprint>/` and reused."""
    seed = config.seed if seed is None else seed
    train_cfg, key = scorer_settings(real, config, seed)
    target, checkpoint = folder / key, folder / f"{key}-checkpoint"  # the checkpoint: gone once the scorer is saved
    with exclusive(folder / f"{key}.lock"):  # cells side by side that need the same scorer train it once
        if (target / "model.safetensors").exists() and (target / "config.json").exists():
            layout = torch.channels_last if train_cfg.channels_last else torch.contiguous_format  # as trained
            model = Classifier.from_pretrained(target).to(resolve_device(config.train.device), memory_format=layout)
            shutil.rmtree(checkpoint, ignore_errors=True)  # only once the scorer it protects has loaded
            return model
        result = fit_classifier(real, train_cfg, seed=seed, checkpoint_dir=checkpoint, progress=progress)
        result.model.save_pretrained(target)
        shutil.rmtree(checkpoint, ignore_errors=True)
        return result.model


def group_reader_for(real: ImageDataset, config, folder: Path, *, progress: bool = False) -> Classifier:
    """A classifier of the groups: `scorer_for` on the real split with labels and groups
    swapped, so each (group, class) cell is drawn equally and the class cannot stand in for
    the group."""
    names = real.group_names or [f"group {g}" for g in range(int(real.groups.max()) + 1)]
    swapped = ImageDataset(real.images, real.groups, list(names), groups=real.labels, group_names=list(real.classes),
                           name=f"{real.name} groups")
    return scorer_for(swapped, config, folder, progress=progress)


def select_stage(plan: list[dict], generator, config, store_dir: str | Path, real: ImageDataset, *,
                 progress: bool = False) -> tuple[ImageDataset, dict]:
    """Generate, then select, then push (see the module docstring); without a selection method
    or a push this is `generate_stage`. Returns the kept images and a description (counts, seconds, scores)."""
    opts = config.select
    if opts.method == "none" or not plan:
        kept, info = generate_stage(plan, generator, config, store_dir, real, progress=progress)
    else:
        kept, info = _select(plan, generator, config, store_dir, real, progress=progress)
    if opts.boundary and len(kept):
        kept, info["boundary"] = push_stage(kept, config, store_dir, real, progress=progress)
    return kept, info


def stage_seconds(info: dict) -> dict[str, float]:
    """A recipe's seconds from `select_stage`'s description: `generate` (taken out of it), and
    `select`, the selection's and the push's (their scorer's training included), where it did either."""
    spent = [info[k]["seconds"] for k in ("selection", "boundary") if k in info]
    return {"generate": info.pop("seconds"), **({"select": sum(spent)} if spent else {})}


def push_stage(kept: ImageDataset, config, store_dir: str | Path, real: ImageDataset, *,
               progress: bool = False) -> tuple[ImageDataset, dict]:
    """DBG's boundary push (`select/boundary.py`) of the kept images under the scorer. The push
    depends on the scorer, so on the classifier seed: it is redone in each run and kept in the
    run's description (margins, how many moved), never in the store, whose images stay as
    generated for every run that shares it."""
    t0 = time.perf_counter()
    scorer = scorer_for(real, config, Path(store_dir) / "scorers", progress=progress)
    images, found = boundary_push(scorer, kept.images, kept.labels, config.select.boundary)
    moved = found["pushed"]
    ratio = found["margin_after"][moved] / found["margin_before"][moved]
    info = {"push": config.select.boundary, "images": len(kept), "pushed": int(moved.sum()),
            "margin_before": float(found["margin_before"].median()),
            "margin_after": float(found["margin_after"].median()),
            "margin_ratio": float(ratio.median()) if moved.any() else None,
            "pixel_change": float((images.float() - kept.images.float()).abs().mean() / 255),
            "seconds": time.perf_counter() - t0}
    return replace(kept, images=images, info=dict(kept.info)), info


def generated_rows(plan: list[dict], config) -> list[dict]:
    """The rows `select_stage` generates for `plan`: the plan, and with a selection method its
    over-generated candidates (what a recipe's store check looks for before anything trains)."""
    return plan if config.select.method == "none" else overgenerate_plan(plan, config.select.overgenerate)


def _select(plan: list[dict], generator, config, store_dir: str | Path, real: ImageDataset, *,
            progress: bool = False) -> tuple[ImageDataset, dict]:
    opts = config.select
    candidates_plan = generated_rows(plan, config)
    candidates, info = generate_stage(candidates_plan, generator, config, store_dir, real, progress=progress)
    t0 = time.perf_counter()
    selector = get_selector(opts.method)
    cache = {}

    def lazy(name, fn):  # the scorer, probabilities and features only when a selector asks for them
        return lambda: cache[name] if name in cache else cache.setdefault(name, fn())

    scorer = lazy("scorer", lambda: scorer_for(real, config, Path(store_dir) / "scorers", progress=progress))
    extract = lazy("extract", lambda: feature_extractor(
        opts.features, classifier=scorer() if opts.features == "classifier" else None, device=config.train.device))
    probs = lazy("probs", lambda: predict_logits(scorer(), candidates.images).softmax(1))
    features = lazy("features", lambda: extract()(candidates.images))
    real_features = lazy("real", lambda: extract()(real.images))
    groups = candidates.groups if candidates.groups is not None else torch.zeros(len(candidates), dtype=torch.long)
    read = torch.ones(len(candidates), dtype=torch.bool)  # the group reader agrees (or there is none)
    reading = opts.read_groups and candidates.groups is not None and real.groups is not None
    if reading:
        reader = group_reader_for(real, config, Path(store_dir) / "scorers", progress=progress)
        read = predict_logits(reader, candidates.images).argmax(1) == candidates.groups
    planned = {}
    for row in plan:
        cell = (int(row["label"]), row.get("group") if candidates.groups is not None else None)
        planned[cell] = planned.get(cell, 0) + 1
    mask, scores = torch.zeros(len(candidates), dtype=torch.bool), torch.zeros(len(candidates))
    for group in groups.unique().tolist():
        members = torch.nonzero((groups == group) & read).flatten()
        view = Candidates(labels=candidates.labels[members], probs=lambda m=members: probs()[m],
                          features=lambda m=members: features()[m], real_features=real_features, real_labels=real.labels)
        keep = {c: n for (c, cell_group), n in planned.items() if cell_group in (None, group)}
        m, s = selector(view, keep, threshold=opts.threshold, k=opts.k, clusters=opts.clusters, seed=config.seed)
        mask[members], scores[members] = m, s.float()
    ids = [r["id"] for r in candidates.info["rows"]]
    SyntheticStore(store_dir, real.classes).set_scores(
        {i: {f"select_{opts.method}": float(s), f"selected_{opts.method}": bool(k)} | ({"group_read": bool(r)} if reading else {})
         for i, s, k, r in zip(ids, scores, mask, read)})
    kept = candidates.subset(torch.nonzero(mask).flatten())
    kept.info["rows"] = [r for r, k in zip(candidates.info["rows"], mask) if k]
    shortfall = len(plan) - int(mask.sum())
    info.update({
        "selection": {"method": opts.method, "overgenerate": opts.overgenerate, "candidates": len(candidates),
                      "group_misread": int((~read).sum()) if reading else None, "kept": int(mask.sum()),
                      "shortfall": shortfall, "features": str(opts.features),
                      "kept_score_mean": float(scores[mask].mean()) if mask.any() else None,
                      "dropped_score_mean": float(scores[~mask].mean()) if (~mask).any() else None,
                      "seconds": time.perf_counter() - t0},
        "planned": len(plan),
        "images": int(mask.sum()),
    })
    return kept, info


def matched_per_class(real: ImageDataset, synthetic: ImageDataset, cap: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Both sets cut to the same count per class (the smaller of the two, at most `cap`), over
    the classes both have: the set metrics then compare images, not class proportions (a
    uniformizing plan is tailed the other way from the real split)."""
    g = torch.Generator().manual_seed(seed)
    picks = ([], [])
    for c in range(real.num_classes):
        members = [torch.nonzero(ds.labels == c).flatten() for ds in (real, synthetic)]
        n = min(cap, *(len(m) for m in members))
        for pick, m in zip(picks, members):
            if n:
                pick.append(m[torch.randperm(len(m), generator=g)[:n]])
    return tuple(ds.subset(torch.cat(p) if p else []) for ds, p in zip((real, synthetic), picks))


def validation_stage(task, synthetic: ImageDataset, config, classifier: Classifier | None, *,
                     workdir: str | Path, progress: bool = False) -> dict:
    """Every validation metric of `synthetic` against the real training split (see the module
    docstring); the feature-space metrics see both sets cut to the same count per class
    (`matched_per_class`, at most `validate.max_per_class`). Written to
    `<workdir>/validation.json` and reused while its inputs (both sets, the classifier, the
    options) are the same. Too small a set gives `{"skipped": why}`."""
    opts = config.validate
    skip = validation_skip(task, synthetic, config)
    if skip:
        return {"skipped": skip}
    done, checkpoint = Path(workdir) / "validation.json", Path(workdir) / "cas-checkpoint"  # ours: gone once done
    key = validation_key(task, synthetic, config, classifier)
    if done.exists():
        try:
            previous = json.loads(done.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            previous = {}
        # one written before CAS had its classes is done again
        if previous.get("key") == key and not (opts.cas and "per_class" not in previous.get("cas", {})):
            shutil.rmtree(checkpoint, ignore_errors=True)
            return previous
    t0 = time.perf_counter()
    real, fake = matched_per_class(task.train, synthetic, opts.max_per_class, config.seed)
    extract = feature_extractor(opts.features, classifier=classifier, device=config.train.device)
    out = {"features": str(opts.features), "real_images": len(real), "synthetic_images": len(fake),
           **set_metrics(extract(real.images), extract(fake.images), real.labels, fake.labels, k=opts.k,
                         density_k=opts.density_k, seed=config.seed)}
    heldout = task.val if task.val is not None else task.test
    out["memorization"] = memorization_ratio(synthetic, task.train, heldout)
    if opts.cas:
        # train on synthetic only, test on the real test images of the classes it has
        result = fit_classifier(synthetic, replace(config.train, ssl="none"), seed=config.seed,
                                checkpoint_dir=checkpoint,
                                progress=progress)
        present = synthetic.class_counts() > 0
        test = task.test.subset(torch.nonzero(present[task.test.labels]).flatten())
        metrics = evaluate(result.model, test)
        out["cas"] = {"accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
                      "classes": int(present.sum()), "per_class": metrics["per_class_accuracy"]}
    out["seconds"] = time.perf_counter() - t0
    out["key"] = key
    atomic_write_json(done, out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def validation_skip(task, synthetic: ImageDataset | None, config) -> str | None:
    """Why `synthetic` cannot be validated (too few images), or None."""
    if synthetic is None or not len(synthetic):
        return "the run kept no synthetic images"
    _, fake = matched_per_class(task.train, synthetic, config.validate.max_per_class, config.seed)
    # a k-NN manifold needs more than k samples; the domain classifier 5 folds
    if len(fake) < max(config.validate.k + 1, config.validate.density_k + 1, 5):
        return f"{len(fake)} synthetic images in classes the real split has: too few for the set metrics"
    return None


def validation_key(task, synthetic: ImageDataset, config, classifier: Classifier | None) -> str:
    """Names a validation's inputs: the synthetic and real sets, the classifier's weights,
    the validation options, the training settings of CAS and the seed."""
    h = hashlib.sha256(json.dumps([synthetic.fingerprint(), task.train.fingerprint(), task.test.fingerprint(),
                                   asdict(config.validate), key_dict(config.train), config.seed], default=str).encode())
    if classifier is not None:
        for name, tensor in sorted(classifier.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
