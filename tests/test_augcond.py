"""Augmentation-conditioned generation: the fixed encoder, every conditioning operator (shapes,
labels, determinism), the image-conditioned generator (training with an unlabelled pool,
resume, save / load), the plan, and the AugCond recipe end to end on few-shot digits."""

import json
import sys

import pytest
import torch
from conftest import die_after_saving_step, make_dataset

from synthaug.cli import main
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.generate.image_condition import (
    OPERATORS,
    TWO_IMAGE_OPERATORS,
    PCAEncoder,
    condition_embeddings,
)
from synthaug.plan import conditioned_plan
from synthaug.recipes import get_recipe
from synthaug.task import make_task

TRAIN = GeneratorTrainConfig(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2)


def image_config(ds, **kw):
    return GeneratorConfig(image_size=8, channels=ds.channels, classes=ds.classes, preset="tiny", image_embed_dim=6, **kw)


@pytest.fixture(scope="module")
def encoder():
    return PCAEncoder(64, 6).fit(make_dataset((20, 20, 20)).images)


def test_pca_encoder_is_whitened_and_fixed(encoder):
    ds = make_dataset((20, 20, 20))
    emb = encoder(ds.images)
    assert emb.shape == (60, 6)
    assert torch.allclose(emb.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(emb.std(0), torch.ones(6), atol=0.05)
    assert torch.allclose(encoder(ds.images.float() / 127.5 - 1), emb, atol=1e-5)  # uint8 or [-1, 1]
    with pytest.raises(SynthaugError, match="at least 2"):
        PCAEncoder(64, 6).fit(ds.images[:1])
    # decode inverts encode on the components' span: a full-rank encoder reconstructs exactly
    full = PCAEncoder(64, 64).fit(make_dataset((40, 40, 40)).images)
    x = ds.images[:5].float() / 127.5 - 1
    assert torch.allclose(full.decode(full(ds.images[:5])), x.reshape(5, -1), atol=1e-3)
    low = encoder.decode(emb[:5])  # the low-rank reconstruction is closer to its image than to the others
    assert bool(((low - x.reshape(5, -1)).norm(dim=1) < (low - x.reshape(5, -1).roll(1, 0)).norm(dim=1)).all())


@pytest.mark.parametrize("mode", OPERATORS)
def test_every_operator(encoder, mode):
    ds = make_dataset((6, 6), size=8)
    a, b = ds.images[:4], ds.images[[1, 2, 3, 0]]
    seeds = [11, 12, 13, 14]
    emb, keep = condition_embeddings(encoder, a, b, mode, seeds)
    assert emb.shape == (4, 6) and keep.shape == (4,) and keep.dtype == torch.bool
    assert bool(keep.all()) == (mode != "label-only")
    again, _ = condition_embeddings(encoder, a, b, mode, seeds)
    assert torch.equal(emb, again)  # drawn from the rows' seeds alone
    other, _ = condition_embeddings(encoder, a, b, mode, [21, 22, 23, 24])
    plain = encoder(a)
    if mode in ("image", "label-only"):
        assert torch.allclose(emb, plain) and torch.equal(emb, other)
    else:
        assert not torch.allclose(emb, plain)  # the operator changed the condition
        assert not torch.equal(emb, other)  # ... differently for other seeds
    if mode in TWO_IMAGE_OPERATORS:
        with pytest.raises(SynthaugError, match="second image"):
            condition_embeddings(encoder, a, None, mode, seeds)
        # mixing an image with itself changes nothing but dropout
        same, _ = condition_embeddings(encoder, a, a, mode, seeds)
        if mode != "embed-cutmix-dropout":
            assert torch.allclose(same, plain, atol=1e-4)


def test_operator_details(encoder):
    ds = make_dataset((6, 6), size=8)
    a, b = ds.images[:1], ds.images[6:7]  # two different classes only to make the mix visible
    ea, eb = encoder(a), encoder(b)
    mixed, _ = condition_embeddings(encoder, a, b, "embed-mixup", [5])
    lam = ((mixed - eb) / (ea - eb))[0]
    assert torch.allclose(lam, lam[0].expand(6), atol=1e-4) and 0 <= float(lam[0]) <= 1  # one convex weight
    cut, _ = condition_embeddings(encoder, a, b, "embed-cutmix", [5])
    from_a, from_b = torch.isclose(cut, ea, atol=1e-5)[0], torch.isclose(cut, eb, atol=1e-5)[0]
    assert bool((from_a | from_b).all())
    assert int((from_b & ~from_a).sum()) <= encoder.active_dims  # a subset of the informative coordinates
    dropped, _ = condition_embeddings(encoder, a, b, "dropout", [5])
    assert bool(((dropped == 0) | torch.isclose(dropped, ea)).all()) and bool((dropped == 0).any())
    with pytest.raises(SynthaugError, match="unknown conditioning mode"):
        condition_embeddings(encoder, a, b, "rotate", [5])
    with pytest.raises(SynthaugError, match="one conditioning mode and one seed per image"):
        condition_embeddings(encoder, ds.images[:2], ds.images[2:4], ["image"], [1, 2])
    few = PCAEncoder(64, 6).fit(ds.images[:3])  # 3 images: 2 informative coordinates
    assert few.active_dims == 2
    cut, _ = condition_embeddings(few, ds.images[:8], ds.images[4:12], "embed-cutmix", range(8))
    assert bool((cut[:, 2:] == 0).all())  # nothing swapped into the empty coordinates


def test_conditioned_plan_keeps_labels():
    ds = make_dataset((5, 3, 1), size=8)
    plan = conditioned_plan(ds, target_per_class=6, mode="embed-cutmix", seed=3)
    assert len(plan) == 1 + 3 + 5 and len({r["id"] for r in plan}) == len(plan)
    for r in plan:
        first, second = r["sources"]
        assert int(ds.labels[first]) == int(ds.labels[second]) == r["label"]  # both images of the row's class
        assert r["conditioning"] == "embed-cutmix"
        if r["label"] != 2:
            assert first != second
    firsts = [r["sources"][0] for r in plan if r["label"] == 1]
    assert sorted(firsts) == [5, 5, 6, 6, 7, 7][: len(firsts)] or len(set(firsts)) == 3  # cycles through the class
    assert conditioned_plan(ds, target_per_class=6, mode="embed-cutmix", seed=3) == plan
    assert plan[0]["id"] != conditioned_plan(ds, target_per_class=6, mode="mixup", seed=3)[0]["id"]  # modes share a store


def test_image_conditioned_generator(tmp_path):
    ds = make_dataset((12, 8, 4))
    pool = make_dataset((10, 10, 10), seed=5)
    pool.labels = torch.full_like(pool.labels, -1)
    gen = DiffusionGenerator.fit(ds, image_config(ds), TRAIN, seed=0, unlabeled=pool)
    assert gen.unet.config.class_embed_type == "identity" and gen.encoder.components.abs().sum() > 0
    sampler = SamplerConfig(steps=3, guidance_scale=4.0)
    emb, keep = condition_embeddings(gen.encoder, ds.images[:3], ds.images[1:4], "mixup", [1, 2, 3])
    out = gen.generate(ds.labels[:3], [1, 2, 3], sampler=sampler, image_embeds=emb, image_keep=keep)
    label_only = gen.generate(ds.labels[:3], [1, 2, 3], sampler=sampler)
    assert out.shape == (3, 1, 8, 8) and not torch.equal(out, label_only)  # the condition matters
    with pytest.raises(SynthaugError, match="image_embeds must be"):
        gen.generate(ds.labels[:3], [1, 2, 3], sampler=sampler, image_embeds=emb[:, :2])
    # rows of a plan generate the same images as the direct call
    plan = conditioned_plan(ds, target_per_class=14, mode="mixup", seed=0)[:3]
    rows_out = gen.generate_rows(plan, sampler, sources=ds)
    pairs = torch.tensor([r["sources"] for r in plan])
    emb, keep = condition_embeddings(gen.encoder, ds.images[pairs[:, 0]], ds.images[pairs[:, 1]], "mixup",
                                     [r["seed"] for r in plan])
    direct = gen.generate([r["label"] for r in plan], [r["seed"] for r in plan], sampler=sampler, image_embeds=emb)
    assert torch.equal(rows_out, direct)
    # save / load: the condition embedding and the encoder travel with the UNet
    gen.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "image_condition.safetensors").exists()
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "g")
    assert loaded.fingerprint() == gen.fingerprint() and loaded.config == gen.config
    assert torch.equal(loaded.generate_rows(plan, sampler, sources=ds), rows_out)
    (tmp_path / "g" / "image_condition.safetensors").unlink()
    with pytest.raises(SynthaugError, match="image_condition.safetensors"):
        DiffusionGenerator.from_pretrained(tmp_path / "g")
    # a class-only generator refuses image-conditioned rows
    plain = DiffusionGenerator.fit(ds, GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny"),
                                   TRAIN, seed=0)
    with pytest.raises(SynthaugError, match="not image-conditioned"):
        plain.generate_rows(plan, sampler, sources=ds)


