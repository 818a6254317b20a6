"""Feedback guidance (generate/feedback.py): the guiding classifier's criterion steers the
embedded generator's sampling, its images are recorded with the classifier that guided them,
and a store made otherwise refuses them."""

from dataclasses import replace

import pytest
import torch
from conftest import make_dataset

import synthaug.generate.diffusion as diffusion_module
import synthaug.select.stage as select_stage_module
from synthaug.config import load_config
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.generate.feedback import MIN_SIGNAL, criterion, feedback_step
from synthaug.generate.stage import generate_stage
from synthaug.select.stage import scorer_settings
from synthaug.store import SyntheticStore

SAMPLER = SamplerConfig(steps=4, guidance_scale=2.0, precision="float32")


@pytest.fixture(scope="module")
def trained():
    ds = make_dataset((12, 8, 4))
    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny")
    return ds, DiffusionGenerator.fit(ds, config, GeneratorTrainConfig(steps=4, batch_size=8, warmup_steps=1), seed=0)


class ReadsByBrightness(torch.nn.Module):
    """A guide whose logits follow each image's mean brightness m: (8m, 0, 8(1 - m)). Class 0's
    loss falls as an image brightens, class 2's rises."""

    def __init__(self, gain: float = 8.0):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(gain))  # a weight, so its fingerprint names it

    def forward(self, x):
        m = x.flatten(1).mean(1)
        return torch.stack([self.gain * m, torch.zeros_like(m), self.gain * (1 - m)], 1)


def test_the_criteria_are_the_entropy_of_the_reading_and_the_loss_on_the_class():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    assert torch.allclose(criterion(logits, torch.tensor([0, 1]), "entropy"), torch.tensor([0.6931, 0.0]), atol=1e-4)
    assert torch.allclose(criterion(logits, torch.tensor([0, 1]), "loss"), torch.tensor([0.6931, 20.0]), atol=1e-4)


def test_feedback_climbs_the_guide_s_loss_on_each_image_s_class(trained):
    """Climbing the loss darkens class 0's images and brightens class 2's under a guide that
    reads brightness as class 0; scale 0 samples as before, bit for bit; the images are a
    function of their seeds; every second step moves less than every step."""
    _, gen = trained
    labels, seeds = [0] * 6 + [2] * 6, list(range(12))
    plain = gen.generate(labels, seeds, sampler=SAMPLER)
    loss = replace(SAMPLER, feedback=0.3, feedback_criterion="loss")
    guided = gen.generate(labels, seeds, sampler=loss, guide=ReadsByBrightness())
    brightness = (guided.float() - plain.float()).flatten(1).mean(1)
    assert (brightness[:6] < 0).all() and (brightness[6:] > 0).all(), brightness
    assert torch.equal(guided, gen.generate(labels, seeds, sampler=loss, guide=ReadsByBrightness()))
    alone = gen.generate(labels[7:8], seeds[7:8], sampler=loss, guide=ReadsByBrightness())
    assert (alone.float() - guided[7:8].float()).abs().max() <= 1  # an image does not depend on its batch
    sparse = gen.generate(labels, seeds, sampler=replace(loss, feedback_every=2), guide=ReadsByBrightness())
    moved = (sparse.float() - plain.float()).flatten(1).mean(1)
    assert moved[6:].mean() < brightness[6:].mean() and not torch.equal(sparse, guided)
    with pytest.raises(SynthaugError, match="needs both sampler.feedback > 0 and a guiding classifier"):
        gen.generate(labels, seeds, sampler=SAMPLER, guide=ReadsByBrightness())
    with pytest.raises(SynthaugError, match="needs both"):
        gen.generate(labels, seeds, sampler=loss)


def _config(tmp_path, *extra):
    return load_config(None, ["recipe=synaug", "generator.preset=tiny", "generator.sampling_steps=3",
                              "generator.precision=float32", "generator.seed=7", f"output_dir={tmp_path}", *extra])


