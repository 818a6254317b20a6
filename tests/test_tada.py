"""TADA's pieces: per-example losses, the k-means split into learned / slow-learnable, the
targeted (image-guided) plan, and its generation into a store, interrupted and resumed."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

from synthaug.classify import TrainConfig, example_losses, fit_classifier, predict_logits
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.plan import slow_learnable, targeted_plan
from synthaug.store import SyntheticStore


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
    with pytest.raises(SynthaugError, match="image-guided"):
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