@pytest.mark.parametrize("pairing", ["self", "class"])
def test_each_training_image_is_conditioned_on_itself_or_on_another_of_its_class(monkeypatch, pairing):
    from types import SimpleNamespace

    import synthaug.generate.training as training

    monkeypatch.setattr(training, "random_shift", lambda x, shift, g: x)  # the partner itself, unshifted
    gen = SimpleNamespace(config=SimpleNamespace(image_pairing=pairing, image_shift=0, image_dropout=0.0),
                          null_class=-1, encoder=lambda view: view.flatten())
    labels = torch.tensor([0] * 6 + [1] * 6 + [-1] * 2)  # the last two from the pool: no class
    images = torch.arange(len(labels)).float().view(-1, 1, 1, 1)  # each image its own index
    by_class = [torch.nonzero(labels == c).flatten() for c in (0, 1)]
    idx = torch.arange(len(labels))
    partner, keep = training.training_image_condition(gen, images, idx, labels, by_class, torch.Generator().manual_seed(0))
    partner = partner.long()
    assert keep.all() and torch.equal(partner[-2:], idx[-2:])  # pool images pair with themselves
    if pairing == "self":
        assert torch.equal(partner, idx)
    else:
        assert torch.equal(labels[partner], labels) and (partner != idx).sum() >= 6


