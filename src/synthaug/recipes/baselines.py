"""The classical baselines every generative recipe must beat (no synthetic data).

Each is a change to the training config, which data it trains on, and an optional step
after training. `trained` (a dict) lets a benchmark share one trained model between the
baselines that train identically (ce, crt, posthoc-la)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..classify import evaluate, fit_classifier, refit_head
from ..errors import SynthaugError
from .registry import RecipeResult, classifier_inputs, register_recipe


@dataclass(frozen=True)
class Baseline:
    train_overrides: dict = field(default_factory=dict)
    data: str = "train"  # "train" (the split) or "oracle" (the full balanced training set)
    after: str | None = None  # "refit" (cRT) or "posthoc" (post-hoc logit adjustment)


BASELINES = {
    "ce": ("cross-entropy, uniform sampling", Baseline()),
    "class-balanced": ("class-balanced sampling (each class drawn equally often)", Baseline({"sampler": "class-balanced"})),
    "logit-adjusted": ("logit-adjusted loss, strength train.tau (Menon et al. 2021)", Baseline({"loss": "logit-adjusted"})),
    "balanced-softmax": ("Balanced Softmax: logit-adjusted loss at tau=1 (Ren et al. 2020)", Baseline({"loss": "balanced-softmax"})),
    "drw": ("deferred re-weighting: cross-entropy, class-weighted from 80% of the epochs on (Cao et al. 2019)",
            Baseline({"drw_start": 0.8})),
    "posthoc-la": ("cross-entropy, then post-hoc logit adjustment (eval.posthoc_tau)", Baseline(after="posthoc")),
    "crt": ("cRT: cross-entropy, then the head re-fit class-balanced (Kang et al. 2020)", Baseline(after="refit")),
    "oracle": ("the full balanced real training set: the upper bound for generated data", Baseline(data="oracle")),
    # with an unlabelled pool (few-shot): semi-supervised training, the classical answer to few labels
    "fixmatch": ("FixMatch on the unlabelled pool: weak-view pseudo-labels above train.ssl_threshold train the "
                 "strong view (Sohn et al. 2020)", Baseline({"ssl": "fixmatch"})),
    "freematch": ("FixMatch with FreeMatch's self-adaptive threshold (Wang et al. 2023)", Baseline({"ssl": "freematch"})),
    # with groups (a coloured split): the classical answers to group imbalance and spurious correlation
    "group-balanced": ("each (class, group) cell drawn equally often", Baseline({"group_method": "balanced-sampling"})),
    "group-reweighted": ("each image's loss weighted by 1 / its (class, group) cell's size",
                         Baseline({"group_method": "reweighted"})),
    "group-dro": ("Group DRO over the (class, group) cells, step train.group_dro_eta, on batches that draw each "
                  "cell equally often (Sagawa et al. 2020, as its runs)",
                  Baseline({"group_method": "dro", "group_dro_balanced": True})),
}


def run_baseline(name, task, config, *, workdir=None, progress=False, trained=None) -> RecipeResult:
    baseline = BASELINES[name][1]
    cfg = replace(config.train, **baseline.train_overrides)
    data = task.oracle if baseline.data == "oracle" else task.train
    key = (baseline.data, json.dumps(asdict(cfg), sort_keys=True), config.seed)
    if trained is not None and key in trained:
        result = trained[key]
    else:
        result = fit_classifier(data, cfg, seed=config.seed, progress=progress,
                                checkpoint_dir=Path(workdir) / "checkpoint" if workdir else None,
                                **classifier_inputs(task, replace(config, train=cfg)))
        if trained is not None:
            trained[key] = result
    seconds = {"train": result.seconds}
    model, posthoc_tau = result.model, 0.0
    if baseline.after == "refit":
        t0 = time.perf_counter()
        model = refit_head(copy.deepcopy(model), task.train, per_class=config.train.refit_per_class,
                           epochs=config.train.refit_epochs, lr=config.train.refit_lr, seed=config.seed)
        seconds["refit_head"] = time.perf_counter() - t0
    elif baseline.after == "posthoc":
        posthoc_tau = config.eval.posthoc_tau
    t0 = time.perf_counter()
    metrics = evaluate(model, task.test, train_counts=task.train.class_counts(), posthoc_tau=posthoc_tau,
                       many_threshold=config.eval.many_threshold, few_threshold=config.eval.few_threshold)
    seconds["evaluate"] = time.perf_counter() - t0
    return RecipeResult(metrics=metrics, model=model, history=result.history, seconds=seconds, curve=result.curve,
                        steps=result.steps)


def needs_pool(task, config):
    """The semi-supervised baselines' check: a split with an unlabelled pool."""
    if task.unlabeled is None or len(task.unlabeled) == 0:
        raise SynthaugError("semi-supervised training needs an unlabelled pool and this split has none: use "
                            "split.kind=few-shot with split.unlabeled_pool=true")


def _register(name, description):
    def fn(task, config, *, workdir=None, progress=False, trained=None):
        return run_baseline(name, task, config, workdir=workdir, progress=progress, trained=trained)

    fn.__name__ = name.replace("-", "_")
    check = needs_pool if BASELINES[name][1].train_overrides.get("ssl") else None
    register_recipe(name, description, check=check, ssl=True)(fn)


for _name, (_description, _) in BASELINES.items():
    _register(_name, _description)
