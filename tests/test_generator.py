"""The embedded diffusion generator on a tiny in-code UNet and 8x8 images."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import die_after_saving_step, make_dataset

from synthaug.errors import SynthaugError
from synthaug.generate import (
    SAMPLERS,
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)

TRAIN = GeneratorTrainConfig(steps=4, batch_size=8, checkpoint_every=2, warmup_steps=1)
FAST_SAMPLER = SamplerConfig(steps=3, guidance_scale=2.0)
TOLERANCE_MEAN, TOLERANCE_P99 = 2.0, 16  # bfloat16 against float32 images, grey levels (0-255)


def tiny_config(ds, **kw):
    return GeneratorConfig(image_size=8, channels=ds.channels, classes=ds.classes, preset="tiny", **kw)


@pytest.fixture(scope="module")
def trained():
    ds = make_dataset((12, 8, 4))
    return ds, DiffusionGenerator.fit(ds, tiny_config(ds), TRAIN, seed=0)


def test_generate_shapes_and_per_image_seeds(trained):
    ds, gen = trained
    images = gen.generate([0, 1, 2, 1], [10, 11, 12, 13], sampler=FAST_SAMPLER)
    assert images.shape == (4, 1, 8, 8) and images.dtype == torch.uint8
    assert len(gen.history) >= 1 and gen.train_seconds > 0
    # any image regenerates from its (label, seed) alone, inside a batch or not
    alone = gen.generate([1], [13], sampler=FAST_SAMPLER)
    assert (alone[0].int() - images[3].int()).abs().max() <= 1
    other_seed = gen.generate([1], [14], sampler=FAST_SAMPLER)
    assert not torch.equal(other_seed[0], alone[0])
    assert gen.generate([], [], sampler=FAST_SAMPLER).shape == (0, 1, 8, 8)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_samplers_and_guidance(trained, sampler, guidance):
    _, gen = trained
    config = SamplerConfig(sampler=sampler, steps=3, guidance_scale=guidance)
    images = gen.generate([0, 2, 1], [1, 2, 3], sampler=config)
    assert images.shape == (3, 1, 8, 8)
    # stochastic samplers too: an image depends on its own seed, not on its batch
    assert (gen.generate([1], [3], sampler=config)[0].int() - images[2].int()).abs().max() <= 1
    if guidance != 1.0:  # the scale is used: more than the batch's last-bit differences from the unguided images
        plain = gen.generate([0, 2, 1], [1, 2, 3], sampler=SamplerConfig(sampler=sampler, steps=3, guidance_scale=1.0))
        assert (images.float() - plain.float()).abs().mean() > 2, (images.float() - plain.float()).abs().mean()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bfloat16_sampling_gives_nearly_the_float32_images(trained, sampler):
    """The reduced-precision path (the default where the hardware computes bfloat16) against
    float32 eager, same labels and seeds: the images differ by a few grey levels at most."""
    _, gen = trained
    labels, seeds = [0, 1, 2] * 8, list(range(24))
    images = {precision: gen.generate(labels, seeds, sampler=SamplerConfig(sampler=sampler, steps=5, guidance_scale=2.0,
                                                                           precision=precision))
              for precision in ("float32", "bfloat16")}
    diff = (images["float32"].int() - images["bfloat16"].int()).abs().float()
    assert diff.mean() < TOLERANCE_MEAN and diff.quantile(0.99) < TOLERANCE_P99, (diff.mean(), diff.quantile(0.99))
    assert not torch.equal(images["float32"], images["bfloat16"])  # the switch does change the arithmetic


def test_bfloat16_training_learns_like_float32():
    ds = make_dataset((12, 8, 4))
    losses = {}
    for precision in ("float32", "bfloat16"):
        gen = DiffusionGenerator.fit(ds, tiny_config(ds), GeneratorTrainConfig(steps=100, batch_size=8, warmup_steps=5,
                                                                               precision=precision), seed=0)
        losses[precision] = gen.history[-1]["loss"]
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.05 * losses["float32"], losses


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_guided_generation(trained, sampler):
    ds, gen = trained
    config = SamplerConfig(sampler=sampler, steps=10, guidance_scale=2.0)
    real, labels = ds.images[:4], ds.labels[:4]
    mixed = gen.generate(labels, [1, 2, 3, 4], sampler=config, init_images=real, strength=[0.2, 1.0, 0.2, 0.5])
    assert mixed.shape == real.shape and mixed.dtype == torch.uint8
    # one call with per-image strengths = separate calls, one strength each (images start in groups)
    for i, strength in ((0, 0.2), (1, 1.0), (3, 0.5)):
        alone = gen.generate(labels[i : i + 1], [i + 1], sampler=config, init_images=real[i : i + 1], strength=strength)
        assert (alone[0].int() - mixed[i].int()).abs().max() <= 1
    # a light touch stays nearer the real image than a full re-generation
    light = gen.generate(labels, [5, 6, 7, 8], sampler=config, init_images=real, strength=0.1)
    full = gen.generate(labels, [5, 6, 7, 8], sampler=config, init_images=real, strength=1.0)
    assert (light.float() - real.float()).abs().mean() < (full.float() - real.float()).abs().mean()


def test_image_guided_generation_bad_input(trained):
    ds, gen = trained
    with pytest.raises(SynthaugError, match="strength must be in"):
        gen.generate(ds.labels[:2], [1, 2], sampler=FAST_SAMPLER, init_images=ds.images[:2], strength=0.0)
    with pytest.raises(SynthaugError, match="init_images must be uint8 of shape"):
        gen.generate(ds.labels[:2], [1, 2], sampler=FAST_SAMPLER, init_images=ds.images[:3])


def test_save_and_load_give_the_same_images(trained, tmp_path):
    ds, gen = trained
    gen.save_pretrained(tmp_path / "gen")
    assert (tmp_path / "gen" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.glob("**/*.bin")) and not list(tmp_path.glob("**/*.pt"))
    loaded = DiffusionGenerator.from_pretrained(tmp_path / "gen")
    assert loaded.config == gen.config and loaded.fingerprint() == gen.fingerprint()
    assert torch.equal(loaded.generate([2], [7], sampler=FAST_SAMPLER), gen.generate([2], [7], sampler=FAST_SAMPLER))
    loaded.check_compatible(ds)


def test_bad_generator_folders(trained, tmp_path):
    ds, gen = trained
    with pytest.raises(SynthaugError, match="has no generator.json"):
        DiffusionGenerator.from_pretrained(tmp_path)
    gen.save_pretrained(tmp_path / "g")
    meta_file = tmp_path / "g" / "generator.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "config": {**meta["config"], "image_embed_dim": 6}}))
    with pytest.raises(SynthaugError, match="takes 1 input channels, this generator needs 2"):
        DiffusionGenerator.from_pretrained(tmp_path / "g")  # a UNet without the condition-map channels
    meta_file.write_text(json.dumps(meta))
    (tmp_path / "g" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SynthaugError, match="cannot load the generator"):
        DiffusionGenerator.from_pretrained(tmp_path / "g")
    with pytest.raises(SynthaugError, match="classes"):
        gen.check_compatible(make_dataset((3, 3)))
    with pytest.raises(SynthaugError, match="1x8px"):
        gen.check_compatible(make_dataset((3, 3, 3), channels=3))


def test_config_errors():
    with pytest.raises(SynthaugError, match="8 to 64 px"):
        GeneratorConfig(image_size=128, channels=1, classes=["a"])
    with pytest.raises(SynthaugError, match="divisible"):
        GeneratorConfig(image_size=10, channels=1, classes=["a"], preset="base")
    with pytest.raises(SynthaugError, match="generator.preset is .huge.: use one of tiny, small, base"):
        GeneratorConfig(image_size=8, channels=1, classes=["a"], preset="huge")
    ds = make_dataset((3, 3), size=8)
    with pytest.raises(SynthaugError, match="set data.image_size"):
        DiffusionGenerator.fit(ds, GeneratorConfig(image_size=16, channels=1, classes=ds.classes, preset="tiny"), TRAIN)


def test_group_conditioning():
    ds = make_dataset((6, 6), channels=3)
    ds.groups = torch.tensor([0, 1] * 6)
    gen = DiffusionGenerator.fit(ds, tiny_config(ds, num_groups=2), TRAIN)
    assert gen.unet.config.num_class_embeds == 3 * 3
    images = gen.generate([0, 1], [0, 1], groups=[1, 0], sampler=FAST_SAMPLER)
    assert images.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("guidance", ["joint", "composed"])
def test_composed_group_guidance_trains_the_group_alone_and_samples_its_direction(monkeypatch, guidance):
    """A cell with no training image (class 0 in group 1 here) is reached by adding the class's
    and the group's guidance: training sees (null class, group) cells only when composed, and
    sampling runs three branches: (class, null), (null, group), (null, null)."""
    ds = make_dataset((6, 6), channels=3)
    ds.groups = ds.labels.clone()  # group == class: the cells (0, 1) and (1, 0) are empty
    seen = []
    real = DiffusionGenerator.predict_noise
    monkeypatch.setattr(DiffusionGenerator, "predict_noise", lambda self, x, t, c, m: seen.append(c.cpu()) or real(self, x, t, c, m))
    train = GeneratorTrainConfig(steps=30, batch_size=8, warmup_steps=1, precision="float32")
    gen = DiffusionGenerator.fit(ds, tiny_config(ds, num_groups=2, group_guidance=guidance, label_dropout=0.3), train)
    trained = torch.cat(seen)
    null_class_with_group = (trained // 3 == gen.null_class) & (trained % 3 != 2)
    assert bool(null_class_with_group.any()) == (guidance == "composed")
    seen.clear()
    images = gen.generate([0, 1], [0, 1], groups=[1, 0], sampler=FAST_SAMPLER)
    assert images.shape == (2, 3, 8, 8)
    if guidance == "composed":  # (0, null), (1, null) | (null, 1), (null, 0) | (null, null) x 2, each step
        assert seen[0].tolist() == [0 * 3 + 2, 1 * 3 + 2, 2 * 3 + 1, 2 * 3 + 0, 8, 8]
    else:
        assert seen[0].tolist() == [0 * 3 + 1, 1 * 3 + 0, 8, 8]
    assert gen.config.key().get("group_guidance") == (guidance if guidance == "composed" else None)
    with pytest.raises(SynthaugError, match="composed group guidance"):
        tiny_config(ds, num_groups=2, group_guidance="composed", image_embed_dim=4)


def test_group_guidance_scale_weighs_the_group_s_term_alone():
    """Composed guidance with its own scale for the group's term: unset, both terms at
    guidance_scale (the former images); 0, the class's guidance alone, so the group changes
    nothing; another scale, other images. A sampling option: the generator keeps its name, the
    store's provenance records it only when set."""
    from synthaug.config import load_config
    from synthaug.generate.cache import generator_fingerprint, provenance, sampler_config

    ds = make_dataset((6, 6), channels=3)
    ds.groups = torch.tensor([0, 1] * 6)
    gen = DiffusionGenerator.fit(ds, tiny_config(ds, num_groups=2, group_guidance="composed"), TRAIN)
    sample = lambda groups, **kw: gen.generate([0, 0], [3, 4], groups=groups, sampler=SamplerConfig(  # noqa: E731
        steps=3, guidance_scale=2.0, precision="float32", **kw))
    assert torch.equal(sample([0, 0]), sample([0, 0], group_guidance_scale=2.0))
    assert torch.equal(sample([0, 0], group_guidance_scale=0.0), sample([1, 1], group_guidance_scale=0.0))
    assert not torch.equal(sample([0, 0]), sample([1, 1]))
    assert not torch.equal(sample([0, 0]), sample([0, 0], group_guidance_scale=5.0))
    # outside a guidance interval each term is at scale 1 at most: the group's 0 stays 0
    outside = dict(group_guidance_scale=0.0, guidance_interval=(1e6, 1e7))
    assert torch.equal(sample([0, 0], **outside), sample([1, 1], **outside))
    assert not torch.equal(sample([0, 0], guidance_interval=(1e6, 1e7)), sample([1, 1], guidance_interval=(1e6, 1e7)))
    unset, split = (load_config(None, o).generator for o in ([], ["generator.group_guidance_scale=1.5"]))
    assert generator_fingerprint(ds, unset, 2) == generator_fingerprint(ds, split, 2)
    assert "group_guidance_scale" not in provenance(gen, sampler_config(unset))
    assert provenance(gen, sampler_config(split))["group_guidance_scale"] == 1.5
    with pytest.raises(SynthaugError, match="group_guidance_scale"):
        load_config(None, ["generator.group_guidance_scale=-1"])