@pytest.mark.parametrize("pairing", ["self", "class"])
def test_image_conditioned_training_resumes(tmp_path, monkeypatch, pairing):
    ds = make_dataset((12, 8, 4))
    pool = make_dataset((6, 6, 6), seed=5)
    pool.labels = torch.full_like(pool.labels, -1)
    config = image_config(ds, image_pairing=pairing)
    reference = DiffusionGenerator.fit(ds, config, TRAIN, seed=1, unlabeled=pool)
    undo = die_after_saving_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        DiffusionGenerator.fit(ds, config, TRAIN, seed=1, checkpoint_dir=tmp_path, unlabeled=pool)
    undo()
    resumed = DiffusionGenerator.fit(ds, config, TRAIN, seed=1, checkpoint_dir=tmp_path, unlabeled=pool)
    assert resumed.fingerprint() == reference.fingerprint()


FEW = ["data.dataset=digits", "split.kind=few-shot", "split.k=5", "recipe=augcond", "augcond.expand=3",
       "train.epochs=3", "train.batch_size=32", "train.augment=none", "generator.preset=tiny", "generator.steps=4",
       "generator.batch_size=8", "generator.sampling_steps=3", "generator.sampling_batch_size=64", "augcond.embed_dim=8"]


def test_augcond_few_shot_end_to_end(tmp_path):
    config = load_config(None, [*FEW, f"output_dir={tmp_path}", f"augcond.store_dir={tmp_path / 'store'}"])
    task = make_task(load_dataset("digits"), config.split)
    # the pool is the rest of the training source: no test image in it
    test_keys = {bytes(x.numpy()) for x in task.test.images}
    assert not any(bytes(x.numpy()) in test_keys for x in task.unlabeled.images[:300])
    result = get_recipe("augcond").run(task, config, workdir=tmp_path / "run")
    c, syn = result.extra["conditioning"], result.extra["synthetic"]
    assert c["mode"] == "embed-cutmix-dropout" and c["unlabeled_pool"] == len(task.unlabeled)
    assert syn["images"] == 10 * (15 - 5) and syn["counts_after"] == [15] * 10
    rows = result.synthetic.info["rows"]
    assert all(int(task.train.labels[r["sources"][0]]) == int(task.train.labels[r["sources"][1]]) == r["label"] for r in rows)
    # another mode in the same store adds its own rows; the same mode again generates nothing
    other = load_config(None, [*FEW, f"output_dir={tmp_path}", f"augcond.store_dir={tmp_path / 'store'}", "augcond.mode=label-only"])
    again = get_recipe("augcond").run(task, other, workdir=tmp_path / "run2")
    assert again.extra["generator"]["source"] == "cache" and again.extra["synthetic"]["generated_now"] == 100
    assert get_recipe("augcond").run(task, config, workdir=tmp_path / "run3").extra["synthetic"]["generated_now"] == 0


def test_augcond_refuses_an_empty_plan_before_writing(tmp_path, monkeypatch, capsys):
    args = ["synthaug", "run", "--quiet", *[a for kv in FEW for a in ("-s", kv)], "-s", "augcond.expand=1",
            "-s", f"output_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code != 0 and "augcond.expand" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_augcond_run_reports_conditions(tmp_path, monkeypatch):
    args = ["synthaug", "run", "--quiet", *[a for kv in FEW for a in ("-s", kv)], "-s", f"output_dir={tmp_path}",
            "-s", "report.baselines=ce", "-s", "augcond.mode=mixup"]
    monkeypatch.setattr(sys, "argv", args)
    main()
    run = tmp_path / "digits-5shot-augcond-s0"
    page = (run / "report.html").read_text()
    assert "Conditions and their generations" in page and "<b>mixup</b>" in page and "unlabelled images" in page
    assert json.loads((run / "metrics.json").read_text())["conditioning"]["mode"] == "mixup"
