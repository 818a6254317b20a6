"""Issue 21's levers, each shown to do what it says on data with a known answer (a mutation
that disables one fails here): DiffuLT's distance filter and band, prototype cleaning, the
synthetic loss weight, the real-replay control and the replay share of SYNAuG, deferred re-weighting, and the
generator's tail levers (class sampling, Min-SNR weighting, CBDM's regulariser, the EMA's
half-life); the report's baselines at the recipe's optimiser steps; the weighted prior's checkpoint key."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import make_dataset

import synthaug.recipes.synaug as synaug_module
from synthaug.classify import TrainConfig, fit_classifier
from synthaug.config import load_config
from synthaug.data import ImageDataset, LoadedDataset
from synthaug.errors import SynthaugError
from synthaug.plan import balance_plan, plan_cells
from synthaug.recipes import get_recipe
from synthaug.select.filters import Candidates, centre_distances, get_selector, prototype_margins
from synthaug.task import make_task


def _candidates(features, labels, real, real_labels):
    return Candidates(labels=labels, probs=lambda: None, features=lambda: features, real_features=lambda: real,
                      real_labels=real_labels)


# class 0's real features lie on the unit circle around (0, 0): centre (0, 0), d_f = 1;
# class 1's around (10, 0)
REAL = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1], [11, 0], [9, 0], [10, 1], [10, -1]])
REAL_LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
# class-0 candidates at distance 0.5 (in distribution), 1.5 (the band), 2.5 (out of distribution), and one
# at (8, 0): 8 from its own centre and 2 from class 1's
FEATURES = torch.tensor([[0.5, 0], [0, 1.5], [-2.5, 0], [8, 0]])
LABELS = torch.tensor([0, 0, 0, 0])


def test_diffult_distances_are_over_the_largest_real_distance():
    ratio, missing = centre_distances(FEATURES, LABELS, REAL, REAL_LABELS)
    assert ratio.tolist() == pytest.approx([0.5, 1.5, 2.5, 8.0]) and missing == 0


@pytest.mark.parametrize("method, kept", [("diffult", {0, 1}), ("diffult-band", {1}), ("prototype", {0, 1, 2})])
def test_the_filters_keep_what_they_should(method, kept):
    mask, scores = get_selector(method)(_candidates(FEATURES, LABELS, REAL, REAL_LABELS), {0: 4}, seed=0)
    assert set(mask.nonzero().flatten().tolist()) == kept and len(scores) == 4


@pytest.mark.parametrize("threshold, kept", [(0.5, {0, 2}), (0.35, {0, 2, 3}), (0.85, {0})])
def test_the_agreement_filter_keeps_the_candidates_read_as_their_class_confidently(threshold, kept):
    # the scorer reads candidate 1 as another class; candidate 3 as its own, at 0.4
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.3, 0.7, 0.0], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3]])
    c = Candidates(labels=LABELS, probs=lambda: probs, features=lambda: None, real_features=lambda: None,
                   real_labels=REAL_LABELS)
    mask, scores = get_selector("agreement")(c, {0: 4}, threshold=threshold, seed=0)
    assert set(mask.nonzero().flatten().tolist()) == kept and scores.tolist() == pytest.approx([0.9, 0.3, 0.8, 0.4])
    mask, _ = get_selector("agreement")(c, {0: 1}, threshold=threshold, seed=0)
    assert mask.sum() == 1 and set(mask.nonzero().flatten().tolist()) <= kept  # as many as the class needs


def test_realism_and_confidence_keep_the_most_realistic_and_the_most_confident():
    # realism (Kynkaanniemi et al.): the candidates inside class 0's real neighbourhoods score highest
    mask, scores = get_selector("realism")(_candidates(FEATURES, LABELS, REAL, REAL_LABELS), {0: 2}, k=3)
    assert set(mask.nonzero().flatten().tolist()) == {0, 1} and scores[0] > scores[2] > scores[3]
    probs = torch.tensor([[0.2, 0.8, 0.0], [0.6, 0.2, 0.2], [0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    c = Candidates(labels=LABELS, probs=lambda: probs, features=lambda: None, real_features=lambda: None,
                   real_labels=REAL_LABELS)
    mask, scores = get_selector("confidence")(c, {0: 2})
    assert set(mask.nonzero().flatten().tolist()) == {1, 2} and scores.tolist() == pytest.approx([0.2, 0.6, 0.9, 0.4])


def test_prototype_margins():
    # prototypes (0, 0) and (10, 0): the distance to the other class's prototype minus to one's own
    margins = prototype_margins(FEATURES, LABELS, REAL, REAL_LABELS)
    assert margins.tolist() == pytest.approx([9.5 - 0.5, (100 + 2.25) ** 0.5 - 1.5, 12.5 - 2.5, 2 - 8])


@pytest.fixture(scope="module")
def data():
    return LoadedDataset("tiny", make_dataset((40, 40, 40), seed=0), make_dataset((10, 10, 10), seed=1))


FAST = ["recipe=synaug", "train.epochs=1", "train.batch_size=16", "train.augment=none", "split.ratio=8", "split.n_max=32"]


def test_replay_adds_real_copies_in_the_plans_counts_and_weights_them(data, tmp_path, monkeypatch):
    seen = {}
    real_fit = synaug_module.fit_classifier

    def spy(train, cfg, **kwargs):
        seen["train"], seen["weights"], seen["augment"] = train, kwargs["sample_weights"], kwargs["synthetic_augment"]
        return real_fit(train, cfg, **kwargs)

    monkeypatch.setattr(synaug_module, "fit_classifier", spy)
    config = load_config(None, [*FAST, "synaug.replay=true", "synaug.synthetic_weight=0.3", "synaug.synthetic_augment=crop",
                                f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    real = task.train
    deficits = (real.class_counts().max() - real.class_counts()).tolist()
    replayed = result.replayed
    assert result.synthetic is None  # nothing generated: the report shows no generated samples
    assert replayed.class_counts().tolist() == deficits  # the plan's counts, no generator involved
    pool = {bytes(im.numpy().tobytes()): int(label) for im, label in zip(real.images, real.labels)}
    assert all(pool.get(bytes(im.numpy().tobytes())) == int(label) for im, label in zip(replayed.images, replayed.labels))
    weights = seen["weights"]
    assert weights[: len(real)].eq(1).all() and torch.allclose(weights[len(real):], torch.tensor(0.3))
    assert len(weights) == len(seen["train"]) == len(real) + sum(deficits)
    assert result.extra["synthetic"]["replay"] and "generator" not in result.seconds
    assert seen["augment"] == "crop"  # the added images' own augmentation, passed on


def test_unseen_fills_the_generated_share_with_real_images_the_split_left_out(data, tmp_path, monkeypatch):
    """The perfect-generator control: no generator; the replay share is drawn again from the
    training split, and every row the run would generate is a real image of its class that the
    split never held, none twice."""
    def no_generator(*args, **kwargs):
        raise AssertionError("synaug.unseen trains or loads no generator")

    monkeypatch.setattr(synaug_module, "generator_stage", no_generator)
    config = load_config(None, [*FAST, "synaug.unseen=true", "split.val_per_class=2", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    get_recipe("synaug").check(task, config)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    plan = balance_plan(task.train, seed=config.generator.plan_seed)
    replayed_rows, unseen_rows = synaug_module.split_replay(plan, 0.5, task.train)
    added = result.replayed
    train = {bytes(im.numpy().tobytes()) for im in task.train.images}
    oracle = {bytes(im.numpy().tobytes()): int(label) for im, label in zip(task.oracle.images, task.oracle.labels)}
    drawn = [(bytes(im.numpy().tobytes()), int(label)) for im, label in zip(added.images, added.labels)]
    again = [d for d in drawn if d[0] in train]
    new = [d for d in drawn if d[0] not in train]
    assert len(again) == len(replayed_rows) and len(new) == len(unseen_rows) > 0
    val = {bytes(im.numpy().tobytes()) for im in task.val.images}
    assert not val & {image for image, _ in new}  # the validation split's images are not new to the run
    assert all(oracle.get(image) == label for image, label in new)  # real images of their own class
    assert len({image for image, _ in new}) == len(new)  # none twice: the pool is large enough here
    deficits = (task.train.class_counts().max() - task.train.class_counts()).tolist()
    assert added.class_counts().tolist() == deficits and result.synthetic is None
    info = result.extra["synthetic"]
    assert (info["images"], info["replayed"], info["unseen"]) == (0, len(replayed_rows), len(unseen_rows))
    assert info["unseen_distinct"] == len(unseen_rows)
    assert "generator" not in result.seconds


def test_unseen_with_the_whole_fill_replayed_reports_real_replay(data, tmp_path):
    """replay_share 1 leaves the control nothing to fill: the run is real replay and says so."""
    config = load_config(None, [*FAST, "synaug.unseen=true", "synaug.replay_share=1", f"output_dir={tmp_path}"])
    result = get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run")
    assert result.extra["generator"]["source"] == "none: real replay"
    assert "unseen" not in result.extra["synthetic"] and result.extra["synthetic"]["images"] > 0


def test_draw_unseen_keeps_a_partial_fills_images_a_prefix_and_starts_over_when_the_pool_runs_out():
    pool = make_dataset((3, 5), seed=4)
    real = make_dataset((20, 2), seed=5)
    full = balance_plan(real, seed=0)  # 18 rows of class 1
    half = balance_plan(real, seed=0, fill=0.5)  # the first 4 of them
    a, b = synaug_module.draw_unseen(pool, full, seed=3), synaug_module.draw_unseen(pool, half, seed=3)
    assert torch.equal(a.images[: len(b)], b.images) and a.labels.eq(1).all()
    firsts = a.images[:5].flatten(1)
    assert len({bytes(x.numpy().tobytes()) for x in firsts}) == 5  # the 5 pool images of class 1, each once
    assert torch.equal(a.images[5:10], a.images[:5])  # then again, in the same order
    assert a.info["distinct"] == 5 and b.info["distinct"] == 4
    assert not torch.equal(synaug_module.draw_unseen(pool, full, seed=4).images[:5], a.images[:5])  # seeded
    with pytest.raises(SynthaugError, match="class 'class1' needs images and the oracle holds none"):
        synaug_module.draw_unseen(pool.subset(torch.arange(3)), full, seed=0)


def test_unseen_is_checked_before_anything_is_written(data, tmp_path, capsys, monkeypatch):
    with pytest.raises(SynthaugError, match="synaug.replay and synaug.unseen both"):
        load_config(None, ["synaug.replay=true", "synaug.unseen=true"])
    config = load_config(None, [*FAST, "synaug.unseen=true", "synaug.translate=0.5"])
    with pytest.raises(SynthaugError, match="synaug.unseen generates none"):
        get_recipe("synaug").check(make_task(data, config.split), config)
    for control in ("replay", "unseen"):  # nothing generated: nothing to select
        config = load_config(None, [*FAST, f"synaug.{control}=true", "select.method=prototype"])
        with pytest.raises(SynthaugError, match=f"synaug.{control} generates no image, so select.method would do nothing"):
            get_recipe("synaug").check(make_task(data, config.split), config)
        config = load_config(None, [*FAST, f"synaug.{control}=true", "validate.enabled=true"])
        with pytest.raises(SynthaugError, match=f"synaug.{control} generates no image, so validate.enabled would do nothing"):
            get_recipe("synaug").check(make_task(data, config.split), config)
    # a coloured split repaints the oracle's images: nothing in it is the training split's own image left out
    data = LoadedDataset("tiny", make_dataset((40, 40, 40), channels=3, seed=0), make_dataset((10, 10, 10), channels=3, seed=1))
    config = load_config(None, ["recipe=synaug", "split.kind=colored", "split.agreement=0.9", "synaug.unseen=true"])
    with pytest.raises(SynthaugError, match="a coloured split repaints them"):
        get_recipe("synaug").check(make_task(data, config.split), config)
    from conftest import run_cli

    out = tmp_path / "runs"
    code, _, err = run_cli(["run", "--quiet", "-s", "data.dataset=digits", "-s", "split.kind=colored", "-s", f"output_dir={out}",
                            "-s", f"data.cache_dir={tmp_path / 'cache'}", "-s", "recipe=synaug", "-s", "synaug.unseen=true"], capsys, monkeypatch)
    assert code == 2 and "a coloured split repaints them" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing written


@pytest.mark.parametrize("real_spec, synthetic_spec", [("cutout", "none"), ("none", "cutout")])
def test_synthetic_augment_gives_the_synthetic_images_their_own_augmentation(monkeypatch, real_spec, synthetic_spec):
    """Real images are black, synthetic ones white: each augmentation sees its domain's images only."""
    from synthaug.classify.train import Augmentation

    seen = []
    original = Augmentation.__call__
    monkeypatch.setattr(Augmentation, "__call__", lambda self, x: seen.append(x.clone()) or original(self, x))
    ds = make_dataset((12, 12))
    domains = torch.arange(len(ds)) % 3 == 0
    ds.images[:] = torch.where(domains[:, None, None, None], 255, 0).to(torch.uint8)
    fit_classifier(ds, TrainConfig(epochs=2, batch_size=8, augment=real_spec), domains=domains,
                   synthetic_augment=synthetic_spec)
    augmented = torch.cat(seen)
    assert len(augmented) == 2 * int((domains if synthetic_spec != "none" else ~domains).sum())  # every draw, once
    assert augmented.eq(255 if synthetic_spec != "none" else 0).all()