def test_guidance_interval_guides_only_the_steps_whose_noise_level_lies_in_it(trained, monkeypatch):
    """Guidance limited to noise levels (low, high]: the steps outside run the class's branch alone;
    the whole range gives the images guided at every step, bit for bit, a range no step reaches the
    unguided ones, and a range between gives neither."""
    from synthaug.generate.network import build_sampler, guided_steps

    ds, gen = trained
    schedule = build_sampler(gen.config, "sde-dpm-solver++")
    schedule.set_timesteps(10)
    alpha_bar = schedule.alphas_cumprod[schedule.timesteps.long()].double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt().tolist()  # 2.0e4, 6.4, 3.1, 2.0, ..., 0.34, 0.17 (cosine schedule)
    assert guided_steps(schedule, schedule.timesteps, None) == [True] * 10
    assert guided_steps(schedule, schedule.timesteps, (0.28, 5.42)) == [False, False] + [True] * 7 + [False]
    assert guided_steps(schedule, schedule.timesteps, (sigma[3], sigma[2])) == [i == 2 for i in range(10)]  # (low, high]
    batches = []
    real = DiffusionGenerator.predict_noise
    monkeypatch.setattr(DiffusionGenerator, "predict_noise", lambda self, x, t, c, m: batches.append(len(x)) or real(self, x, t, c, m))
    labels, seeds = [0, 1, 2], [5, 6, 7]
    sampler = SamplerConfig(steps=10, guidance_scale=3.0, precision="float32")
    everywhere = gen.generate(labels, seeds, sampler=sampler)
    assert batches == [6] * 10  # (class, null class) each step
    batches.clear()
    limited = gen.generate(labels, seeds, sampler=replace(sampler, guidance_interval=(0.28, 5.42)))
    assert batches == [3, 3] + [6] * 7 + [3]
    assert torch.equal(gen.generate(labels, seeds, sampler=replace(sampler, guidance_interval=(0, float("inf")))), everywhere)
    unguided = gen.generate(labels, seeds, sampler=replace(sampler, guidance_scale=1.0))
    assert torch.equal(gen.generate(labels, seeds, sampler=replace(sampler, guidance_interval=(1e6, 1e7))), unguided)
    assert not torch.equal(limited, everywhere) and not torch.equal(limited, unguided)
    batches.clear()  # SDEdit from strength 0.5: the run's last five steps, sigma 1.0 to 0.17, guided but the last
    gen.generate(labels, seeds, sampler=replace(sampler, guidance_interval=(0.28, 5.42)),
                 init_images=ds.images[:3], strength=0.5)
    assert batches == [6] * 4 + [3]
    for bad in [(5.42, 0.28), (1.0,), (-1, 2), ("a", 2), (float("nan"), 1)]:
        with pytest.raises(SynthaugError, match="guidance_interval is two noise levels"):
            SamplerConfig(guidance_interval=bad)


