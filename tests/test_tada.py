"""TADA: per-example losses, the k-means split into learned / slow-learnable, the targeted
(image-guided) plan, its generation into a store (interrupted and resumed), the recipe and
its two baselines end to end, and the report of its plan."""

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

from synthaug.classify import TrainConfig, example_losses, fit_classifier, predict_logits
from synthaug.cli import main
from synthaug.config import load_config
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.plan import slow_learnable, targeted_plan
from synthaug.recipes import get_recipe
from synthaug.store import SyntheticStore
from synthaug.task import make_task


def test_slow_learnable_is_the_high_loss_cluster():
    losses = torch.tensor([0.1, 0.2, 2.5, 0.15, 3.0, 0.05, 0.12, 2.8, 0.2, 0.1])
    mask = slow_learnable(losses, seed=0)
    assert mask.tolist() == [x > 1 for x in losses.tolist()]
    assert torch.equal(slow_learnable(losses, seed=1), mask)  # the split does not hinge on the seed
    assert not slow_learnable(torch.full((5,), 0.7)).any()  # nothing stands out: nothing is targeted
    assert not slow_learnable(torch.tensor([1.0])).any()


def test_example_losses():
    ds = make_dataset((6, 6), size=8)
    model = fit_classifier(ds, TrainConfig(epochs=1, batch_size=4, augment="none"), seed=0).model
    losses = example_losses(model, ds)
    assert losses.shape == (12,) and bool((losses >= 0).all())
    assert torch.allclose(losses, F.cross_entropy(predict_logits(model, ds.images), ds.labels, reduction="none"))


def test_targeted_plan():
    ds = make_dataset((4, 4), size=8)
    mask = torch.tensor([False, True, False, False, False, True, True, False])
    plan = targeted_plan(ds, mask, variants=3, strength=0.4, seed=7)
    assert len(plan) == 9 and len({r["id"] for r in plan}) == 9
    assert [r["source"] for r in plan] == [1, 1, 1, 5, 5, 5, 6, 6, 6]
    assert all(r["label"] == int(ds.labels[r["source"]]) and r["strength"] == 0.4 for r in plan)
    assert targeted_plan(ds, mask, variants=3, strength=0.4, seed=7) == plan  # same seed, same plan
    with pytest.raises(SynthaugError, match="variants per example"):
        targeted_plan(ds, mask, variants=0)
    with pytest.raises(SynthaugError, match="strength must be in"):
        targeted_plan(ds, mask, variants=1, strength=1.5)


def test_targeted_generation_resumes_after_an_interruption(tmp_path):
    ds = make_dataset((6, 6), size=8)
    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny")
    gen = DiffusionGenerator.fit(ds, config, GeneratorTrainConfig(steps=3, batch_size=8, warmup_steps=1), seed=0)
    sampler = SamplerConfig(steps=4, batch_size=4)
    plan = targeted_plan(ds, torch.arange(12) % 3 == 0, variants=2, strength=0.5)
    with pytest.raises(SynthaugError, match="start from real images"):
        gen.generate_rows(plan[:2], sampler)

    calls = []

    def interrupted(rows):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(rows))
        return gen.generate_rows(rows, sampler, sources=ds)

    store = SyntheticStore(tmp_path / "a", ds.classes)
    with pytest.raises(KeyboardInterrupt):
        store.fill(plan, interrupted, batch_size=4)
    assert len(store.rows()) == 4
    written = store.fill(plan, lambda rows: gen.generate_rows(rows, sampler, sources=ds), batch_size=4)
    assert written == len(plan) - 4
    store.verify()
    # the same images as a generation that never stopped
    whole = SyntheticStore(tmp_path / "b", ds.classes)
    whole.fill(plan, lambda rows: gen.generate_rows(rows, sampler, sources=ds), batch_size=8)
    a, b = store.load(ids=[r["id"] for r in plan]), whole.load(ids=[r["id"] for r in plan])
    assert torch.equal(a.labels, b.labels) and (a.images.int() - b.images.int()).abs().max() <= 1
    assert {r["source"] for r in store.rows()} == {0, 3, 6, 9}