def test_split_replay_gives_each_cell_its_share_and_keeps_the_generated_rows_ids():
    plan = balance_plan(make_dataset((20, 10, 4)), seed=0)  # cells of 10 and 16 rows
    replayed, generated = synaug_module.split_replay(plan, 0.5)
    assert [sum(r["label"] == c for r in replayed) for c in range(3)] == [0, 5, 8]
    assert {r["id"] for r in replayed} | {r["id"] for r in generated} == {r["id"] for r in plan}
    assert not {r["id"] for r in replayed} & {r["id"] for r in generated}
    assert synaug_module.split_replay(plan, 0) == ([], plan) and synaug_module.split_replay(plan, 1) == (plan, [])


def test_split_replay_generates_a_cell_without_real_images_in_full():
    ds = make_dataset((6, 6))
    ds.groups, ds.group_names = torch.tensor([0] * 5 + [1] * 7), ["red", "green"]  # cell (1, 0) has no image
    plan = balance_plan(ds, by_group=True, seed=0)
    cells = {cell: len(rows) for cell, rows in plan_cells(plan).items()}
    assert cells[(1, 0)] == 6 and cells[(0, 1)] == 5
    replayed, generated = synaug_module.split_replay(plan, 0.6, ds)
    drawn = [(r["label"], r["group"]) for r in replayed]
    assert {cell: drawn.count(cell) for cell in set(drawn)} == {(0, 0): 1, (0, 1): 3}  # round(0.6 x 1), round(0.6 x 5)
    assert sum((r["label"], r["group"]) == (1, 0) for r in generated) == 6  # none drawn from the other colour
    assert len(generated) + len(replayed) == len(plan)