def test_guidance_interval_is_a_sampling_option_a_store_records(trained, tmp_path):
    """Unset (the former sampling) the store's provenance is what it was; set, the stage samples with
    it and the sampler's name in the store carries it, so a store made guiding every step refuses the
    run before writing; the trained generator keeps its name, and the bench's stores theirs while unset."""
    from synthaug.config import load_config
    from synthaug.generate.cache import generator_fingerprint, sampler_config, sampling_provenance
    from synthaug.generate.stage import generate_stage
    from synthaug.store import SyntheticStore
    from synthaug.utils.keys import key_dict

    ds, gen = trained
    config = lambda *o: load_config(None, ["recipe=synaug", "generator.sampling_steps=3",  # noqa: E731
                                           "generator.precision=float32", f"output_dir={tmp_path}", *o])
    plain, limited = config(), config("generator.guidance_interval=[0.28, 5.42]")
    assert sampler_config(limited.generator).guidance_interval == (0.28, 5.42)
    assert sampling_provenance(sampler_config(plain.generator), "embedded")["sampler"] == "sde-dpm-solver++/3"
    assert generator_fingerprint(ds, plain.generator, 0) == generator_fingerprint(ds, limited.generator, 0)
    assert "guidance_interval" not in key_dict(plain.generator)
    assert key_dict(limited.generator)["guidance_interval"] == [0.28, 5.42]
    assert config("generator.guidance_interval=[0, 5]").generator.guidance_interval == [0.0, 5.0]  # as numbers
    assert sampling_provenance(SamplerConfig(steps=3, guidance_interval=(0.1234567, 5)), None)["sampler"] == \
        "sde-dpm-solver++/3 guided in (0.1234567, 5.0]"  # every digit: intervals that guide other steps differ
    plan = [{"id": f"r{i}", "label": i % 3, "seed": i} for i in range(4)]
    images, _ = generate_stage(plan, gen, limited, tmp_path / "limited", ds)
    assert {r["sampler"] for r in SyntheticStore(tmp_path / "limited", ds.classes).rows()} == \
        {"sde-dpm-solver++/3 guided in (0.28, 5.42]"}
    assert torch.equal(images.images, gen.generate([r["label"] for r in plan], [r["seed"] for r in plan],
                                                   sampler=sampler_config(limited.generator)))
    generate_stage(plan, gen, plain, tmp_path / "plain", ds)
    before = sorted(p.name for p in (tmp_path / "plain").rglob("*"))
    with pytest.raises(SynthaugError, match=r"made with sampler sde-dpm-solver\+\+/3, not sde-dpm-solver\+\+/3 guided in"):
        generate_stage(plan, gen, limited, tmp_path / "plain", ds)
    assert sorted(p.name for p in (tmp_path / "plain").rglob("*")) == before


