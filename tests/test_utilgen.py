"""UtilGen's pieces: the meta-gradient of the weight network (against finite differences),
meta-weighted training (resume, utilities), the Diffusion-DPO loss (against a hand-computed
value) and a DPO fine-tuning step."""

import copy
import math

import pytest
import torch
from conftest import die_after_saving_step, make_dataset
from torch import nn

from synthaug.classify import TrainConfig
from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.generate.cache import generator_fingerprint
from synthaug.generate.dpo import dpo_loss, finetune_dpo
from synthaug.generate.policy import (
    invert_noise,
    mix_noise,
    optimise_class_embeddings,
)
from synthaug.plan import utility_plan
from synthaug.recipes import get_recipe, utilgen
from synthaug.store import SyntheticStore
from synthaug.task import make_task
from synthaug.value import WeightNet, fit_meta_weighted, meta_gradient, utilities


def test_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    net = WeightNet(hidden=6).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(3, (8,))
    xv, yv = torch.randn(6, 5, dtype=torch.float64), torch.randint(3, (6,))
    lr = 0.5
    grads, val_loss = meta_gradient(model, net, x, y, xv, yv, lr)

    def look_ahead_val_loss():  # the same look-ahead, written out without autograd through the weight net
        params = dict(model.named_parameters())
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        with torch.no_grad():
            w = net(losses.detach())
        step = torch.autograd.grad((w * losses).mean(), list(params.values()))
        with torch.no_grad():
            fast = {k: p - lr * g for (k, p), g in zip(params.items(), step)}
            return float(nn.functional.cross_entropy(torch.func.functional_call(model, fast, (xv,)), yv))

    assert math.isclose(look_ahead_val_loss(), val_loss, rel_tol=1e-10)
    eps = 1e-6
    for p, g in zip(net.parameters(), grads):
        flat, numeric = p.data.view(-1), torch.zeros(p.numel(), dtype=torch.float64)
        for i in range(p.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = look_ahead_val_loss()
            flat[i] = old - eps
            down = look_ahead_val_loss()
            flat[i] = old
            numeric[i] = (up - down) / (2 * eps)
        assert torch.allclose(g.reshape(-1), numeric, atol=1e-7, rtol=1e-4), (g.reshape(-1)[:4], numeric[:4])
    assert any(float(g.abs().max()) > 1e-6 for g in grads)  # not a vacuous zero gradient


def test_weight_net_maps_losses_to_unit_interval():
    w = WeightNet()(torch.tensor([0.0, 0.5, 3.0, 50.0]))
    assert w.shape == (4,) and bool(((w >= 0) & (w <= 1)).all())


def test_meta_weighted_training_learns_to_down_weight_wrong_labels(tmp_path, monkeypatch):
    clean = make_dataset((30, 30, 30), seed=0)
    val = make_dataset((8, 8, 8), seed=1)
    noisy = make_dataset((30, 30, 30), seed=2)
    noisy.labels = (noisy.labels + 1) % 3  # every label wrong
    from synthaug.data import concat

    train = concat(clean, noisy)
    domains = torch.cat([torch.zeros(90), torch.ones(90)]).long()  # 'synthetic' = the mislabelled half here
    cfg = TrainConfig(epochs=6, batch_size=30, augment="none", lr=0.05)
    result = fit_meta_weighted(train, val, cfg, seed=0, domains=domains)
    u = utilities(result.model, result.weight_net, train)
    assert u.shape == (180,) and bool(((u >= 0) & (u <= 1)).all())
    assert float(u[:90].mean()) > float(u[90:].mean())  # the clean half is worth more to the task
    last = result.history[-1]
    assert last["mean_weight_real"] is not None and last["mean_weight_synthetic"] is not None
    # interrupted after epoch 2, resumed: the same weights as a run that never stopped
    undo = die_after_saving_step(monkeypatch, 2, key="epoch")
    with pytest.raises(KeyboardInterrupt):
        fit_meta_weighted(train, val, cfg, seed=0, domains=domains, checkpoint_dir=tmp_path)
    undo()
    resumed = fit_meta_weighted(train, val, cfg, seed=0, domains=domains, checkpoint_dir=tmp_path)
    for (k, a), b in zip(result.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    with pytest.raises(SynthaugError, match="validation split"):
        fit_meta_weighted(train, val.subset([]), cfg)


def test_dpo_loss_against_a_hand_computed_value():
    ew, el = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.25])
    rw, rl = torch.tensor([0.15, 0.30]), torch.tensor([0.15, 0.20])
    beta = 10.0
    # pair 1: (0.10 - 0.20) - (0.15 - 0.15) = -0.10 -> inside = +0.5; pair 2: 0.05 - 0.10 = -0.05 -> +0.25
    expected = -(math.log(1 / (1 + math.exp(-0.5))) + math.log(1 / (1 + math.exp(-0.25)))) / 2
    assert math.isclose(float(dpo_loss(ew, el, rw, rl, beta)), expected, rel_tol=1e-6)
    assert math.isclose(float(dpo_loss(rw, rl, rw, rl, beta)), math.log(2), rel_tol=1e-6)  # the reference itself


