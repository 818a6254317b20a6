"""Semi-supervised training (FixMatch, FreeMatch's threshold) and DPT: pseudo-labels respect
the threshold and come from the model, never from labels; the pool is the training set's,
never the test set's; training resumes exactly."""

import pytest
import torch
from conftest import make_dataset
from torch.optim.swa_utils import AveragedModel

import synthaug.utils.loop as loop
from synthaug.classify import TrainConfig, create_model, fit_classifier
from synthaug.classify.ssl import (
    AdaptiveThreshold,
    Alignment,
    Threshold,
    pseudo_label,
    unlabelled_loss,
)
from synthaug.classify.train import WeightEMA
from synthaug.config import load_config
from synthaug.data import UNLABELED, LoadedDataset, concat
from synthaug.errors import SynthaugError
from synthaug.recipes import get_recipe
from synthaug.recipes.dpt import labelled_pool, labeller_key
from synthaug.store import SyntheticStore
from synthaug.task import make_task

SSL = dict(epochs=2, batch_size=4, lr=0.05, augment="none", ssl="fixmatch", ssl_mu=2)


def pool_of(ds):
    pool = ds.subset(torch.arange(len(ds)))
    pool.labels = torch.full_like(pool.labels, UNLABELED)
    return pool


def test_threshold_keeps_only_confident_weak_predictions():
    probs = torch.tensor([[0.96, 0.02, 0.02], [0.94, 0.03, 0.03], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    labels, mask = Threshold(3, 0.95)(probs)
    assert labels[:3].tolist() == [0, 0, 2]
    assert mask.tolist() == [True, False, True, False]


def test_unlabelled_loss_ignores_images_below_the_threshold():
    """Nothing below the bar: no loss and no gradient (a threshold that is skipped fails this)."""
    weak = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])  # confidences 0.67 and 0.91
    strong = torch.randn(2, 3, requires_grad=True)
    loss, labels, mask = unlabelled_loss(weak, strong, Threshold(3, 0.95))
    loss.backward()
    assert not mask.any() and float(loss.detach()) == 0.0 and torch.equal(strong.grad, torch.zeros(2, 3))
    # above the bar: the strong view is pulled to the weak view's label, averaged over the whole batch
    weak[1] = torch.tensor([0.0, 10.0, 0.0])
    strong.grad = None
    loss, labels, mask = unlabelled_loss(weak, strong, Threshold(3, 0.95))
    expected = torch.nn.functional.cross_entropy(strong[1:], torch.tensor([1])) / 2
    assert mask.tolist() == [False, True] and torch.allclose(loss, expected)


def test_adaptive_threshold_follows_the_models_confidence():
    t = AdaptiveThreshold(4, momentum=0.5)
    assert float(t.tau) == pytest.approx(0.25)
    confident = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 8)
    for _ in range(10):
        t(confident)
    assert float(t.tau) > 0.9
    # class 0 is the one the model predicts most: its bar is the global one, the others' lower
    bars = t.bar(torch.arange(4))
    assert bars[0] == pytest.approx(float(t.tau)) and (bars[1:] < bars[0]).all()


def test_distribution_alignment_evens_out_an_over_predicted_class():
    """A model that puts most pool images in class 0: aligned, class 0's share of the
    pseudo-labels falls and the mean prediction moves towards uniform."""
    align = Alignment(3, momentum=0.0)  # the running mean is this batch's
    probs = torch.tensor([[0.8, 0.15, 0.05]] * 6 + [[0.5, 0.4, 0.1]] * 4)  # every argmax is class 0
    aligned = align(probs)
    assert torch.allclose(aligned.sum(1), torch.ones(10))
    spread = lambda p: float((p.mean(0) - 1 / 3).abs().sum())  # noqa: E731
    assert spread(aligned) < spread(probs)
    assert (aligned.argmax(1) == 0).sum() < (probs.argmax(1) == 0).sum()