def test_the_stage_guides_with_select_s_scorer_at_the_generator_s_seed_and_the_store_names_it(trained, tmp_path,
                                                                                              monkeypatch):
    """The scorer is asked for at the generator's seed and kept in the store; each row records the
    sampler with its feedback and the guide's fingerprint; a store made by another guide, or
    without feedback, refuses the run before anything is written; the run reports how the guide
    reads what it guided."""
    ds, gen = trained
    asked = []
    guides = {7: ReadsByBrightness(8.0), 8: ReadsByBrightness(4.0)}

    def scorer(real, config, folder, *, seed=None, progress=False):
        asked.append((folder, seed))
        return guides[seed]

    monkeypatch.setattr(select_stage_module, "scorer_for", scorer)
    plan = [{"id": f"r{i}", "label": i % 3, "seed": i} for i in range(6)]
    store_dir = tmp_path / "store"
    config = _config(tmp_path, "generator.feedback=0.2", "generator.feedback_criterion=loss")
    images, info = generate_stage(plan, gen, config, store_dir, ds)
    assert asked == [(store_dir / "scorers", 7)]
    rows = SyntheticStore(store_dir, ds.classes).rows()
    assert {r["sampler"] for r in rows} == {"sde-dpm-solver++/3 feedback loss 0.2"}
    assert {r["feedback_guide"] for r in rows} == {scorer_settings(ds, config, 7)[1]}  # the guide's training key
    sampling = replace(SAMPLER, steps=3, guidance_scale=config.generator.guidance_scale, feedback=0.2,
                       feedback_criterion="loss")
    assert torch.equal(images.images, gen.generate([r["label"] for r in plan], [r["seed"] for r in plan],
                                                   sampler=sampling, guide=guides[7]))
    with torch.no_grad():
        logits = guides[7](images.images.float() / 255)
    assert info["feedback"]["value"] == pytest.approx(float(criterion(logits, images.labels, "loss").mean()), rel=1e-5)
    assert info["feedback"]["read_as_class"] == pytest.approx(float((logits.argmax(1) == images.labels).float().mean()))
    before = sorted(p.name for p in store_dir.rglob("*"))
    other = _config(tmp_path, "generator.feedback=0.2", "generator.feedback_criterion=loss", "generator.seed=8")
    with pytest.raises(SynthaugError, match="made with feedback_guide"):
        generate_stage(plan, gen, other, store_dir, ds)
    assert len(asked) == 1  # refused before its scorer trained
    with pytest.raises(SynthaugError, match="made with sampler sde-dpm-solver\\+\\+/3 feedback loss 0.2, not "
                                            "sde-dpm-solver\\+\\+/3: use another store folder"):
        generate_stage(plan, gen, _config(tmp_path), store_dir, ds)
    guided_ray = _config(tmp_path / "elsewhere", "generator.feedback=0.2", "executor.name=ray")
    with pytest.raises(SynthaugError, match="executor 'ray' samples in workers"):
        generate_stage(plan, gen, guided_ray, tmp_path / "other-store", ds)
    assert sorted(p.name for p in store_dir.rglob("*")) == before and not (tmp_path / "other-store").exists()
    assert len(asked) == 1


class _Squares:
    """A stand-in generator whose noise prediction is x^2, whatever the conditioning."""

    def predict_noise(self, x, t, cond, cond_map):
        return x**2


class _Schedule:
    alphas_cumprod = torch.tensor([0.5, 1e-4])

    def scale_model_input(self, x, t):
        return x


@pytest.mark.parametrize("name", ["loss", "entropy"])
def test_the_step_is_the_classifier_s_gradient_through_the_blended_clean_image(name):
    """With eps = x^2 the classifier sees s(x) = x0 sqrt(1-a) + x (1 - sqrt(1-a)), x0 = (x - sqrt(1-a) x^2) / sqrt(a),
    rescaled by its (fixed) range r; the criterion's gradient is W^T dC/dz s'(x) / r (z = W s / r: the logits;
    the loss's dC/dz = p - y, the entropy's -p (log p + H)), and x moves by feedback |x| along it. Where a is below
    MIN_SIGNAL, x stays."""
    torch.manual_seed(0)
    x = torch.randn(3, 1, 2, 2) * 0.5
    labels = torch.tensor([0, 1, 0])
    guide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    w = guide[1].weight.detach()
    sampling = replace(SAMPLER, feedback=0.05, feedback_criterion=name)
    moved = feedback_step(_Squares(), x, torch.tensor(0), _Schedule(), None, None, labels, guide, sampling)
    a = 0.5
    fac = (1 - a) ** 0.5
    seen = ((x - fac * x**2) / a**0.5 * fac + x * (1 - fac)).flatten(1)
    low, high = seen.min(1, keepdim=True).values, seen.max(1, keepdim=True).values
    p = (((seen - low) / (high - low)) @ w.T).softmax(1)
    y = torch.nn.functional.one_hot(labels, 2).float()
    slope = (fac / a**0.5 * (1 - 2 * fac * x) + 1 - fac).flatten(1)
    entropy = -(p * p.log()).sum(1, keepdim=True)
    d_logits = p - y if name == "loss" else -p * (p.log() + entropy)
    grad = d_logits @ w * slope / (high - low)
    expected = x.flatten(1) + 0.05 * x.flatten(1).norm(dim=1, keepdim=True) * grad / grad.norm(dim=1, keepdim=True)
    assert torch.allclose(moved.flatten(1), expected, atol=1e-5)
    assert MIN_SIGNAL > 1e-4
    assert torch.equal(feedback_step(_Squares(), x, torch.tensor(1), _Schedule(), None, None, labels, guide, sampling), x)