def test_dpo_finetuning_prefers_the_preferred_images():
    ds = make_dataset((12, 12, 12))
    gen = DiffusionGenerator.fit(ds, GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny"),
                                 GeneratorTrainConfig(steps=5, batch_size=8, warmup_steps=1), seed=0)
    before = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    preferred, rejected = ds.images[:12], 255 - ds.images[:12]  # prefer the real images over their negatives
    history = finetune_dpo(gen, preferred, rejected, ds.labels[:12], steps=30, batch_size=8, lr=1e-3, beta=500.0)
    assert len(history) == 3 and history[-1]["ranked_right"] >= history[0]["ranked_right"]
    assert history[-1]["ranked_right"] > 0.5
    assert any(not torch.equal(before[k], v) for k, v in gen.unet.state_dict().items())
    with pytest.raises(SynthaugError, match="pairs"):
        finetune_dpo(gen, preferred, rejected[:3], ds.labels[:12])


@pytest.fixture(scope="module")
def tiny_generator():
    ds = make_dataset((16, 16, 16))
    gen = DiffusionGenerator.fit(ds, GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny"),
                                 GeneratorTrainConfig(steps=30, batch_size=16, warmup_steps=1, lr=3e-3), seed=0)
    return ds, gen


def test_class_embedding_optimisation_moves_only_its_classes(tiny_generator):
    ds, gen = tiny_generator
    gen = copy.deepcopy(gen)
    table = gen.embedding_table()
    before = table.weight.detach().clone()
    unet_before = {k: v.clone() for k, v in gen.unet.state_dict().items() if "class_embedding" not in k}
    out = optimise_class_embeddings(gen, ds.images[:16], ds.labels[:16], steps=40, lr=0.05, proximity=0.1)
    moved = (table.weight.detach() - before).norm(dim=1) > 0
    cell = int(gen.condition_ids(torch.tensor([0])))
    assert moved.tolist() == [i == cell for i in range(len(before))]  # class 0's vector, nothing else
    assert all(torch.equal(v, gen.unet.state_dict()[k]) for k, v in unet_before.items())  # the network is untouched
    assert out["loss_last"] < out["loss_first"] and len(out["relative_shift"]) == 1
    tight = optimise_class_embeddings(copy.deepcopy(tiny_generator[1]), ds.images[:16], ds.labels[:16], steps=40,
                                      lr=0.05, proximity=100.0)
    assert tight["relative_shift"][0] < out["relative_shift"][0]  # the proximity term holds it near the original


def test_ddim_inversion_finds_the_noise_of_an_image(tiny_generator):
    ds, gen = tiny_generator
    sampler = SamplerConfig(sampler="ddim", steps=25, guidance_scale=1.0)
    made = gen.generate(ds.labels[::8], list(range(6)), sampler=sampler)  # images the sampler can reach
    inverted = invert_noise(gen, made, ds.labels[::8], steps=25)
    again = gen.generate(ds.labels[::8], list(range(100, 106)), sampler=sampler, noise=inverted)
    other = gen.generate(ds.labels[::8], list(range(100, 106)), sampler=sampler)
    err = (again.float() - made.float()).abs().mean()
    assert err < 0.5 * (other.float() - made.float()).abs().mean(), err
    assert torch.equal(mix_noise(inverted, range(6), 1.0), inverted)
    fresh = mix_noise(torch.zeros(400, 1, 8, 8), range(400), 0.6)
    assert abs(float(fresh.std()) - 0.8) < 0.02  # sqrt(1 - 0.36) of fresh unit noise
    with pytest.raises(SynthaugError, match="noise must be"):
        gen.generate(ds.labels[:2], [0, 1], sampler=sampler, noise=inverted)


def test_ddim_inversion_guides_the_steps_its_sampler_guides(tiny_generator, monkeypatch):
    """With a guidance interval the inversion guides exactly the timesteps the sampler does (two
    branches there, the class's alone elsewhere), so the sampler can return along the same path."""
    ds, gen = tiny_generator
    passes = []
    real = type(gen).predict_noise
    monkeypatch.setattr(type(gen), "predict_noise", lambda self, x, t, c, m: passes.append((int(t), len(x))) or real(self, x, t, c, m))
    sampler = SamplerConfig(sampler="ddim", steps=10, guidance_scale=3.0, guidance_interval=(0.28, 5.42))
    gen.generate(ds.labels[:2], [0, 1], sampler=sampler)
    sampled = dict(passes)
    passes.clear()
    invert_noise(gen, ds.images[:2], ds.labels[:2], steps=10, guidance_scale=3.0, guidance_interval=(0.28, 5.42))
    assert dict(passes) == sampled and sorted(set(sampled.values())) == [2, 4]