def test_strength_range_is_drawn_per_row():
    ds = make_dataset((4, 4), size=8)
    plan = targeted_plan(ds, torch.ones(8, dtype=torch.bool), variants=4, strength=[0.3, 0.7], seed=1)
    strengths = [r["strength"] for r in plan]
    assert all(0.3 <= s <= 0.7 for s in strengths) and len(set(strengths)) > 10
    assert targeted_plan(ds, torch.ones(8, dtype=torch.bool), variants=4, strength=[0.3, 0.7], seed=1) == plan
    with pytest.raises(SynthaugError, match=r"tada.strength must be in \(0, 1\]"):
        load_config(None, ["tada.strength=[0.8,0.2]"])


def test_early_stop_keeps_the_full_schedule():
    ds = make_dataset((6, 6), size=8)
    cfg = TrainConfig(epochs=4, batch_size=4, augment="none", warmup_epochs=0)
    early = fit_classifier(ds, cfg, seed=0, stop_after_epochs=1)
    full = fit_classifier(ds, cfg, seed=0)
    assert len(early.history) == 1 and len(full.history) == 4
    assert early.history[0] == {**full.history[0], "seconds": early.history[0]["seconds"]}  # the same first epoch
    assert early.history[0]["lr"] > 0.5 * cfg.lr  # not annealed to zero in one epoch


def test_variants_at_several_strengths_in_one_call():
    ds = make_dataset((3, 3), size=8)
    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny")
    gen = DiffusionGenerator.fit(ds, config, GeneratorTrainConfig(steps=2, batch_size=4, warmup_steps=1), seed=0)
    sampler = SamplerConfig(steps=4)
    out = gen.variants(ds.images[:2], ds.labels[:2], strengths=[0.25, 0.5, 1.0], seed=10, sampler=sampler)
    assert out.shape == (2, 3, 1, 8, 8) and out.dtype == torch.uint8
    one = gen.generate(ds.labels[1:2], [10 + 4], sampler=sampler, init_images=ds.images[1:2], strength=0.5)
    assert torch.equal(out[1, 1], one[0])


FAST = ["data.dataset=digits", "split.kind=none", "train.epochs=3", "train.batch_size=64", "train.augment=none",
        "tada.early_epochs=1", "tada.variants=2", "generator.preset=tiny", "generator.steps=4", "generator.batch_size=8",
        "generator.sampling_steps=3", "generator.sampling_batch_size=256"]


@pytest.fixture(scope="module")
def digits_task():
    from synthaug.data import load_dataset

    config = load_config(None, FAST)
    return make_task(load_dataset("digits"), config.split)


def test_tada_targets_the_slow_learnable_set_and_shares_a_store(digits_task, tmp_path):
    store = tmp_path / "store"  # the paper's k-means split (synthaug's default is the top 35%, tested below)
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", f"tada.store_dir={store}", "tada.share=null"])
    result = get_recipe("tada").run(digits_task, config, workdir=tmp_path / "tada")
    t, syn = result.extra["targeted"], result.extra["synthetic"]
    n = len(digits_task.train)
    assert 0 < t["slow_learnable"] < n and t["targeted"] == t["slow_learnable"] == sum(t["slow_per_class"])
    assert syn["images"] == syn["generated_now"] == 2 * t["slow_learnable"] and len(result.synthetic) == syn["images"]
    saved = json.loads((tmp_path / "tada" / "targeted.json").read_text())
    assert sum(saved["slow_learnable"]) == t["slow_learnable"] and len(saved["losses"]) == n
    # the targeted examples have the higher early losses
    losses, mask = torch.tensor(saved["losses"]), torch.tensor(saved["slow_learnable"])
    assert losses[mask].min() >= losses[~mask].max()
    assert {r["source"] for r in result.synthetic.info["rows"]} == set(torch.nonzero(mask).flatten().tolist())
    # augment-all reuses the variants already made for the slow-learnable examples
    every = get_recipe("tada-all").run(digits_task, config, workdir=tmp_path / "all")
    assert every.extra["targeted"]["targeted"] == n and every.extra["synthetic"]["images"] == 2 * n
    assert every.extra["synthetic"]["generated_now"] == 2 * (n - t["slow_learnable"])
    # upsampling duplicates the same examples and generates nothing
    up = get_recipe("tada-upsample").run(digits_task, config, workdir=tmp_path / "up")
    assert up.synthetic is None and "generator" not in up.extra
    assert up.extra["targeted"]["slow_learnable"] == t["slow_learnable"]
    # the random control: as many examples, drawn at random, whose variants augment-all already made
    rand = get_recipe("tada-random").run(digits_task, config, workdir=tmp_path / "random")
    sources = {r["source"] for r in rand.synthetic.info["rows"]}
    assert len(sources) == t["slow_learnable"] and sources != set(torch.nonzero(mask).flatten().tolist())
    assert rand.extra["synthetic"]["generated_now"] == 0