@pytest.mark.parametrize("augment", [0.0, 0.5])  # with augmentation its map into the timestep embedding resumes too
def test_resume_after_interruption(augment, tmp_path, monkeypatch):
    ds = make_dataset((12, 8, 4))
    train = replace(TRAIN, augment=augment)
    reference = DiffusionGenerator.fit(ds, tiny_config(ds), train, seed=1)

    undo = die_after_saving_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        DiffusionGenerator.fit(ds, tiny_config(ds), train, seed=1, checkpoint_dir=tmp_path)
    undo()
    resumed = DiffusionGenerator.fit(ds, tiny_config(ds), train, seed=1, checkpoint_dir=tmp_path)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in reference.history]
    # the loss recorded at step 4 is the mean over steps 1-4 in both, not over the resumed 3-4 alone
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in reference.history], rel=1e-5)
    for (k, a), b in zip(reference.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_both_generators_implement_the_interface(tmp_path):
    """Recipes and stages ask only for what `Generator` names; both kinds offer all of it."""
    from synthaug.generate import Generator
    from synthaug.generate.stable_diffusion import StableDiffusionGenerator
    from synthaug.testing import tiny_pipeline

    embedded = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], preset="tiny"))
    sd = StableDiffusionGenerator.from_pretrained(tiny_pipeline(tmp_path / "sd"), ["a", "b"], channels=1, image_size=8)
    for gen in (embedded, sd):
        assert isinstance(gen, Generator)
        assert gen.policy_embeddings().ndim >= 2 and gen.image_embed_dim == 0