def test_utility_plan():
    ds = make_dataset((4, 4, 4))
    plan = utility_plan(ds, per_class=3, round_name="r1", seed=0)
    assert len(plan) == 9 and plan[0]["id"] == "utilgen-r1-c0-000000" and "noise_from" not in plan[0]
    guided = utility_plan(ds, per_class=3, round_name="r2", noise_from={0: ["a", "b"], 2: ["z"]}, noise_mix=0.7)
    assert [r.get("noise_from") for r in guided] == ["a", "b", "a", None, None, None, "z", "z", "z"]
    assert guided[0]["noise_mix"] == 0.7 and guided[0]["conditioning"] == "class+noise"
    renoised = utility_plan(ds, per_class=3, round_name="r2", noise_from={0: ["a"]}, renoise_strength=0.6)
    assert renoised[0]["strength"] == 0.6 and renoised[0]["conditioning"] == "class+image" and "noise_mix" not in renoised[0]
    assert "strength" not in renoised[3]
    with pytest.raises(SynthaugError, match="per class"):
        utility_plan(ds, per_class=0, round_name="r1")


UTILGEN = ["recipe=utilgen", "data.dataset=digits", "split.kind=few-shot", "split.k=10", "split.val_per_class=3",
           "train.epochs=2", "train.batch_size=32", "train.augment=none", "utilgen.rounds=2", "utilgen.valuation_epochs=1",
           "utilgen.embedding_steps=4", "utilgen.dpo_steps=4", "utilgen.sampling_steps=4", "utilgen.final_multiple=2",
           "generator.preset=tiny", "generator.steps=6", "generator.batch_size=8", "generator.sampling_batch_size=64"]


@pytest.fixture(scope="module")
def digits_task():
    config = load_config(None, UTILGEN)
    return make_task(load_dataset("digits"), config.split)


def test_utilgen_rounds_end_to_end_and_resume(digits_task, tmp_path, monkeypatch):
    config = load_config(None, [*UTILGEN, f"output_dir={tmp_path}"])
    reference = get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "ref")
    u = reference.extra["utilgen"]
    n_real = len(digits_task.train)
    assert [r["round"] for r in u["rounds"]] == [1, 2] and u["final_images"] == 2 * n_real == len(reference.synthetic)
    assert 0 <= u["synthetic_only"]["balanced_accuracy"] <= 1 and set(u["features"]) == {"real", "before", "after"}
    assert reference.extra["memorization"]["median"] > 0 and reference.extra["diversity_ratio"] > 0
    rows = {r["id"]: r for r in SyntheticStore(tmp_path / "ref" / "synthetic", digits_task.train.classes).rows()}
    assert all("utility_r1" in r["scores"] for i, r in rows.items() if i.startswith("utilgen-r1-"))
    assert all("utility_r2" in r["scores"] for i, r in rows.items() if i.startswith("utilgen-r2-"))
    # round 2 starts from noise around round 1's high-utility images
    high = set(u["rounds"][0]["examples"]["highest"])
    r2 = [r for i, r in rows.items() if i.startswith("utilgen-r2-")]
    assert r2 and all(r["noise_from"] in high for r in r2)
    assert {r["generator"] for r in r2}.isdisjoint({r["generator"] for i, r in rows.items() if i.startswith("utilgen-r1-")})

    # killed in round 2's model-level step, run again: the same result as the run that never stopped
    calls = []
    real_dpo = DiffusionGenerator.finetune_dpo

    def dpo_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_dpo(*args, **kwargs)

    monkeypatch.setattr(DiffusionGenerator, "finetune_dpo", dpo_then_die)
    with pytest.raises(KeyboardInterrupt):
        get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "run")
    assert (tmp_path / "run" / "rounds" / "r1" / "round.json").exists()
    assert not (tmp_path / "run" / "rounds" / "r2" / "round.json").exists()
    monkeypatch.setattr(DiffusionGenerator, "finetune_dpo", real_dpo)
    resumed = get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "run")
    assert resumed.metrics["balanced_accuracy"] == reference.metrics["balanced_accuracy"]
    assert resumed.extra["generator"]["fingerprint"] == reference.extra["generator"]["fingerprint"]
    assert torch.equal(resumed.synthetic.images, reference.synthetic.images)

    # the finished run again (`run` after `train`): the synthetic-only classifier's result is read back
    import synthaug.recipes.utilgen as utilgen

    def refuse(*args, **kwargs):
        raise AssertionError("the synthetic-only classifier was trained again")

    monkeypatch.setattr(utilgen, "fit_classifier", refuse)
    again = get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "ref")
    assert again.extra["utilgen"]["synthetic_only"] == u["synthetic_only"]