def test_pseudo_labels_come_from_the_model_not_the_labels():
    """DPT labels the pool with the model's predictions: a model that predicts the wrong class
    gives that class (a pseudo-labeller that read the true labels fails this)."""
    ds = make_dataset((10, 10, 10))
    model = create_model("small-cnn", num_classes=3, in_channels=1, image_size=(8, 8))
    with torch.no_grad():  # a head that always predicts class 2, confidently
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 9.0]))
    labels, confidence = pseudo_label(model, ds.images)
    assert labels.tolist() == [2] * 30 and (confidence > 0.99).all()


def test_the_trainer_refuses_a_pool_with_labels_or_no_pool():
    ds = make_dataset((6, 6, 6))
    with pytest.raises(SynthaugError, match="carries labels"):
        fit_classifier(ds, TrainConfig(**SSL), unlabeled=make_dataset((5, 5, 5), seed=2))
    with pytest.raises(SynthaugError, match="unlabelled pool"):
        fit_classifier(ds, TrainConfig(**SSL))


def test_fixmatch_trains_on_the_pool_and_keeps_the_ema():
    ds, pool = make_dataset((4, 4, 4)), pool_of(make_dataset((30, 30, 30), seed=3))
    result = fit_classifier(ds, TrainConfig(**{**SSL, "epochs": 3}), unlabeled=pool, monitor=make_dataset((5, 5, 5), seed=4),
                            monitor_every=5)
    steps = 3 * -(-len(pool) // (SSL["ssl_mu"] * SSL["batch_size"]))  # an epoch is a pass over the pool
    assert [c["step"] for c in result.curve] == list(range(5, steps + 1, 5)) + ([steps] if steps % 5 else [])
    assert all(0 <= h["pseudo_labelled"] <= 1 for h in result.history)
    assert result.history[-1]["pseudo_labelled"] > 0  # the easy problem's pool gets pseudo-labels
    assert result.curve[-1]["accuracy"] > 0.9

    def weights(**options):
        model = fit_classifier(ds, TrainConfig(**{**SSL, "epochs": 3, **options}), unlabeled=pool).model
        return torch.cat([v.flatten().float() for v in model.state_dict().values()])

    default = torch.cat([v.flatten().float() for v in result.model.state_dict().values()])
    assert torch.equal(weights(), default)  # the same seed, the same model
    assert not torch.equal(weights(ssl_weight=0.0), default)  # the pool's loss reaches the gradient
    assert not torch.equal(weights(ssl_ema=0.0), default)  # the model kept is the weights' average


def test_weight_average_warms_up_and_keeps_averaged_models_state():
    model = create_model("small-cnn", num_classes=3, in_channels=1, image_size=(8, 8))
    ema = WeightEMA(model, decay=0.999)
    assert set(ema.state_dict()) == set(AveragedModel(model, use_buffers=True).state_dict())  # old checkpoints load
    first = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.backbone[0][1].num_batches_tracked += 5
    ema.update_parameters(model)  # then d = min(0.999, 2 / 11): most of the way to the new weights
    d = 2 / 11
    for k, v in ema.module.state_dict().items():
        now = model.state_dict()[k]
        expected = now if not torch.is_floating_point(v) else d * first[k] + (1 - d) * now
        assert torch.allclose(v.float(), expected.float(), atol=1e-6), k
    assert int(ema.n_averaged) == 2 and ema.n_averaged.device.type == "cpu"


@pytest.mark.parametrize("ssl, align", [("fixmatch", False), ("freematch", False), ("fixmatch", True)])
def test_resume_gives_the_same_model(ssl, align, tmp_path, monkeypatch):
    ds, pool = make_dataset((6, 6, 6)), pool_of(make_dataset((10, 10, 10), seed=3))
    cfg = TrainConfig(**{**SSL, "epochs": 3, "ssl": ssl, "ssl_align": align, "augment": "crop"})
    reference = fit_classifier(ds, cfg, seed=1, unlabeled=pool).model.state_dict()
    real_save = loop.save_state

    def save_then_die(folder, state):
        real_save(folder, state)
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(ds, cfg, seed=1, unlabeled=pool, checkpoint_dir=tmp_path)
    monkeypatch.setattr(loop, "save_state", real_save)
    resumed = fit_classifier(ds, cfg, seed=1, unlabeled=pool, checkpoint_dir=tmp_path)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for k, v in reference.items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-6), k