def test_by_default_the_top_35_percent_is_targeted_and_its_images_weighted_0_3(digits_task, tmp_path, monkeypatch):
    import synthaug.classify as classify

    seen, real_fit = [], classify.fit_classifier
    monkeypatch.setattr(classify, "fit_classifier", lambda train, cfg, **kw: seen.append(kw) or real_fit(train, cfg, **kw))
    config = load_config(None, [*FAST, f"output_dir={tmp_path}"])  # the defaults: the top 35%, each added image 0.3
    result = get_recipe("tada-upsample").run(digits_task, config, workdir=tmp_path / "up")
    n = len(digits_task.train)
    assert result.extra["targeted"]["targeted"] == round(0.35 * n)
    added = result.extra["targeted"]["targeted"] * 2  # each targeted example twice (tada.variants=2)
    assert seen[-1]["sample_weights"].tolist() == pytest.approx([1.0] * n + [0.3] * added)
    assert result.extra["targeted"]["synthetic_weight"] == 0.3
    with pytest.raises(SynthaugError, match="tada.synthetic_weight"):
        load_config(None, ["tada.synthetic_weight=0"])


def test_a_rerun_reads_the_early_losses_back_instead_of_retraining(digits_task, tmp_path, monkeypatch):
    import synthaug.recipes.tada as tada

    config = load_config(None, [*FAST, f"output_dir={tmp_path}"])
    losses, mask, early = tada.score_examples(digits_task, config, workdir=tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the early classifier was trained again")

    monkeypatch.setattr(tada, "fit_classifier", refuse)
    again, again_mask, again_early = tada.score_examples(digits_task, config, workdir=tmp_path)
    assert torch.equal(again, losses) and torch.equal(again_mask, mask)
    assert again_early["train_acc"] == early["train_acc"] and again_early["seconds"] == early["seconds"] > 0
    # scored after another number of epochs, or under other training settings: computed again
    for other in ("tada.early_epochs=2", "train.lr=0.01"):
        changed = load_config(None, [*FAST, f"output_dir={tmp_path}", other])
        with pytest.raises(AssertionError, match="trained again"):
            tada.score_examples(digits_task, changed, workdir=tmp_path)


def test_tada_run_reports_its_plan(tmp_path, monkeypatch, capsys):
    args = ["synthaug", "run", "--quiet", "-s", "recipe=tada", "-s", f"output_dir={tmp_path}",
            "-s", "report.baselines=ce,tada-upsample", *[a for kv in FAST for a in ("-s", kv)]]
    monkeypatch.setattr(sys, "argv", args)
    main()
    page = (tmp_path / "digits-none-tada-s0" / "report.html").read_text()
    assert "Targeted examples" in page and "slow-learnable cluster" in page and "Conditions and their generations" in page
    assert "tada-upsample" in page


def test_tada_refuses_an_early_checkpoint_that_is_not_early(digits_task):
    config = load_config(None, [*FAST, "tada.early_epochs=3"])
    with pytest.raises(SynthaugError, match="tada.early_epochs"):
        get_recipe("tada").check(digits_task, config)