def test_a_saved_generator_is_checked_for_what_the_recipe_needs_and_loaded_once(tmp_path, monkeypatch):
    """generator.path: refused where the recipe draws (class, group) cells and the generator has
    no groups, accepted where it draws classes alone (AugCond on a coloured split); the checks of
    one run load the folder once, and again once its files change."""
    from synthaug.config import load_config
    from synthaug.generate import cache

    data = make_dataset((6, 6), channels=3, seed=0)
    data.groups, data.group_names = torch.tensor([0, 1] * 6), ["red", "green"]
    DiffusionGenerator(GeneratorConfig(image_size=8, channels=3, classes=data.classes, preset="tiny")).save_pretrained(
        tmp_path / "gen")
    section = load_config(None, [f"generator.path={tmp_path / 'gen'}"]).generator
    loads, real = [], DiffusionGenerator.from_pretrained
    monkeypatch.setattr(DiffusionGenerator, "from_pretrained", lambda *a, **k: loads.append(1) or real(*a, **k))
    cache.check_generator(section, data)  # classes alone
    with pytest.raises(SynthaugError, match="is not conditioned on groups"):
        cache.check_generator(section, data, groups=True)
    with pytest.raises(SynthaugError, match="is not image-conditioned"):
        cache.check_generator(section, data, image_embed_dim=4)
    assert len(loads) == 1
    (tmp_path / "gen" / "generator.json").write_text((tmp_path / "gen" / "generator.json").read_text())
    cache.check_generator_folder(tmp_path / "gen", data)
    assert len(loads) == 2