def test_the_guide_reads_in_eval_mode_and_is_left_as_it_came():
    """A guide with batch norm handed over in training mode reads each image as in eval mode (no
    batch statistics, none updated) and is returned in training mode."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 2, 2) * 0.5
    labels = torch.tensor([0, 1, 0, 1])
    guide = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    guide[1].running_mean.fill_(0.3)
    sampling = replace(SAMPLER, feedback=0.05)
    before = guide[1].running_mean.clone()
    moved = feedback_step(_Squares(), x, torch.tensor(0), _Schedule(), None, None, labels, guide, sampling)
    assert guide.training and torch.equal(guide[1].running_mean, before)
    guide.eval()
    assert torch.equal(moved, feedback_step(_Squares(), x, torch.tensor(0), _Schedule(), None, None, labels, guide, sampling))
    assert not guide.training


def test_the_sampler_guides_every_nth_step_on_each_image_s_own_cell(trained, monkeypatch):
    """Feedback sees the images' own (class) conditioning, not the guided pair, on steps 0,
    every, 2 x every, ..."""
    _, gen = trained
    calls = []

    def spy(generator, x, t, scheduler, cond, cond_map, labels, guide, sampling, dtype=None):
        calls.append((int(t), cond.clone(), labels.clone()))
        return x

    monkeypatch.setattr(diffusion_module, "feedback_step", spy)
    labels = torch.tensor([2, 0, 1])
    gen.generate(labels, [1, 2, 3], sampler=replace(SAMPLER, steps=5, feedback=0.1, feedback_every=2),
                 guide=ReadsByBrightness())
    scheduler = diffusion_module.build_sampler(gen.config, SAMPLER.sampler)
    scheduler.set_timesteps(5)
    assert [t for t, _, _ in calls] == [int(t) for t in scheduler.timesteps[::2]]
    own = gen.class_input(gen.condition_ids(labels))
    assert all(torch.equal(cond, own) and torch.equal(y, labels) for _, cond, y in calls)
    # a group generator's composed guidance samples from the (class, null) and (null, group) cells; feedback
    # differentiates the image's own (class, group) cell
    ds = make_dataset((6, 6))
    ds.groups = torch.tensor([0, 1] * 6)
    grouped = DiffusionGenerator.fit(ds, GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny",
                                                         num_groups=2, group_guidance="composed"),
                                     GeneratorTrainConfig(steps=1, batch_size=8, warmup_steps=1), seed=0)
    calls.clear()
    labels, groups = torch.tensor([0, 1]), torch.tensor([1, 1])
    grouped.generate(labels, [1, 2], groups=groups, sampler=replace(SAMPLER, steps=2, feedback=0.1),
                     guide=ReadsByBrightness())
    own = grouped.class_input(grouped.condition_ids(labels, groups))
    assert len(calls) == 2 and all(torch.equal(cond, own) for _, cond, _ in calls)
    # image-guided rows (SDEdit, TADA's variants): feedback on the steps that run, from the noised image
    calls.clear()
    gen.generate([0, 1], [5, 6], sampler=replace(SAMPLER, feedback=0.1), guide=ReadsByBrightness(),
                 init_images=torch.full((2, 1, 8, 8), 128, dtype=torch.uint8), strength=0.5)
    scheduler.set_timesteps(SAMPLER.steps)
    assert [t for t, _, _ in calls] == [int(t) for t in scheduler.timesteps[SAMPLER.steps // 2:]]


def test_feedback_runs_only_where_its_classifier_is(trained, tmp_path):
    """A parallel executor samples in workers, which have no guide: refused in one line."""
    from synthaug.generate.executors import execute

    ds, gen = trained
    store = SyntheticStore(tmp_path / "store", ds.classes)
    with pytest.raises(SynthaugError, match="executor 'ray' samples in workers: set executor.name=local"):
        execute("ray", store, [{"id": "a", "label": 0, "seed": 0}], gen, replace(SAMPLER, feedback=0.1), ds,
                provenance={}, guide=ReadsByBrightness())
    assert not (tmp_path / "store").exists()


def test_feedback_is_a_sampling_option_and_leaves_the_generator_s_name_and_old_stores_alone(tmp_path):
    """At 0 (the former value) a store's provenance is what it was; the trained generator's cache
    key never depends on it (the same trained generator samples with and without), and the bench's
    shared stores keep their names at 0."""
    from synthaug.generate.cache import generator_fingerprint, sampler_config, sampling_provenance
    from synthaug.utils.keys import key_dict

    ds = make_dataset((6, 4, 2))
    plain, guided = _config(tmp_path), _config(tmp_path, "generator.feedback=0.03", "generator.feedback_every=2")
    assert sampling_provenance(sampler_config(plain.generator), "embedded")["sampler"] == "sde-dpm-solver++/3"
    assert sampling_provenance(sampler_config(guided.generator), "embedded")["sampler"] == \
        "sde-dpm-solver++/3 feedback entropy 0.03 every 2"
    assert generator_fingerprint(ds, plain.generator, 0) == generator_fingerprint(ds, guided.generator, 0)
    assert not any(k.startswith("feedback") for k in key_dict(plain.generator))
    assert {k for k in key_dict(guided.generator) if k.startswith("feedback")} == {"feedback", "feedback_every"}
