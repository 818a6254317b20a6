import pytest
import torch
from conftest import make_dataset

from synthaug.config import load_config
from synthaug.data import LoadedDataset
from synthaug.errors import SynthaugError
from synthaug.recipes import RECIPES, get_recipe
from synthaug.runs import remove_checkpoints
from synthaug.task import make_task

FAST = ["train.epochs=2", "train.batch_size=16", "train.augment=none", "split.ratio=8", "split.n_max=32",
        "generator.preset=tiny", "generator.steps=4", "generator.batch_size=8", "generator.sampling_steps=3"]


@pytest.fixture(scope="module")
def data():
    return LoadedDataset("tiny", make_dataset((40, 40, 40), seed=0), make_dataset((10, 10, 10), seed=1))


# what a recipe needs beyond FAST to run in a test's time (utilgen: a validation split)
EXTRA = {
    "tada": ["tada.early_epochs=1", "tada.variants=1"],
    "tada-all": ["tada.early_epochs=1", "tada.variants=1"],
    "tada-upsample": ["tada.early_epochs=1"],
    "tada-random": ["tada.early_epochs=1", "tada.variants=1"],
    "ldmlr": ["ldmlr.steps=5", "ldmlr.hidden=16", "ldmlr.sampling_steps=3", "ldmlr.head_epochs=1"],
    # the group baselines need a split with groups
    **{name: ["split.kind=colored"] for name in ("group-balanced", "group-reweighted", "group-dro")},
    # semi-supervised: a few-shot split with its unlabelled pool
    **{name: ["split.kind=few-shot", "split.k=5", "train.ssl_mu=2"] for name in ("fixmatch", "freematch")},
    "dpt": ["split.kind=few-shot", "split.k=5", "train.ssl_mu=2", "dpt.per_class=3", "dpt.embed_dim=4"],
    "utilgen": ["split.val_per_class=2", "utilgen.rounds=1", "utilgen.valuation_epochs=1", "utilgen.embedding_steps=2",
                "utilgen.dpo_steps=2", "utilgen.sampling_steps=3", "utilgen.final_multiple=1", "utilgen.per_round=1"],
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_runs(name, data, tmp_path):
    config = load_config(None, [*FAST, f"recipe={name}", f"output_dir={tmp_path}", *EXTRA.get(name, [])])
    task = make_task(data, config.split)
    if "split.kind=colored" in EXTRA.get(name, []):
        assert task.train.groups is not None
    elif "split.kind=few-shot" in EXTRA.get(name, []):
        assert task.train.class_counts().tolist() == [5, 5, 5] and len(task.unlabeled) == 105
    else:
        assert task.train.class_counts().tolist() == ([30, 9, 2] if name == "utilgen" else [32, 11, 4])
    result = get_recipe(name).run(task, config, workdir=tmp_path / "run")
    for key in ("accuracy", "balanced_accuracy", "many_shot_accuracy", "confusion_matrix"):
        assert key in result.metrics
    assert result.seconds["train"] > 0
    # what a finished run keeps: no stage's training checkpoint (train_run removes them; runs.CHECKPOINTS)
    remove_checkpoints(tmp_path / "run")
    left = [p for p in (tmp_path / "run").rglob("*") if p.name == "state.safetensors"]
    assert not left, f"{name} leaves a training checkpoint that runs.CHECKPOINTS does not name: {left}"


def test_shared_training_between_baselines(data):
    config = load_config(None, FAST)
    task = make_task(data, config.split)
    trained = {}
    ce = get_recipe("ce").run(task, config, trained=trained)
    crt = get_recipe("crt").run(task, config, trained=trained)
    get_recipe("posthoc-la").run(task, config, trained=trained)
    assert len(trained) == 1  # one model trained for the three
    assert not torch.equal(ce.model.head.weight, crt.model.head.weight)  # crt re-fitted a copy


def test_post_hoc_logit_adjustment_subtracts_tau_log_prior(data, monkeypatch):
    import sys

    import synthaug.recipes.baselines as baselines

    evaluate_module = sys.modules["synthaug.classify.evaluate"]  # the package's `evaluate` is the function

    test = make_dataset((4, 4), seed=1)
    monkeypatch.setattr(evaluate_module, "predict_logits", lambda model, images: torch.zeros(len(images), 2))
    plain = evaluate_module.evaluate(None, test, train_counts=torch.tensor([10, 1]))
    adjusted = evaluate_module.evaluate(None, test, train_counts=torch.tensor([10, 1]), posthoc_tau=1.0)
    assert plain["per_class_accuracy"] == {"class0": 1.0, "class1": 0.0}  # a tie goes to the first class
    assert adjusted["per_class_accuracy"] == {"class0": 0.0, "class1": 1.0}  # the rare class's logit raised by log(11)
    monkeypatch.undo()  # the real logits again
    given, real = [], baselines.evaluate
    monkeypatch.setattr(baselines, "evaluate", lambda *a, **kw: given.append(kw["posthoc_tau"]) or real(*a, **kw))
    config = load_config(None, [*FAST, "eval.posthoc_tau=0.7"])
    task = make_task(data, config.split)
    get_recipe("posthoc-la").run(task, config, trained={})
    get_recipe("ce").run(task, config, trained={})
    assert given == [0.7, 0.0]


def test_task_kinds(data):
    few = make_task(data, load_config(None, ["split.kind=few-shot", "split.k=5"]).split)
    assert few.train.class_counts().tolist() == [5, 5, 5] and len(few.unlabeled) == 105
    col = make_task(data, load_config(None, ["split.kind=colored", "split.val_per_class=3"]).split)
    assert col.train.groups is not None and col.test.groups is not None and col.oracle.channels == 3
    assert col.val.class_counts().tolist() == [3, 3, 3]
    config = load_config(None, [*FAST, "split.kind=colored", "recipe=ce"])
    metrics = get_recipe("ce").run(make_task(data, config.split), config).metrics
    assert "worst_group_accuracy" in metrics


def test_a_coloured_run_reports_each_cell(tmp_path):
    from synthaug.runs import train_run

    config = load_config(None, ["data.dataset=digits", "split.kind=colored", "recipe=group-reweighted",
                                "train.epochs=1", "train.augment=none", "report.baselines=[ce]",
                                f"output_dir={tmp_path}"])
    run_dir, metrics = train_run(config, progress=False, compare=True)
    test, worst = metrics["test"], metrics["test"]["worst_group"]
    assert sum(len(groups) for groups in test["group_accuracy"].values()) == 100  # every (digit, colour) cell
    assert test["group_accuracy"][worst["class"]][str(worst["group"])] == test["worst_group_accuracy"]
    page = (run_dir / "report.html").read_text()
    assert "per (class, group) cell" in page and f"<b>{100 * test['worst_group_accuracy']:.2f}</b>" in page


def test_unknown_recipe():
    with pytest.raises(SynthaugError, match="unknown recipe"):
        get_recipe("magic")