def test_replay_share_fills_part_of_each_cell_with_real_copies_and_generates_the_rest(data, tmp_path, monkeypatch):
    """A stand-in generator marks its images (all 255): the share of each cell drawn again
    is real, the rest is asked of the generator (its rows only) and weighted like it."""
    asked, seen = {}, {}

    def fake_generator_stage(real, config, **kwargs):
        return type("G", (), {"config": type("C", (), {"num_groups": 0})()})(), {"seconds": 0.0}

    def fake_select_stage(plan, generator, config, store_dir, real, **kwargs):
        asked["ids"] = [r["id"] for r in plan]
        images = torch.full((len(plan), *real.images.shape[1:]), 255, dtype=torch.uint8)
        made = ImageDataset(images, torch.tensor([r["label"] for r in plan]), real.classes)
        return made, {"images": len(plan), "generated_now": len(plan), "seconds": 0.0}

    real_fit = synaug_module.fit_classifier

    def spy(train, cfg, **kwargs):
        seen["weights"] = kwargs["sample_weights"]
        return real_fit(train, cfg, **kwargs)

    monkeypatch.setattr(synaug_module, "generator_stage", fake_generator_stage)
    monkeypatch.setattr(synaug_module, "select_stage", fake_select_stage)
    monkeypatch.setattr(synaug_module, "fit_classifier", spy)
    config = load_config(None, [*FAST, "synaug.replay_share=0.5", "synaug.synthetic_weight=0.3", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    plan = balance_plan(task.train, seed=config.generator.plan_seed)
    replayed_rows, generated_rows = synaug_module.split_replay(plan, 0.5)
    assert asked["ids"] == [r["id"] for r in generated_rows]  # the generator is asked for its share only
    generated, replayed = result.synthetic, result.replayed
    assert generated.images.flatten(1).eq(255).all()  # the report's synthetic images: the generator's only
    deficits = (task.train.class_counts().max() - task.train.class_counts()).tolist()
    assert (generated.class_counts() + replayed.class_counts()).tolist() == deficits  # the plan's counts in all
    for c in range(3):
        assert int((replayed.labels == c).sum()) == sum(r["label"] == c for r in replayed_rows) == round(deficits[c] / 2)
    pool = {bytes(im.numpy().tobytes()) for im in task.train.images}
    assert all(bytes(im.numpy().tobytes()) in pool for im in replayed.images)  # real copies
    assert len(seen["weights"]) == len(task.train) + sum(deficits)  # both trained on
    assert torch.allclose(seen["weights"][len(task.train):], torch.tensor(0.3))
    assert result.extra["synthetic"]["replayed"] == len(replayed_rows) and not result.extra["synthetic"].get("replay")


def test_replay_share_and_synthetic_augment_are_checked():
    with pytest.raises(SynthaugError, match="synaug.replay_share"):
        load_config(None, ["synaug.replay_share=1.5"])
    assert load_config(None, []).synaug.replay_share == 0.5  # the default: half of each cell's fill drawn again
    load_config(None, ["synaug.replay=true"])  # replays the whole fill: the default share is moot, not an error
    with pytest.raises(SynthaugError, match="synaug.synthetic_augment: unknown augmentation 'blur'"):
        load_config(None, ["synaug.synthetic_augment=crop+blur"])


def test_synthetic_weight_is_checked():
    with pytest.raises(SynthaugError, match="synaug.synthetic_weight"):
        load_config(None, ["synaug.synthetic_weight=0"])


def test_feature_diffusion_starts_from_its_seed_whatever_ran_before():
    """LDMLR builds its denoiser after the classifier: a run resumed past the classifier's
    training once started it from other weights than an uninterrupted run."""
    from synthaug.generate.features import FeatureDiffusion

    torch.manual_seed(1)
    a = FeatureDiffusion(4, 2, hidden=8, blocks=1, seed=3)
    torch.manual_seed(2)
    before = torch.get_rng_state()
    b = FeatureDiffusion(4, 2, hidden=8, blocks=1, seed=3)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    pairs = zip(a.denoiser.state_dict().values(), b.denoiser.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    other = FeatureDiffusion(4, 2, hidden=8, blocks=1, seed=4)
    assert not torch.equal(next(iter(other.denoiser.parameters())), next(iter(a.denoiser.parameters())))


def test_feature_diffusion_learns_each_class_s_distribution():
    """Two classes of 2-D features around (-3, 0) and (+3, 0): generated features land by
    their class (a denoiser that ignored the label would put half of them by the other)."""
    from synthaug.generate.features import FeatureDiffusion

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1]).repeat_interleave(300)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    feats = centres[labels] + 0.3 * torch.randn(600, 2, generator=g)
    model = FeatureDiffusion(2, 2, hidden=64, blocks=2).fit(feats, labels, steps=600, batch_size=128, seed=0)
    wanted = torch.tensor([0, 1]).repeat_interleave(200)
    made = model.generate(wanted, seed=1, sampling_steps=25)
    nearest = torch.cdist(made, centres).argmin(1)
    assert (nearest == wanted).float().mean() > 0.95
    for c in (0, 1):
        assert (made[wanted == c].mean(0) - centres[c]).norm() < 0.6
    assert torch.equal(made, model.generate(wanted, seed=1, sampling_steps=25))  # seeded


def test_ldmlr_fills_the_tail_with_features_and_retrains_only_the_head(data, tmp_path, monkeypatch):
    import synthaug.recipes.ldmlr as ldmlr_module
    from synthaug.recipes.ldmlr import deficit_labels

    assert deficit_labels(torch.tensor([5, 2, 0]), None).tolist() == [1, 1, 1, 2, 2, 2, 2, 2]
    assert deficit_labels(torch.tensor([5, 2]), 6).tolist() == [0, 1, 1, 1, 1]
    seen = {}
    real_fit_head = ldmlr_module.fit_head

    def spy(model, feats, labels, num_classes, **kwargs):
        seen["labels"], seen["backbone"] = labels.cpu(), {k: v.clone() for k, v in model.backbone.state_dict().items()}
        seen["features"] = feats.cpu().clone()
        out = real_fit_head(model, feats, labels, num_classes, **kwargs)
        seen["after"] = model.backbone.state_dict()
        return out

    monkeypatch.setattr(ldmlr_module, "fit_head", spy)
    config = load_config(None, ["recipe=ldmlr", "train.epochs=1", "train.batch_size=16", "train.augment=none",
                                "split.ratio=8", "split.n_max=32", "ldmlr.steps=20", "ldmlr.hidden=32",
                                "ldmlr.sampling_steps=5", "ldmlr.head_epochs=1", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("ldmlr").run(task, config, workdir=tmp_path / "run")
    counts = task.train.class_counts()
    filled = torch.bincount(seen["labels"], minlength=3)
    assert filled.tolist() == [int(counts.max())] * 3  # real + generated: every class at the largest
    assert result.extra["synthetic"]["images"] == int((counts.max() - counts).sum())
    assert all(torch.equal(seen["backbone"][k], v) for k, v in seen["after"].items())  # the features stay
    assert 0 <= result.metrics["balanced_accuracy"] <= 1
    # the head sees the real images' features, then generated ones: new vectors, not copies of real ones
    from synthaug.classify.train import extract_features

    real = extract_features(result.model, task.train.images).cpu()
    n = len(task.train)
    assert torch.allclose(seen["features"][:n], real, atol=1e-5)
    generated = seen["features"][n:]
    assert len(generated) and torch.cdist(generated, real).min() > 1e-3


def test_tada_targeting_per_class_and_by_share():
    from synthaug.plan import target_mask

    # class 0's losses are all high, class 1's all low, each with one outlier above its class
    losses = torch.tensor([5.0, 5.1, 5.2, 9.0, 0.1, 0.2, 0.1, 1.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert target_mask(losses, labels).tolist() == [True, True, True, True, False, False, False, False]
    assert target_mask(losses, labels, per_class=True).tolist() == [False, False, False, True, False, False, False, True]
    assert target_mask(losses, labels, share=0.25).tolist() == [False, False, True, True, False, False, False, False]
    assert target_mask(losses, labels, share=0.25, per_class=True).tolist() == \
        [False, False, False, True, False, False, False, True]


def test_tada_averages_the_losses_of_the_last_early_epochs(data, tmp_path, monkeypatch):
    import synthaug.recipes.tada as tada_module

    calls = []

    def fake_losses(model, train):  # the first scoring says 1, the second 3: the average is 2
        calls.append(1)
        return torch.full((len(train),), 1.0 + 2 * (len(calls) - 1))

    monkeypatch.setattr(tada_module, "example_losses", fake_losses)
    config = load_config(None, ["recipe=tada", "train.epochs=3", "train.batch_size=16", "train.augment=none",
                                "split.kind=few-shot", "split.k=10", "split.unlabeled_pool=false", "tada.early_epochs=2",
                                "tada.loss_epochs=2", "tada.share=0.5", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    losses, mask, _ = tada_module.score_examples(task, config, workdir=tmp_path)
    assert len(calls) == 2 and torch.allclose(losses, torch.tensor(2.0)) and int(mask.sum()) == len(losses) // 2
    with pytest.raises(SynthaugError, match="tada.loss_epochs"):
        load_config(None, ["tada.early_epochs=2", "tada.loss_epochs=3"])


@pytest.mark.parametrize("per_class", [True, False])
def test_tada_targets_the_slowest_share_of_each_class_or_of_all(data, tmp_path, monkeypatch, per_class):
    """Per class (TADA's k-means and share inside each class), every class gives its slowest
    half; over all classes, the class that is slow everywhere takes the share."""
    import synthaug.recipes.tada as tada_module

    def fake_losses(model, train):  # class 0 slow throughout; inside each class, a loss rising with the index
        rank = torch.zeros(len(train))
        for c in range(train.num_classes):
            members = torch.nonzero(train.labels == c).flatten()
            rank[members] = torch.arange(len(members), dtype=torch.float) / len(members)
        return rank + 10.0 * (train.labels == 0)

    monkeypatch.setattr(tada_module, "example_losses", fake_losses)
    config = load_config(None, ["recipe=tada", "train.epochs=2", "train.batch_size=16", "train.augment=none",
                                "split.kind=few-shot", "split.k=10", "split.unlabeled_pool=false", "tada.early_epochs=1",
                                "tada.loss_epochs=1", "tada.share=0.5", f"tada.per_class={str(per_class).lower()}",
                                f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    losses, mask, _ = tada_module.score_examples(task, config, workdir=tmp_path)
    labels = task.train.labels
    counts = torch.bincount(labels[mask], minlength=3).tolist()
    assert counts == [5, 5, 5] if per_class else (counts[0] == 10 and sum(counts) == 15)
    for c in range(3):  # inside a class, the targeted ones are its slowest
        of_class = labels == c
        if (mask & of_class).any() and (~mask & of_class).any():
            assert losses[mask & of_class].min() > losses[~mask & of_class].max()


def _grouped(n_major=40, n_minor=4, seed=0):
    """Two classes x two groups: group == label in the many, the other way round in the few."""
    base = make_dataset((n_major + n_minor, n_major + n_minor), seed=seed)
    groups = torch.cat([torch.tensor([0] * n_major + [1] * n_minor), torch.tensor([1] * n_major + [0] * n_minor)])
    base.groups = groups
    return base


def test_group_dro_moves_weight_to_the_worst_group():
    from synthaug.classify.losses import GroupDRO

    dro = GroupDRO(3, eta=0.5)
    loss = dro(torch.tensor([1.0, 1.0, 3.0, 3.0]), torch.tensor([0, 0, 1, 1]))
    assert dro.q[1] > dro.q[0] and dro.q[2] == dro.q[0] * torch.exp(torch.tensor(-0.5))  # absent group: not raised
    assert loss > 2.0  # above the plain mean of the group losses (2.0)


def test_group_sampling_and_weighting_reach_every_cell(monkeypatch):
    import synthaug.classify.train as train_module
    from synthaug.classify.train import group_cells, make_sampler

    data = _grouped()
    cells = group_cells(data)
    drawn = torch.tensor(list(make_sampler("uniform", data.labels, 2, torch.Generator().manual_seed(0), cells)))
    share = torch.bincount(cells[drawn], minlength=4).float() / len(drawn)
    assert torch.allclose(share, torch.full((4,), 0.25), atol=0.08)  # the 4-image cells as often as the 40-image ones
    seen = {}
    real = train_module.soft_cross_entropy

    def spy(logits, targets, **kw):
        seen.setdefault("weights", kw["weights"].cpu())
        return real(logits, targets, **kw)

    monkeypatch.setattr(train_module, "soft_cross_entropy", spy)
    fit_classifier_args = dict(epochs=1, batch_size=len(data), augment="none", group_method="reweighted")
    train_module.fit_classifier(data, train_module.TrainConfig(**fit_classifier_args))
    w = seen["weights"]
    assert w.max() / w.min() == pytest.approx(10.0, rel=1e-4)  # a minority image weighs 10 majority ones


def test_group_methods_need_groups_and_train(tmp_path, monkeypatch):
    import synthaug.classify.train as train_module
    from synthaug.classify.losses import GroupDRO
    from synthaug.classify.train import TrainConfig, fit_classifier

    with pytest.raises(SynthaugError, match="needs a split with groups"):
        fit_classifier(make_dataset((10, 10)), TrainConfig(epochs=1, group_method="dro"))
    with pytest.raises(SynthaugError, match="train.mix=none"):
        TrainConfig(group_method="dro", mix="mixup")
    made, returned = [], []

    class Spy(GroupDRO):  # the DRO the loop builds: its q-weighted loss is the one trained on
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

        def forward(self, per_sample, group):
            returned.append(loss := super().forward(per_sample, group))
            return loss

    monkeypatch.setattr(train_module, "GroupDRO", Spy)
    result = fit_classifier(_grouped(), TrainConfig(epochs=2, batch_size=16, augment="none", group_method="dro"),
                            checkpoint_dir=tmp_path / "ck")
    assert len(result.history) == 2 and len(made) == 1 and len(returned) == 2 * 6  # every batch of both epochs
    assert not torch.allclose(made[0].q, torch.full((4,), 0.25))  # the weights moved towards the worst cells


@pytest.mark.parametrize("balanced", [True, False])
def test_group_dro_draws_each_cell_equally_often_as_the_paper_runs_it(monkeypatch, balanced):
    """Sagawa et al.'s runs pair the online weights with group-balanced batches (--reweight_groups
    --robust); with uniform batches the 4-image cells are mostly absent."""
    import synthaug.classify.train as train_module

    given = []
    real = train_module.make_sampler
    monkeypatch.setattr(train_module, "make_sampler", lambda *a: given.append(a[-1]) or real(*a))
    cfg = train_module.TrainConfig(epochs=1, batch_size=16, augment="none", group_method="dro",
                                   group_dro_balanced=balanced)
    train_module.fit_classifier(_grouped(), cfg)
    assert given and all((c is not None) == balanced for c in given)
    from synthaug.recipes.baselines import BASELINES

    assert BASELINES["group-dro"][1].train_overrides == {"group_method": "dro", "group_dro_balanced": True}


def test_effective_number_weights_are_about_inverse_frequency_with_mean_one():
    from synthaug.classify.train import effective_number_weights

    w = effective_number_weights(torch.tensor([400, 100, 10]))
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    assert 9.5 < float(w[2] / w[0]) < 40.5 and 3.9 < float(w[1] / w[0]) < 4.1  # (1-b^n) ~ n(1-b) for n << 1/(1-b)


def test_drw_weights_the_loss_by_class_only_from_its_start(monkeypatch):
    """DRW: plain cross-entropy before train.drw_start's share of the epochs, then each
    image weighted by its class (rare classes above frequent ones), a mean of 1 per batch."""
    import synthaug.classify.train as train_module

    seen = []
    real = train_module.soft_cross_entropy

    def spy(logits, targets, **kw):
        seen.append((kw.get("weights").detach().cpu().clone(), targets.argmax(1).cpu()))
        return real(logits, targets, **kw)

    monkeypatch.setattr(train_module, "soft_cross_entropy", spy)
    ds = make_dataset((48, 12, 4))
    fit_classifier(ds, TrainConfig(epochs=2, batch_size=16, augment="none", drw_start=0.5), seed=0)
    per_epoch = len(seen) // 2
    early, late = seen[:per_epoch], seen[per_epoch:]
    assert all(torch.all(w == 1) for w, _ in early)
    w, y = torch.cat([w for w, _ in late]), torch.cat([y for _, y in late])
    assert float(w[y == 2].min()) > float(w[y == 1].max()) > float(w[y == 0].max())
    assert all(torch.isclose(w.mean(), torch.tensor(1.0), atol=1e-5) for w, _ in late)
    with pytest.raises(SynthaugError, match="drw_start"):
        TrainConfig(drw_start=1.5)


# ---------------------------------------------------------------- the generator's tail levers
def _fit_generator(ds, **levers):
    """A one-step tiny generator; the levers at their former values (the plain loss) unless given."""
    from synthaug.generate import DiffusionGenerator, GeneratorConfig, GeneratorTrainConfig

    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny", label_dropout=0.0)
    train = GeneratorTrainConfig(steps=levers.pop("steps", 1), batch_size=16, warmup_steps=1, precision="float32",
                                 **{**GeneratorTrainConfig.ADDED, **levers})
    return DiffusionGenerator.fit(ds, config, train, seed=0)


@pytest.mark.parametrize("sampler", ["uniform", "sqrt", "class-balanced"])
def test_generator_class_sampler_draws_the_tail_as_often_as_it_says(monkeypatch, sampler):
    import synthaug.generate.training as training

    drawn = []
    real = training.labelled_draw
    monkeypatch.setattr(training, "labelled_draw", lambda *a: drawn.append(real(*a)) or drawn[-1])
    ds = make_dataset((48, 12, 4))
    _fit_generator(ds, steps=30, class_sampler=sampler)
    share = float((ds.labels[torch.cat(drawn)] == 2).float().mean())
    expected = {"uniform": 4 / 64, "sqrt": 2 / (48**0.5 + 12**0.5 + 2), "class-balanced": 1 / 3}[sampler]
    assert abs(share - expected) < 0.06, (sampler, share, expected)


@pytest.mark.parametrize("group_sampler", ["uniform", "sqrt", "balanced"])
@pytest.mark.parametrize("class_sampler", ["uniform", "class-balanced"])
def test_generator_group_sampler_draws_a_class_s_rare_group_as_often_as_it_says(monkeypatch, class_sampler,
                                                                                group_sampler):
    import synthaug.generate.training as training
    from synthaug.generate import DiffusionGenerator, GeneratorConfig, GeneratorTrainConfig

    drawn = []
    real = training.labelled_draw
    monkeypatch.setattr(training, "labelled_draw", lambda *a: drawn.append(real(*a)) or drawn[-1])
    ds = make_dataset((48, 16))  # class 0: 36 in group 0, 12 in group 1; class 1: 4 in group 0, 12 in group 1
    ds.groups, ds.group_names = torch.tensor([0] * 36 + [1] * 12 + [0] * 4 + [1] * 12), ["red", "green"]
    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny", num_groups=2,
                             group_guidance="composed")
    train = GeneratorTrainConfig(steps=40, batch_size=16, warmup_steps=1, precision="float32",
                                 **{**GeneratorTrainConfig.ADDED, "class_sampler": class_sampler,
                                    "group_sampler": group_sampler})
    DiffusionGenerator.fit(ds, config, train, seed=0)
    idx = torch.cat(drawn)
    class_share = float((ds.labels[idx] == 1).float().mean())
    rare = float((ds.groups[idx][ds.labels[idx] == 1] == 0).float().mean())  # class 1's rare group's share of it
    assert abs(class_share - {"uniform": 16 / 64, "class-balanced": 0.5}[class_sampler]) < 0.07
    assert abs(rare - {"uniform": 4 / 16, "sqrt": 2 / (2 + 12**0.5), "balanced": 0.5}[group_sampler]) < 0.1, rare


def test_group_sampler_without_groups_is_refused_before_anything_is_written():
    from synthaug.generate.cache import check_generator

    section = load_config(None, ["generator.group_sampler=balanced"]).generator
    with pytest.raises(SynthaugError, match="group_sampler=balanced .* no groups"):
        check_generator(section, make_dataset((12, 8, 4)))
    ds = make_dataset((12, 8))
    ds.groups, ds.group_names = torch.tensor([0, 1] * 10), ["red", "green"]
    check_generator(section, ds)


def test_group_sampler_default_draws_by_sqrt_with_groups_and_leaves_group_less_generators_as_they_were():
    from synthaug.generate.cache import check_generator, generator_fingerprint, train_config

    default = load_config(None, []).generator
    assert default.group_sampler == "auto"
    assert train_config(default, num_groups=2).group_sampler == "sqrt"
    assert train_config(default).group_sampler == "uniform"
    ds = make_dataset((12, 8, 4))
    check_generator(default, ds)  # no groups: nothing to split, nothing refused
    explicit = {s: load_config(None, [f"generator.group_sampler={s}"]).generator for s in ("uniform", "sqrt")}
    # with groups the default's generator is the sqrt one; without, the one it was before the option
    assert generator_fingerprint(ds, default, 2) == generator_fingerprint(ds, explicit["sqrt"], 2)
    assert generator_fingerprint(ds, default, 2) != generator_fingerprint(ds, explicit["uniform"], 2)
    assert generator_fingerprint(ds, default, 0) == generator_fingerprint(ds, explicit["uniform"], 0)


def test_min_snr_weighting_lowers_the_loss_of_low_noise_steps_only():
    ds = make_dataset((12, 8, 4))
    plain = _fit_generator(ds).history[-1]["loss"]
    weighted = _fit_generator(ds, min_snr_gamma=5.0).history[-1]["loss"]
    unbounded = _fit_generator(ds, min_snr_gamma=1e12).history[-1]["loss"]  # no SNR above gamma: the plain loss
    assert weighted < plain * 0.99 and abs(unbounded - plain) < 1e-5 * plain


def test_cbdm_regulariser_pulls_the_true_class_towards_the_other_and_commits_a_quarter():
    from synthaug.generate.training import cbdm_regulariser

    eps, other = torch.zeros(2, 1, 2, 2, requires_grad=True), torch.ones(2, 1, 2, 2, requires_grad=True)
    t = torch.tensor([500, 0])  # t = 0: no weight
    loss = cbdm_regulariser(eps, other, t, tau=2.0, timesteps=1000)
    assert torch.isclose(loss, torch.tensor((1.0 + 0.25) * 1.0 / 2))  # weight 2 * 0.5 on half the elements
    loss.backward()
    assert torch.all(eps.grad[1] == 0) and torch.all(other.grad[1] == 0)
    assert torch.allclose(other.grad[0], -eps.grad[0] / 4) and float(eps.grad[0].sum()) < 0  # eps moves towards other
    ds = make_dataset((12, 8, 4))
    assert _fit_generator(ds, cbdm_weight=1.0).history[-1]["loss"] > _fit_generator(ds).history[-1]["loss"]


@pytest.mark.parametrize("draw, shares", [("frequency", [12 / 24, 8 / 24, 4 / 24]), ("uniform", [1 / 3] * 3)])
def test_cbdm_draws_the_other_class_by_the_class_frequencies_or_uniformly(monkeypatch, draw, shares):
    drawn, real = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda weights, *a, **kw: (drawn.append(weights.clone()), real(weights, *a, **kw))[1])
    _fit_generator(make_dataset((12, 8, 4)), steps=3, cbdm_weight=1.0, cbdm_draw=draw)
    by_class = [w / w.sum() for w in drawn if len(w) == 3]  # y' per labelled sample (the image draws weigh 24 images)
    assert len(by_class) == 3 and all(torch.allclose(w.float(), torch.tensor(shares)) for w in by_class)


def test_cbdm_draw_names_another_generator_and_needs_the_regulariser():
    from synthaug.generate.cache import generator_fingerprint, train_config

    ds = make_dataset((12, 8, 4))
    by_frequency = load_config(None, ["generator.cbdm_weight=0.3"]).generator
    uniform = load_config(None, ["generator.cbdm_weight=0.3", "generator.cbdm_draw=uniform"]).generator
    assert generator_fingerprint(ds, by_frequency, 0) != generator_fingerprint(ds, uniform, 0)
    with pytest.raises(SynthaugError, match="cbdm_weight > 0"):
        load_config(None, ["generator.cbdm_draw=uniform"])
    with pytest.raises(SynthaugError, match="cbdm_weight > 0"):  # the library's own config too
        _fit_generator(ds, cbdm_draw="uniform")
    assert train_config(uniform).cbdm_draw == "uniform"  # the run config's reaches the training


def test_ema_half_life_sets_the_decay_from_the_run_s_length(monkeypatch):
    import diffusers.training_utils

    from synthaug.generate import GeneratorTrainConfig

    cfg = GeneratorTrainConfig(steps=400, ema_half_life=0.25)
    assert abs(cfg.decay**100 - 0.5) < 1e-9 and GeneratorTrainConfig().decay == 0.999
    decays = []
    real = diffusers.training_utils.EMAModel
    monkeypatch.setattr(diffusers.training_utils, "EMAModel",
                        lambda params, decay, min_decay: decays.append((decay, min_decay))
                        or real(params, decay=decay, min_decay=min_decay))
    _fit_generator(make_dataset((12, 8, 4)), steps=8, ema_half_life=0.5)
    assert decays == [(0.5 ** (1 / 4), 0.5 ** (1 / 4))]  # constant: diffusers' warm-up cap would override it
    ema = real([torch.nn.Parameter(torch.zeros(1))], decay=0.9, min_decay=0.9)
    assert ema.get_decay(50) == 0.9 and real([torch.nn.Parameter(torch.zeros(1))], decay=0.9).get_decay(50) < 0.9
    with pytest.raises(SynthaugError, match="ema_half_life"):
        GeneratorTrainConfig(ema_half_life=2.0)


def test_the_generator_samples_with_its_ema_weights():
    """The same training with two half-lives: the weights it keeps differ only if the average is
    what it keeps."""
    def weights(half_life):
        gen = _fit_generator(make_dataset((12, 8, 4)), steps=8, ema_half_life=half_life)
        return torch.cat([p.detach().flatten() for p in gen.unet.parameters()])

    short, long = weights(0.01), weights(1.0)
    assert not torch.allclose(short, long)


def test_augmentation_moves_pixels_as_its_parameters_say_and_leaves_the_untold_images_alone():
    from synthaug.generate.augment import augment_images, warp

    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 4, 3] = 1
    none, none2 = torch.zeros(1), torch.zeros(1, 2)
    where = lambda im: torch.nonzero(im[0, 0] > 0.5).tolist()  # noqa: E731
    assert where(warp(dot, torch.tensor([[1.0, 0]]), none, none, none, none, none2)) == [[4, 12]]  # x-flip
    assert where(warp(dot, torch.tensor([[0, 1.0]]), none, none, none, none, none2)) == [[11, 3]]  # y-flip
    assert where(warp(dot, torch.zeros(1, 2), none, none, none, none, torch.tensor([[1.0, 0]]))) == [[4, 5]]  # 1/8 right
    images = torch.rand(256, 1, 8, 8) * 2 - 1
    same, told = augment_images(images, 0.0, torch.Generator().manual_seed(0))
    assert same is images and not told.any()
    out, told = augment_images(images, 0.5, torch.Generator().manual_seed(0))
    again, _ = augment_images(images, 0.5, torch.Generator().manual_seed(0))
    changed = (out != images).flatten(1).any(1)
    assert torch.equal(out, again) and torch.equal(changed, told.ne(0).any(1))  # untold images keep every pixel
    assert 0.93 < float(changed.float().mean()) < 0.995  # untold: 0.5^4 (no continuous transform) x 0.75^2 (no flip)
    with pytest.raises(SynthaugError, match="generator.augment"):
        load_config(None, ["generator.augment=1.5"])


def test_augmentation_tells_the_network_in_training_and_samples_untold(monkeypatch):
    """The transform's parameters reach the UNet (its map into the timestep embedding learns)
    while training, and the trained generator samples as its UNet alone, also after a training
    that stopped on an error."""
    import synthaug.generate.training as training
    from synthaug.generate import DiffusionGenerator, GeneratorTrainConfig
    from synthaug.generate.augment import AugmentEmbedding

    made, calls = [], []
    real_init, real_augment = AugmentEmbedding.__init__, training.augment_images
    monkeypatch.setattr(AugmentEmbedding, "__init__", lambda self, dim: (real_init(self, dim), made.append(self))[0])
    monkeypatch.setattr(training, "augment_images", lambda x, p, g: calls.append(p) or real_augment(x, p, g))
    ds = make_dataset((12, 8, 4))
    gen = _fit_generator(ds, steps=3, augment=1.0)
    assert calls == [1.0] * 3 and len(made) == 1
    assert made[0].linear.weight.grad is not None and float(made[0].linear.weight.grad.abs().sum()) > 0
    bare = DiffusionGenerator(gen.config)  # the same weights, never hooked
    bare.unet.load_state_dict(gen.unet.state_dict())
    assert torch.equal(gen.generate([0, 1, 2], [0, 1, 2]), bare.generate([0, 1, 2], [0, 1, 2]))

    def fail_second(x, p, g):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(p)
        return real_augment(x, p, g)

    monkeypatch.setattr(training, "augment_images", fail_second)
    with pytest.raises(KeyboardInterrupt):
        training.train_generator(bare, ds, GeneratorTrainConfig(steps=3, batch_size=16, warmup_steps=1, precision="float32",
                                                                augment=1.0))
    assert not bare.unet.time_embedding._forward_hooks
    monkeypatch.setattr(training, "augment_images", real_augment)
    _fit_generator(ds, steps=2, augment=1.0, cbdm_weight=1.0)  # CBDM's second pass carries the parameters too


@pytest.mark.parametrize("lever", ["class_sampler=sqrt", "min_snr_gamma=5", "cbdm_weight=1", "ema_half_life=0.1",
                                   "group_sampler=balanced", "augment=0.12"])
def test_each_tail_lever_names_another_generator_and_the_former_values_keep_the_old_name(lever):
    from synthaug.generate.cache import generator_fingerprint
    from synthaug.generate.network import GeneratorTrainConfig

    ds = make_dataset((12, 8, 4))
    former = [f"generator.{k}={v}" for k, v in GeneratorTrainConfig.ADDED.items()]
    before = load_config(None, former).generator
    assert generator_fingerprint(ds, before, 0) == "a0fef0b7b8cd04b0"  # the name generators had before the levers
    assert generator_fingerprint(ds, before, 0) != generator_fingerprint(ds, load_config(None, former + [f"generator.{lever}"]).generator, 0)
    # today's default (Min-SNR 5) is a lever: its generators are named apart from the former plain-loss ones
    assert generator_fingerprint(ds, load_config(None, []).generator, 0) == generator_fingerprint(
        ds, load_config(None, former + ["generator.min_snr_gamma=5"]).generator, 0)


def test_the_report_counts_replayed_images_apart_and_never_shows_them_as_generated(tmp_path, monkeypatch):
    """The replay control's report: its added images stacked as "real, added" in the
    counts plot, none among the generator's samples (there are none)."""
    import sys

    import synthaug.report as report
    from synthaug.cli import main

    seen = {}
    counts, grid = report.counts_plot, report.sample_grid
    monkeypatch.setattr(report, "counts_plot", lambda *a: seen.setdefault("counts", a) and counts(*a))
    monkeypatch.setattr(report, "sample_grid", lambda *a: seen.setdefault("grid", a) and grid(*a))
    args = ["synthaug", "run", "--quiet", "-s", "data.dataset=digits", "-s", "split.ratio=10", "-s", f"output_dir={tmp_path}",
            "-s", "report.baselines=ce", "-s", "synaug.replay=true",
            *[a for kv in FAST if not kv.startswith("split.") for a in ("-s", kv)]]
    monkeypatch.setattr(sys, "argv", args)
    main()
    _, real_counts, synthetic_counts, replayed_counts = seen["counts"]
    assert not any(synthetic_counts) and seen["grid"][2] is None
    assert [r + a for r, a in zip(real_counts, replayed_counts)] == [max(real_counts)] * len(real_counts)


def test_the_report_baselines_train_for_the_recipes_optimiser_steps(tmp_path, capsys, monkeypatch):
    """SYNAuG trains on every class filled to the largest, more optimiser steps than the real
    set's schedule: the report's baselines train as long (so a gain is not more steps), the
    oracle, a reference, on its own schedule."""
    from conftest import run_cli

    args = ["run", "--quiet", "-s", "data.dataset=digits", "-s", "split.ratio=10", "-s", f"output_dir={tmp_path}",
            "-s", "report.baselines=[ce,oracle]", "-s", "synaug.replay=true",
            *[a for kv in FAST if not kv.startswith("split.") for a in ("-s", kv)]]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = -(-sum(metrics["synthetic"]["counts_after"]) // 16)  # one epoch at batch 16
    real = -(-metrics["task"]["train"]["images"] // 16)
    assert steps > real and metrics["baseline_steps"] == steps
    # whole epochs of the real set: at most one epoch more (a mutation that trains them on their own schedule fails)
    assert steps <= metrics["baselines"]["ce"]["steps"] < steps + real
    assert metrics["baselines"]["oracle"]["steps"] == -(-metrics["task"]["oracle"]["images"] // 16)
    assert f"the recipe's {steps:,} optimiser steps" in (run_dir / "report.html").read_text()
    # a run finished by an older synthaug (baselines on their own schedule, no budget recorded) runs its
    # baselines again for the recipe's steps; the oracle's, on its own schedule either way, is kept
    ce, oracle = run_dir / "baselines" / "ce.json", run_dir / "baselines" / "oracle.json"
    ce.write_text(json.dumps({"test": {"balanced_accuracy": -1.0}, "seconds": 0.0}))
    oracle.write_text(json.dumps({**json.loads(oracle.read_text()), "seconds": -1.0}))
    del metrics["baseline_steps"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["baseline_steps"] == steps and json.loads(ce.read_text())["for_steps"] == steps
    assert again["baselines"]["ce"]["test"]["balanced_accuracy"] >= 0 and again["baselines"]["oracle"]["seconds"] == -1.0


@pytest.mark.parametrize("loss", ["balanced-softmax", "ce"])
def test_a_checkpoint_whose_prior_counted_each_image_by_one_is_not_resumed_by_the_weighted_prior(tmp_path, monkeypatch,
                                                                                                   loss):
    """Balanced Softmax with sample weights corrects for each class's summed weight; a checkpoint written
    before that (its key names no prior) trained under another loss and starts afresh. Cross-entropy's
    loss did not change, so its checkpoints still resume."""
    import synthaug.classify.train as train_module
    from synthaug.utils.io import load_state, save_state

    data = make_dataset((12, 6, 3))
    cfg = TrainConfig(epochs=2, batch_size=8, augment="none", loss=loss)
    weights = torch.linspace(0.3, 1.0, len(data))
    folder = tmp_path / "ck"
    fit_classifier(data, cfg, sample_weights=weights, checkpoint_dir=folder, stop_after_epochs=1)
    state = load_state(folder)
    key = json.loads(state["run_key"])
    key.pop("prior", None)  # as an older synthaug wrote it
    save_state(folder, {**state, "run_key": json.dumps(key, sort_keys=True, default=str)})

    restored = []
    restore = train_module.Checkpoint.restore
    monkeypatch.setattr(train_module.Checkpoint, "restore",
                        lambda self, *a, **k: restored.append(restore(self, *a, **k)) or restored[-1])
    fit_classifier(data, cfg, sample_weights=weights, checkpoint_dir=folder)
    assert (restored[0] is None) == (loss == "balanced-softmax")


def test_translated_rows_start_a_share_of_each_cell_from_another_class_s_image():
    from synthaug.plan import translated_rows

    ds = make_dataset((200, 10, 4))
    plan = balance_plan(ds, seed=0)  # class 1: 190 rows, class 2: 196
    rows = translated_rows(plan, ds, share=0.5, strength=0.7, seed=0)
    assert len(rows) == len(plan) and rows == translated_rows(plan, ds, share=0.5, strength=0.7, seed=0)
    for c in (1, 2):
        cell = [r for r in rows if r["label"] == c]
        half = round(0.5 * len(cell))
        assert all(r["kind"] == "guided" and r["strength"] == 0.7 for r in cell[:half])
        assert cell[half:] == [r for r in plan if r["label"] == c][half:]  # the rest as planned
        sources = ds.labels[[r["source"] for r in cell[:half]]]
        assert not (sources == c).any() and all(r["id"].endswith(f"-t{r['source']}") for r in cell[:half])
    # drawn uniformly over the other classes' images: class 2's from class 0 about 200 / 210 of the time
    every = translated_rows(plan, ds, share=1, seed=0)
    sources = ds.labels[[r["source"] for r in every if r["label"] == 2]]
    assert 0.85 < float((sources == 0).float().mean()) < 1
    assert len({r["id"] for r in rows}) == len(rows) and not {r["id"] for r in rows if "source" in r} & {r["id"] for r in plan}
    assert translated_rows(plan, ds, share=0, seed=0) == plan
    ranged = translated_rows(plan, ds, share=1, strength=[0.5, 0.9], seed=0)
    strengths = [r["strength"] for r in ranged]
    assert all(0.5 <= s <= 0.9 for s in strengths) and len(set(strengths)) > 10


def test_translated_rows_with_groups_draw_from_the_row_s_group():
    from synthaug.plan import translated_rows

    ds = make_dataset((6, 6, 6))
    ds.groups, ds.group_names = torch.tensor([0] * 6 + [0] * 5 + [1] + [0] * 6), ["red", "green"]  # green: one 1
    ds.group_names = ["red", "green"]
    plan = balance_plan(ds, by_group=True, seed=0)
    rows = translated_rows(plan, ds, share=1, seed=0)
    for r in rows:
        if r["group"] == 1 and r["label"] == 1:
            assert r["kind"] == "plain"  # no green image of another class: stays plain
        else:
            assert r["kind"] == "guided" and int(ds.groups[r["source"]]) == r["group"] and int(ds.labels[r["source"]]) != r["label"]
    assert any(r["group"] == 1 and r["kind"] == "guided" for r in rows)  # green 0s and 2s from the green 1


def test_own_class_translation_starts_each_row_from_a_real_image_of_its_own_cell():
    """DA-Fusion's variations: the source is a real image of the row's class (and group), and
    the target is the class alone."""
    from synthaug.plan import translated_rows, translation_targets

    ds = make_dataset((20, 6, 3))
    plan = balance_plan(ds, seed=0)
    rows = translated_rows(plan, ds, share=1, strength=0.5, seed=0, source="own")
    guided = [r for r in rows if r["kind"] == "guided"]
    assert len(guided) == len(plan) and all(int(ds.labels[r["source"]]) == r["label"] for r in guided)
    assert len({r["source"] for r in guided if r["label"] == 2}) == 3  # every one of class 2's images serves
    assert not {r["id"] for r in guided} & {r["id"] for r in translated_rows(plan, ds, share=1, strength=0.5, seed=0)}
    assert torch.equal(translation_targets(rows, ds, 0.8), torch.eye(3)[[r["label"] for r in rows]])
    grouped = make_dataset((8, 6, 4))
    grouped.groups, grouped.group_names = torch.tensor([0] * 5 + [1] * 3 + [0] * 4 + [1] * 2 + [0] * 3 + [1]), ["red", "green"]
    cells = translated_rows(balance_plan(grouped, by_group=True, seed=0), grouped, share=1, seed=0, source="own")
    assert len(cells) == 5 * 6 - 18 and all(int(grouped.groups[r["source"]]) == r["group"] and int(grouped.labels[r["source"]]) == r["label"]
               for r in cells)
    with pytest.raises(SynthaugError, match="translate_from must be one of other, own"):
        translated_rows(plan, ds, share=1, source="same")
    # its target is the class alone at any strength, so a light one is not refused as the other source's is
    assert load_config(None, ["synaug.translate_from=own", "synaug.translate_strength=0.3"]).synaug.translate_strength == 0.3
    with pytest.raises(SynthaugError, match="gives its class 0.38"):
        load_config(None, ["synaug.translate_strength=0.3"])


def test_translation_targets_keep_strength_to_the_gamma_on_the_class():
    from synthaug.plan import translation_targets

    ds = make_dataset((3, 3, 3))  # labels 0, 0, 0, 1, 1, 1, 2, 2, 2
    rows = [{"label": 0}, {"label": 2, "source": 3, "strength": 0.49}, {"label": 1, "source": 0, "strength": 1.0}]
    assert torch.allclose(translation_targets(rows, ds, 0.5), torch.tensor([[1, 0, 0], [0, 0.3, 0.7], [0, 1, 0.0]]))
    assert torch.equal(translation_targets(rows, ds, 0), torch.eye(3)[[0, 2, 1]])  # gamma 0: the class alone


def test_soft_targets_train_as_their_labels_when_one_hot_and_set_the_balanced_softmax_prior(monkeypatch):
    import synthaug.classify.train as train_module

    ds = make_dataset((12, 6, 3))
    cfg = TrainConfig(epochs=1, batch_size=8, augment="none", loss="balanced-softmax")
    plain = fit_classifier(ds, cfg, seed=0).model.state_dict()
    one_hot = torch.nn.functional.one_hot(ds.labels, 3).float()
    same = fit_classifier(ds, cfg, seed=0, soft_targets=one_hot).model.state_dict()
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    priors = []
    real_prior = train_module.presented_prior
    monkeypatch.setattr(train_module, "presented_prior", lambda kind, counts, mass=None: priors.append(
        real_prior(kind, counts, mass)) or priors[-1])
    soft = one_hot.clone()
    soft[:6] = torch.tensor([0.5, 0.5, 0.0])  # half of six class-0 images counted to class 1
    fit_classifier(ds, cfg, seed=0, soft_targets=soft)
    assert torch.allclose(priors[-1], torch.tensor([9.0, 9.0, 3.0]) / 21)
    # class-balanced draws: each image drawn as its label's class (1/12, 1/6, 1/3), counted by its target
    fit_classifier(ds, replace(cfg, sampler="class-balanced"), seed=0, soft_targets=soft)
    assert torch.allclose(priors[-1], torch.tensor([0.75, 1.25, 1.0]) / 3)
    ce = TrainConfig(epochs=1, batch_size=8, augment="none")  # no prior: the targets alone move the weights
    hard = fit_classifier(ds, ce, seed=0).model.state_dict()
    moved = fit_classifier(ds, ce, seed=0, soft_targets=soft).model.state_dict()
    assert not all(torch.equal(hard[k], moved[k]) for k in hard)
    with pytest.raises(SynthaugError, match="soft_targets must be"):
        fit_classifier(ds, cfg, soft_targets=one_hot[:, :2])
    with pytest.raises(SynthaugError, match="soft_targets must have non-negative rows that sum to 1"):
        fit_classifier(ds, cfg, soft_targets=one_hot * 2)


def test_a_checkpoint_resumes_only_under_the_soft_targets_it_trained_on(tmp_path, monkeypatch):
    import synthaug.classify.train as train_module

    ds = make_dataset((12, 6, 3))
    cfg = TrainConfig(epochs=2, batch_size=8, augment="none", loss="balanced-softmax")
    soft = torch.nn.functional.one_hot(ds.labels, 3).float()
    soft[:6] = torch.tensor([0.5, 0.5, 0.0])
    other = soft.clone()
    other[:6] = torch.tensor([0.75, 0.25, 0.0])
    restored = []
    restore = train_module.Checkpoint.restore
    monkeypatch.setattr(train_module.Checkpoint, "restore",
                        lambda self, *a, **k: restored.append(restore(self, *a, **k)) or restored[-1])
    for targets in (soft, other, None, soft):  # each run stops after its first epoch, leaving its checkpoint
        fit_classifier(ds, cfg, seed=0, soft_targets=targets, checkpoint_dir=tmp_path / "ck", stop_after_epochs=1)
    assert [r is None for r in restored] == [True, True, True, True]
    fit_classifier(ds, cfg, seed=0, soft_targets=soft, checkpoint_dir=tmp_path / "ck")
    assert restored[-1] is not None and restored[-1]["epoch"] == 1  # the same targets resume


@pytest.mark.parametrize("source", ["other", "own"])
def test_a_run_translates_its_generated_share_and_trains_on_soft_targets(data, tmp_path, monkeypatch, source):
    """Half of each cell's generated images start from other classes' real images (in the store);
    after a selector has kept part of the candidates, the trainer gets 0.7^0.8 of each translated
    image on its class and the rest on its source's class, and the plain ones their class alone.
    From the image's own class (`translate_from: own`) every target is its class alone."""
    from synthaug.store import SyntheticStore

    seen = {}
    real_fit = synaug_module.fit_classifier

    def spy(train, cfg, **kwargs):
        seen.update(kwargs, labels=train.labels)
        return real_fit(train, cfg, **kwargs)

    monkeypatch.setattr(synaug_module, "fit_classifier", spy)
    store_dir = tmp_path / "store"
    tiny = ["generator.preset=tiny", "generator.steps=4", "generator.batch_size=8", "generator.sampling_steps=3"]
    config = load_config(None, [*FAST, *tiny, "synaug.replay_share=0.5", "synaug.translate=0.5", "synaug.translate_strength=0.7",
                                f"synaug.translate_from={source}", "select.method=confidence", f"synaug.store_dir={store_dir}", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    stored = SyntheticStore(store_dir, task.train.classes).rows()
    assert {r["kind"] for r in stored} == {"guided", "plain"} and len(stored) == 2 * len(result.synthetic)  # candidates
    generated, rows = result.synthetic, result.synthetic.info["rows"]
    translated = torch.tensor([r.get("source") is not None for r in rows])
    assert 0 < int(translated.sum()) < len(rows) and all(r["strength"] == 0.7 for r, t in zip(rows, translated) if t)
    sources = task.train.labels[[r["source"] for r, t in zip(rows, translated) if t]]
    assert (sources == generated.labels[translated]).all() if source == "own" else not (sources == generated.labels[translated]).any()
    soft, n_real = seen["soft_targets"], len(task.train) + len(result.replayed)
    assert torch.equal(soft[:n_real], torch.nn.functional.one_hot(seen["labels"][:n_real], 3).float())
    made = soft[n_real:]
    at = torch.arange(len(generated))[translated]
    kept = 1.0 if source == "own" else 0.7 ** 0.8
    assert torch.allclose(made[at, generated.labels[translated]], torch.tensor(kept))
    if source == "other":
        assert torch.allclose(made[at, sources], torch.tensor(1 - kept))
    assert torch.equal(made[~translated], torch.nn.functional.one_hot(generated.labels[~translated], 3).float())
    info = result.extra["synthetic"]
    assert info["translated"] == int(translated.sum()) and info["translated_target"] == pytest.approx(kept)


class _ReadsByBrightness(torch.nn.Module):
    """A stand-in scorer whose reading follows each image's mean brightness m: logits (8m, 0, 8(1 - m)),
    so the generated stand-ins (all 255) read as class 0 and each real image its own way."""

    @staticmethod
    def read(x):
        m = x.flatten(1).mean(1)
        return torch.stack([8 * m, torch.zeros_like(m), 8 * (1 - m)], 1)

    def forward(self, x):
        return self.read(x)


@pytest.mark.parametrize("control", [False, True])
def test_relabel_moves_that_share_of_each_added_image_s_target_onto_the_scorer_s_reading(data, tmp_path, monkeypatch,
                                                                                       control):
    """Every added image (generated and drawn again; in the real-replay control the replayed
    ones) trains on (1 - relabel) x its class + relabel x the scorer's softmax of that image;
    the real split keeps its class alone."""
    seen, asked = {}, []
    real_fit = synaug_module.fit_classifier

    def fake_generator_stage(real, config, **kwargs):
        return type("G", (), {"config": type("C", (), {"num_groups": 0})()})(), {"seconds": 0.0}

    def fake_select_stage(plan, generator, config, store_dir, real, **kwargs):
        images = torch.full((len(plan), *real.images.shape[1:]), 255, dtype=torch.uint8)
        return ImageDataset(images, torch.tensor([r["label"] for r in plan]), real.classes), {"seconds": 0.0}

    def spy(train, cfg, **kwargs):
        seen.update(kwargs, labels=train.labels, images=train.images)
        return real_fit(train, cfg, **kwargs)

    monkeypatch.setattr(synaug_module, "generator_stage", fake_generator_stage)
    monkeypatch.setattr(synaug_module, "select_stage", fake_select_stage)
    monkeypatch.setattr(synaug_module, "fit_classifier", spy)
    monkeypatch.setattr(synaug_module, "scorer_for",
                        lambda real, config, folder, **kw: asked.append(folder) or _ReadsByBrightness())
    config = load_config(None, [*FAST, "synaug.relabel=0.4", f"synaug.replay={str(control).lower()}",
                                f"synaug.store_dir={tmp_path / 'store'}", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    n_real, labels = len(task.train), seen["labels"]
    soft = seen["soft_targets"]
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    assert torch.equal(soft[:n_real], one_hot[:n_real])  # the real split: its class alone
    reading = _ReadsByBrightness.read(seen["images"][n_real:].float() / 255).softmax(1)
    assert len(soft) > n_real and torch.allclose(soft[n_real:], 0.6 * one_hot[n_real:] + 0.4 * reading)
    assert asked == [tmp_path / "store" / "scorers"]  # select's scorer, kept in the store
    info = result.extra["synthetic"]["relabel"]
    added, n_replayed = labels[n_real:], len(result.replayed)
    on_class = reading[torch.arange(len(added)), added]
    for kind, part in [("replayed", slice(0, n_replayed))] + ([] if control else [("generated", slice(n_replayed, None))]):
        assert info[kind]["read_as_class"] == pytest.approx(float((reading[part].argmax(1) == added[part]).float().mean()))
        assert info[kind]["class_probability"] == pytest.approx(float(on_class[part].mean()))
    assert ("generated" in info) != control and "unseen" not in info and "relabel" in result.seconds
    if not control:  # the generated stand-ins (all 255) read as class 0
        assert info["generated"]["read_as_class"] == pytest.approx(float((added[n_replayed:] == 0).float().mean()))


def test_relabel_zero_trains_on_hard_labels_and_is_checked(data, tmp_path, monkeypatch):
    seen = {}
    real_fit = synaug_module.fit_classifier
    monkeypatch.setattr(synaug_module, "fit_classifier", lambda train, cfg, **kw: seen.update(kw) or real_fit(train, cfg, **kw))
    monkeypatch.setattr(synaug_module, "scorer_for", lambda *a, **kw: pytest.fail("no scorer without relabel"))
    config = load_config(None, [*FAST, "synaug.replay=true", f"output_dir={tmp_path}"])
    get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run")
    assert seen["soft_targets"] is None
    monkeypatch.undo()  # and with select's real scorer, trained here on the real split and kept beside the store
    monkeypatch.setattr(synaug_module, "fit_classifier", lambda train, cfg, **kw: seen.update(kw) or real_fit(train, cfg, **kw))
    config = load_config(None, [*FAST, "synaug.replay=true", "synaug.relabel=0.5", f"synaug.store_dir={tmp_path / 'store'}",
                                f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    get_recipe("synaug").run(task, config, workdir=tmp_path / "run2")
    added = seen["soft_targets"][len(task.train):]
    assert torch.allclose(added.sum(1), torch.ones(len(added))) and added.max(1).values.ge(0.5).all()
    assert (added < 1).all() and any((tmp_path / "store" / "scorers").glob("*/model.safetensors"))
    from synthaug.store import check_store_folder

    check_store_folder(tmp_path / "store")  # the folder holding the scorer is a store, which the next run may share
    for bad in ("-0.1", "1.5"):
        with pytest.raises(SynthaugError, match=r"synaug.relabel must be in \[0, 1\]"):
            load_config(None, [f"synaug.relabel={bad}"])


@pytest.mark.parametrize("layout", ["false", "true"])
def test_the_scorer_reads_alike_fresh_and_loaded_so_a_relabelled_run_resumes(tmp_path, layout):
    """The relabelled targets are hashed into the training's checkpoint key: a run resumed after the
    scorer was saved loads it, and must read the images bit for bit as the run that trained it."""
    from synthaug.classify.evaluate import predict_logits
    from synthaug.select.stage import scorer_for

    ds = make_dataset()
    config = load_config(None, ["train.epochs=2", "train.batch_size=16", f"train.channels_last={layout}"])
    fresh = predict_logits(scorer_for(ds, config, tmp_path), ds.images)
    assert len(list(tmp_path.glob("*/model.safetensors"))) == 1
    assert torch.equal(predict_logits(scorer_for(ds, config, tmp_path), ds.images), fresh)