def test_the_pool_is_the_training_set_never_the_test_set():
    """Few-shot: labelled + pool = the training set, and no test image is in the pool."""
    train, test = make_dataset((20, 20, 20), seed=0), make_dataset((8, 8, 8), seed=1)
    task = make_task(LoadedDataset("tiny", train, test), load_config(None, ["split.kind=few-shot", "split.k=3"]).split)
    key = lambda images: {bytes(x.numpy()) for x in images}  # noqa: E731
    assert not key(task.unlabeled.images) & key(test.images)
    assert key(task.unlabeled.images) | key(task.train.images) == key(train.images)
    assert (task.unlabeled.labels == UNLABELED).all()


def test_dpt_splits_the_pool_by_confidence():
    train, test = make_dataset((20, 20, 20), seed=0), make_dataset((8, 8, 8), seed=1)
    task = make_task(LoadedDataset("tiny", train, test), load_config(None, ["split.kind=few-shot", "split.k=3"]).split)
    n = len(task.unlabeled)
    labels, confidence = torch.arange(n) % 3, torch.linspace(0, 1, n)
    conditions, rest = labelled_pool(task, labels, confidence, 0.5)
    confident = confidence >= 0.5
    assert len(conditions) == len(task.train) + int(confident.sum()) and len(rest) == int((~confident).sum())
    assert torch.equal(conditions.labels[len(task.train):], labels[confident])  # the pseudo-labels, not the truth
    assert (rest.labels == UNLABELED).all()
    assert torch.equal(conditions.images, torch.cat([task.train.images, task.unlabeled.images[confident]]))
    assert torch.equal(rest.images, task.unlabeled.images[~confident])
    assert labelled_pool(task, labels, confidence, 0.0)[1] is None  # every pool image confident: no null class


def test_dpt_seeds_share_one_labeller_generator_and_images(tmp_path):
    """With dpt.labeller_seed fixed, a second classifier seed reuses the pseudo-labels, the
    generator and the images; the store's folder is the generator's."""
    data = LoadedDataset("tiny", make_dataset((20, 20, 20), seed=0), make_dataset((5, 5, 5), seed=1))
    over = ["split.kind=few-shot", "split.k=3", "train.epochs=1", "train.batch_size=4", "train.augment=none",
            "train.ssl_mu=2", "generator.preset=tiny", "generator.steps=3", "generator.batch_size=8",
            "generator.sampling_steps=2", "dpt.per_class=2", "dpt.embed_dim=4", "dpt.labeller_seed=0", "dpt.mode=mixup",
            f"dpt.store_dir={tmp_path / 'store'}", f"output_dir={tmp_path}"]
    runs = []
    for seed in (0, 1):
        config = load_config(None, [*over, "recipe=dpt", f"seed={seed}"])
        task = make_task(data, config.split)
        runs.append(get_recipe("dpt").run(task, config, workdir=tmp_path / f"run{seed}"))
    a, b = (r.extra for r in runs)
    assert not a["dpt"]["labeller_cached"] and b["dpt"]["labeller_cached"]
    assert a["generator"]["fingerprint"] == b["generator"]["fingerprint"]
    assert b["synthetic"]["generated_now"] == 0 and b["synthetic"]["images"] == 6
    assert (tmp_path / "store" / a["generator"]["fingerprint"][:16]).is_dir()
    rows = SyntheticStore(tmp_path / "store" / a["generator"]["fingerprint"][:16], task.train.classes).rows()
    assert {r["conditioning"] for r in rows} == {"mixup"} and all(len(r["sources"]) == 2 for r in rows)  # dpt.mode
    assert torch.equal(runs[0].synthetic.images, runs[1].synthetic.images)
    assert len(concat(task.train, runs[1].synthetic)) == 9 + 6
    # damaged pseudo-labels (a parallel run's half-written file, a full disk) are computed again
    (done,) = (tmp_path / "run0").parent.rglob("pseudo-labels/*/labels.safetensors")
    done.write_bytes(b"\0" * 8)
    again = get_recipe("dpt").run(task, config, workdir=tmp_path / "run2")
    assert not again.extra["dpt"]["labeller_cached"] and torch.equal(again.synthetic.images, runs[1].synthetic.images)
    from synthaug.runs import preflight

    preflight(config)  # the folder holds DPT's store alone: a third run may write there
    (tmp_path / "store" / "notes.txt").write_text("mine")
    with pytest.raises(SynthaugError, match="holds 'notes.txt', which is not a synthaug store"):
        preflight(config)