def test_utilgen_needs_a_validation_split(digits_task, tmp_path):
    config = load_config(None, [*UTILGEN, f"output_dir={tmp_path}", "split.val_per_class=0"])
    task = make_task(load_dataset("digits"), config.split)
    with pytest.raises(SynthaugError, match="split.val_per_class"):
        get_recipe("utilgen").run(task, config, workdir=tmp_path / "x")


def test_noise_optimisation_off_ddim_renoises_the_high_utility_images(digits_task, tmp_path):
    # only DDIM follows an inverted noise back to its image: with another sampler the next round
    # starts from the high-utility images themselves, noised to utilgen.renoise_strength (SDEdit)
    config = load_config(None, [*UTILGEN, f"output_dir={tmp_path}", "utilgen.sampler=sde-dpm-solver++",
                                "utilgen.renoise_strength=0.5", "utilgen.rounds=1", "utilgen.model_level=false",
                                "utilgen.embedding=false", "utilgen.top_share=0.5"])  # several sources per class
    result = get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "run")
    store = SyntheticStore(tmp_path / "run" / "synthetic", digits_task.train.classes)
    rows = {r["id"]: r for r in store.rows()}
    first = result.extra["utilgen"]["rounds"][0]
    high = first["examples"]["highest"]
    assert "dpo" not in first and "embedding" not in first  # the switched-off steps did not run
    # top_share 0.5: half of each class's round images, as many high as low
    assert len(high) == len(first["examples"]["lowest"]) == 10 * (first["images"] // 10 // 2)
    final = [r for i, r in rows.items() if i.startswith("utilgen-final-")]
    assert final and all(r["noise_from"] in high and r["strength"] == 0.5 and r["conditioning"] == "class+image"
                         and "noise_mix" not in r for r in final)
    # the bank a resumed run reloads holds those very images
    bank, noise_from = utilgen._load_noise(tmp_path / "run" / "rounds" / "r1")
    kept = store.load(ids=high)  # in the store's order
    assert sorted(bank) == sorted(high)
    assert all(torch.equal(bank[r["id"]], kept.images[k]) for k, r in enumerate(kept.info["rows"]))
    # half the steps re-run from the image: each final image is nearer its own source than the
    # other high-utility image of its class
    images = {i: store.load(ids=[i]).images[0].float() for i in [*high, *[r["id"] for r in final]]}
    nearer = []
    for r in final:
        other = next(h for h in noise_from[r["label"]] if h != r["noise_from"])
        nearer.append(bool((images[r["id"]] - images[r["noise_from"]]).abs().mean()
                           < (images[r["id"]] - images[other]).abs().mean()))
    assert sum(nearer) > 0.8 * len(nearer)
    with pytest.raises(SynthaugError, match="renoise_strength"):
        load_config(None, [*UTILGEN, "utilgen.renoise_strength=0"])


def test_with_every_policy_step_off_the_final_set_starts_from_fresh_noise(digits_task, tmp_path):
    config = load_config(None, [*UTILGEN, f"output_dir={tmp_path}", "utilgen.rounds=1", "utilgen.model_level=false",
                                "utilgen.embedding=false", "utilgen.noise=false"])
    result = get_recipe("utilgen").run(digits_task, config, workdir=tmp_path / "run")
    assert not {"dpo", "embedding"} & set(result.extra["utilgen"]["rounds"][0])
    rows = SyntheticStore(tmp_path / "run" / "synthetic", digits_task.train.classes).rows()
    final = [r for r in rows if r["id"].startswith("utilgen-final-")]
    assert final and not any("noise_from" in r or "noise_mix" in r for r in final)


def test_dpo_leaves_the_class_embeddings_to_the_policy(tiny_generator):
    ds, gen = tiny_generator
    gen = copy.deepcopy(gen)
    before = gen.embedding_table().weight.detach().clone()
    finetune_dpo(gen, ds.images[:8], 255 - ds.images[:8], ds.labels[:8], steps=3, batch_size=4, lr=1e-3)
    assert torch.equal(gen.embedding_table().weight, before)


def test_sample_seed_redraws_the_images_without_retraining(digits_task):
    base = load_config(None, UTILGEN)
    redrawn = load_config(None, [*UTILGEN, "generator.sample_seed=7"])
    assert base.generator.plan_seed == base.generator.seed and redrawn.generator.plan_seed == 7
    assert generator_fingerprint(digits_task.train, base.generator, 0) == \
        generator_fingerprint(digits_task.train, redrawn.generator, 0)
    seeds = [[r["seed"] for r in utility_plan(digits_task.train, per_class=2, round_name="final", seed=c.generator.plan_seed)]
             for c in (base, redrawn)]
    assert seeds[0] != seeds[1]