def test_the_labeller_is_shared_across_weight_norm():
    """train.weight_norm acts on weighted images only; the labeller trains unweighted, so runs
    that differ in it share one labeller (and runs that differ in its training do not)."""
    data = LoadedDataset("tiny", make_dataset((20, 20, 20), seed=0), make_dataset((5, 5, 5), seed=1))
    base = ["split.kind=few-shot", "split.k=3", "recipe=dpt"]
    task = make_task(data, load_config(None, base).split)
    keys = {labeller_key(task, load_config(None, [*base, f"train.weight_norm={v}"])) for v in ("false", "true")}
    assert len(keys) == 1
    assert labeller_key(task, load_config(None, [*base, "train.lr=0.1"])) not in keys


def test_dpt_replay_adds_confident_pool_images_under_their_pseudo_labels(tmp_path, monkeypatch):
    """The control trains no generator: per_class images per class from the labelled and the
    confident pseudo-labelled pool images, at dpt.synthetic_weight in the final training."""
    import synthaug.classify as classify
    import synthaug.recipes.dpt as dpt_module

    seen, real_fit = [], classify.fit_classifier
    monkeypatch.setattr(classify, "fit_classifier", lambda train, cfg, **kw: seen.append(kw) or real_fit(train, cfg, **kw))
    pools, real_pool = [], dpt_module.labelled_pool
    monkeypatch.setattr(dpt_module, "labelled_pool", lambda *a: pools.append(a) or real_pool(*a))
    data = LoadedDataset("tiny", make_dataset((20, 20, 20), seed=0), make_dataset((5, 5, 5), seed=1))
    config = load_config(None, ["split.kind=few-shot", "split.k=3", "train.epochs=1", "train.batch_size=4",
                                "train.augment=none", "train.ssl_mu=2", "dpt.per_class=4", "dpt.replay=true",
                                "dpt.confidence=0.01", "dpt.synthetic_weight=0.25", "recipe=dpt", f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("dpt").run(task, config, workdir=tmp_path / "run")
    assert [a[-1] for a in pools] == [0.01]  # the pool is cut at dpt.confidence (3 classes: every image is above)
    weights = seen[-1]["sample_weights"]  # the final training's (the labeller is the first call)
    replayed = result.replayed  # pool images drawn again: not generated, so the report never shows them as such
    assert result.synthetic is None
    assert weights.tolist() == [1.0] * len(task.train) + [0.25] * len(replayed)
    with pytest.raises(SynthaugError, match="dpt.synthetic_weight"):
        load_config(None, ["dpt.synthetic_weight=0"])
    with pytest.raises(SynthaugError, match="dpt.replay generates no image, so validate.enabled would do nothing"):
        get_recipe("dpt").check(task, load_config(None, ["recipe=dpt", "dpt.replay=true", "validate.enabled=true"]))
    assert result.extra["generator"]["source"].startswith("none") and "generator" not in result.seconds
    assert replayed.class_counts().tolist() == [4, 4, 4]
    seen = {bytes(x.numpy()) for x in concat(task.train, task.unlabeled).images}
    assert all(bytes(x.numpy()) in seen for x in replayed.images)
