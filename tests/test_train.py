import pytest
import torch
import torch.nn.functional as F
from conftest import make_dataset

import synthaug.utils.loop as loop
from synthaug.classify import TrainConfig, evaluate, fit_classifier, refit_head
from synthaug.classify.losses import SAM, mix_batch, soft_cross_entropy
from synthaug.classify.train import (
    AUGMENTATIONS,
    MIXES,
    POLICIES,
    SAMPLERS,
    BatchedPolicy,
    build_augmentation,
    make_sampler,
    resident,
)
from synthaug.errors import SynthaugError

FAST = dict(epochs=2, batch_size=16, lr=0.05, augment="none")


def small_train(**kw):
    return fit_classifier(make_dataset((24, 12, 6)), TrainConfig(**{**FAST, **kw}), seed=0)


@pytest.mark.parametrize("precision, channels_last", [("float32", False), ("float32", True), ("bfloat16", True)])
def test_learns_the_tiny_problem(precision, channels_last):
    """In every arithmetic and memory layout (bfloat16 runs emulated where the CPU lacks it)."""
    ds = make_dataset((40, 40, 40))
    cfg = TrainConfig(epochs=6, batch_size=16, lr=0.05, augment="none", precision=precision, channels_last=channels_last)
    result = fit_classifier(ds, cfg, seed=0)
    metrics = evaluate(result.model, make_dataset((20, 20, 20), seed=1))
    assert metrics["accuracy"] > 0.9
    assert [h["epoch"] for h in result.history] == list(range(1, 7))


def _spy_loss(monkeypatch) -> list[dict]:
    """Each call of the training loss: its targets' classes and its keyword arguments."""
    import synthaug.classify.train as train_module

    calls, real = [], train_module.soft_cross_entropy

    def spy(logits, targets, **kw):
        calls.append({"classes": targets.argmax(1).cpu(), **kw})
        return real(logits, targets, **kw)

    monkeypatch.setattr(train_module, "soft_cross_entropy", spy)
    return calls


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers(sampler, monkeypatch):
    labels = torch.tensor([0] * 90 + [1] * 10)
    drawn = labels[list(make_sampler(sampler, labels, 2, torch.Generator().manual_seed(0)))]
    share = (drawn == 1).float().mean()
    expected = {"uniform": 0.1, "class-balanced": 0.5, "sqrt": 1 / (1 + 3)}[sampler]
    assert abs(share - expected) < 0.12
    calls = _spy_loss(monkeypatch)  # the batches the training loop draws follow the sampler too
    fit_classifier(make_dataset((48, 24, 12)), TrainConfig(**{**FAST, "epochs": 3, "sampler": sampler}), seed=0)
    smallest = float((torch.cat([c["classes"] for c in calls]) == 2).float().mean())
    expected = {"uniform": 12 / 84, "class-balanced": 1 / 3, "sqrt": 12**0.5 / (48**0.5 + 24**0.5 + 12**0.5)}[sampler]
    assert abs(smallest - expected) < 0.05, smallest


@pytest.mark.parametrize("loss", ["ce", "logit-adjusted", "balanced-softmax"])
def test_losses_train(loss, monkeypatch):
    calls = _spy_loss(monkeypatch)
    result = small_train(loss=loss, tau=2.0)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    # the training set's log class frequencies, scaled by tau: 0 for ce, train.tau for logit adjustment, 1 for
    # balanced softmax
    assert torch.allclose(calls[0]["log_prior"].cpu().exp(), torch.tensor([24, 12, 6]) / 42, atol=1e-5)
    assert calls[0]["tau"] == {"ce": 0.0, "logit-adjusted": 2.0, "balanced-softmax": 1.0}[loss]


def test_soft_cross_entropy_matches_torch_and_logit_adjustment():
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    onehot = F.one_hot(y, 3).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, y))
    log_prior = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    adjusted = soft_cross_entropy(logits, onehot, log_prior=log_prior, tau=1.0)
    assert torch.allclose(adjusted, F.cross_entropy(logits + log_prior, y))
    w = torch.tensor([1.0, 0, 0, 0, 0])
    assert torch.allclose(soft_cross_entropy(logits, onehot, weights=w), F.cross_entropy(logits[:1], y[:1]) / 5)


@pytest.mark.parametrize("spec", [*AUGMENTATIONS, "crop+flip+randaugment"])
def test_augmentations(spec):
    aug = build_augmentation(spec, (8, 8))
    x = torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8)
    out = x if aug is None else aug(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    if spec != "none":
        small_train(augment=spec, epochs=1)


def test_batched_crop_and_flip_draw_per_image_like_torchvision():
    """The batched crop is v2.RandomCrop(padding=1/8 of the side) per image: each output is
    a window of the zero-padded image, offsets spread over every position; the flip mirrors
    about half the images, each either unchanged or mirrored."""
    torch.manual_seed(0)
    x = torch.randint(1, 255, (400, 1, 8, 8), dtype=torch.uint8)
    out = build_augmentation("crop", (8, 8))(x)
    padded = F.pad(x, (1, 1, 1, 1))
    offsets = []
    for i in range(len(x)):
        found = [(t, s) for t in range(3) for s in range(3) if torch.equal(padded[i, :, t:t + 8, s:s + 8], out[i])]
        assert found, i
        offsets.append(found[0])
    assert len(set(offsets)) == 9  # all 9 windows occur
    flipped = build_augmentation("flip", (8, 8))(x)
    mirrored = torch.tensor([torch.equal(flipped[i], x[i].flip(-1)) for i in range(len(x))])
    assert all(torch.equal(flipped[i], x[i]) or mirrored[i] for i in range(len(x)))
    assert 0.4 < mirrored.float().mean() < 0.6


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("channels", [1, 3])
def test_batched_policy_is_the_policy_image_by_image(policy, channels):
    """Each operation run once on the images that drew it gives exactly torchvision's policy
    applied per image from the same seed, and leaves the random stream where it would be."""
    x = torch.randint(0, 256, (200, channels, 12, 12), dtype=torch.uint8)
    torch.manual_seed(3)
    transform = POLICIES[policy]()
    expected = torch.stack([transform(image) for image in x])
    after = torch.rand(3)
    batched = BatchedPolicy(POLICIES[policy])
    torch.manual_seed(3)
    out = batched(x)
    assert torch.equal(out, expected) and torch.equal(torch.rand(3), after)
    assert (out != x).any(dim=(1, 2, 3)).float().mean() > 0.5  # the policy did change most images
    assert len({tuple(ops) for ops in batched.draw(50, (channels, 12, 12))}) > 10  # images draw apart


def test_unknown_augmentation():
    with pytest.raises(SynthaugError, match="unknown augmentation 'jitter'"):
        TrainConfig(augment="crop+jitter")


@pytest.mark.parametrize("mode", ["mixup", "cutmix", "mixup-cutmix"])
def test_mix_batch(mode):
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8), F.one_hot(torch.arange(6) % 3, 3).float()
    w = torch.arange(6).float()
    mx, my, mw = mix_batch(x, y, w, mode=mode, alpha=1.0, partner=torch.arange(6).roll(1))
    assert mx.shape == x.shape and torch.allclose(my.sum(1), torch.ones(6))
    lam = my[0, 0]  # sample 0 (class 0) paired with sample 5 (class 2)
    assert torch.allclose(mw[0], lam * w[0] + (1 - lam) * w[5])


@pytest.mark.parametrize("mix", [m for m in MIXES if m != "none"])
def test_training_with_mix(mix, monkeypatch):
    import synthaug.classify.train as train_module

    calls, real = [], train_module.mix_batch
    monkeypatch.setattr(train_module, "mix_batch", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    small_train(mix=mix, mix_alpha=0.4)
    batches = 2 * -(-42 // 16)  # every batch of both epochs (mix_prob 1)
    if mix == "domain-mixup":  # one domain only: each image mixed with a partner from it
        assert len(calls) == batches and all(c["partner"] is not None for c in calls)
    else:
        assert calls == [{"mode": mix, "alpha": 0.4}] * batches
    calls.clear()
    small_train(mix=mix, mix_alpha=0.4, mix_prob=0.0)
    assert calls == []


def test_label_smoothing_softens_the_targets(monkeypatch):
    import synthaug.classify.train as train_module

    targets, real = [], train_module.soft_cross_entropy
    monkeypatch.setattr(train_module, "soft_cross_entropy", lambda logits, t, **kw: targets.append(t) or real(logits, t, **kw))
    small_train(label_smoothing=0.3)
    t = torch.cat(targets)
    assert float(t.min()) == pytest.approx(0.1) and float(t.max()) == pytest.approx(0.8)  # 0.3 / 3, 1 - 0.3 + 0.1


def test_sam_restores_and_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sam = SAM(model.parameters(), opt, rho=0.5)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    F.cross_entropy(model(x), y).backward()
    sam.first_step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # perturbed
    F.cross_entropy(model(x), y).backward()
    grads_at_perturbed = [p.grad.clone() for p in model.parameters()]
    sam.second_step()
    for p, b, g in zip(model.parameters(), before, grads_at_perturbed):
        assert torch.allclose(p, b - 0.1 * g, atol=1e-6)  # stepped from the original weights


def test_sam_takes_both_steps_on_every_batch(monkeypatch):
    import synthaug.classify.train as train_module

    steps = []

    class Spy(SAM):
        def first_step(self):
            steps.append("first")
            super().first_step()

        def second_step(self):
            steps.append("second")
            super().second_step()

    monkeypatch.setattr(train_module, "SAM", Spy)
    small_train(sam_rho=0.05)
    assert steps == ["first", "second"] * (2 * -(-42 // 16))


def test_sample_weights_shape_and_effect():
    ds = make_dataset((24, 12, 6))
    with pytest.raises(SynthaugError, match="sample_weights"):
        fit_classifier(ds, TrainConfig(**FAST), sample_weights=torch.ones(3))
    # zero weight on class 2 -> the model never learns to predict it
    w = (ds.labels != 2).float()
    result = fit_classifier(ds, TrainConfig(**{**FAST, "epochs": 4}), sample_weights=w)
    preds = result.model(ds.images.float() / 255).argmax(1)
    assert (preds[ds.labels == 2] == 2).float().mean() < 0.5


def test_weight_norm_keeps_the_loss_scale():
    """Divided by their batch's mean, weights of 0.1 on every image train the model that weights
    of 1 do; left as they are, they shrink the loss and train another."""
    ds = make_dataset((24, 12, 6))
    tenth = torch.full((len(ds),), 0.1)
    reference = fit_classifier(ds, TrainConfig(**FAST), seed=0).model.state_dict()
    normed = fit_classifier(ds, TrainConfig(**FAST, weight_norm=True), sample_weights=tenth, seed=0).model.state_dict()
    scaled = fit_classifier(ds, TrainConfig(**FAST), sample_weights=tenth, seed=0).model.state_dict()
    floats = [k for k, v in reference.items() if v.is_floating_point()]
    assert all(torch.allclose(reference[k], normed[k], rtol=1e-4, atol=1e-5) for k in floats)
    assert not all(torch.allclose(reference[k], scaled[k], rtol=1e-4, atol=1e-5) for k in floats)


def test_refit_head_only_changes_head():
    ds = make_dataset((40, 10, 4))
    model = fit_classifier(ds, TrainConfig(**FAST), seed=0).model
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head = model.head.weight.detach().clone()
    for per_class in ("all", "min", "3"):
        refit_head(model, ds, per_class=per_class, epochs=3)
        assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
        assert not torch.equal(head, model.head.weight)
    result = small_train(refit_head=True, refit_per_class="min")
    assert result.model.head.weight.requires_grad


def test_same_seed_same_model():
    a, b = small_train(augment="crop+flip", mix="mixup"), small_train(augment="crop+flip", mix="mixup")
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_images_stay_where_they_are_off_a_gpu_or_when_told():
    images = make_dataset((24, 12, 6)).images
    assert resident(images, None, torch.device("cpu"), True)[0] is images
    if torch.cuda.is_available():
        assert resident(images, None, torch.device("cuda"), False)[0] is images


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_images_on_the_gpu_train_as_when_indexed_on_the_cpu(monkeypatch):
    """train.data_on_device: the images go to the GPU once and each batch is indexed and
    augmented there, with the CPU's random draws: the same training as on the CPU's side."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    images = make_dataset((24, 12, 6)).images
    assert resident(images, None, torch.device("cuda"), True)[0].is_cuda
    kw = dict(device="cuda", precision="float32", augment="crop+flip+cutout", mix="mixup")
    on, off = small_train(**kw), small_train(**kw, data_on_device=False)
    assert [h["loss"] for h in on.history] == pytest.approx([h["loss"] for h in off.history], rel=1e-5)
    assert [h["train_acc"] for h in on.history] == [h["train_acc"] for h in off.history]


def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch):
    ds = make_dataset((24, 12, 6))
    cfg = TrainConfig(**{**FAST, "epochs": 3, "augment": "crop", "sampler": "class-balanced"})
    reference = fit_classifier(ds, cfg, seed=3).model.state_dict()

    real_save, saves = loop.save_state, []

    def save_then_die(folder, state):
        real_save(folder, state)
        saves.append(state["epoch"])
        if state["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit_classifier(ds, cfg, seed=3, checkpoint_dir=tmp_path / "ckpt")
    monkeypatch.setattr(loop, "save_state", real_save)
    resumed = fit_classifier(ds, cfg, seed=3, checkpoint_dir=tmp_path / "ckpt")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]  # nothing lost, nothing repeated
    for k, v in reference.items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-6), k


def test_corrupt_checkpoint_is_reported(tmp_path):
    ds = make_dataset((24, 12, 6))
    cfg = TrainConfig(**{**FAST, "epochs": 1})
    fit_classifier(ds, cfg, checkpoint_dir=tmp_path)
    blob = tmp_path / "state.safetensors"
    blob.write_bytes(b"\x01" * blob.stat().st_size)
    with pytest.raises(SynthaugError, match="corrupt"):
        fit_classifier(ds, cfg, checkpoint_dir=tmp_path)


def test_rejects_unlabeled_or_empty():
    ds = make_dataset((5, 5))
    with pytest.raises(SynthaugError, match="empty"):
        fit_classifier(ds.subset([]), TrainConfig(**FAST))
    ds.labels[0] = -1
    with pytest.raises(SynthaugError, match="unlabeled"):
        fit_classifier(ds, TrainConfig(**FAST))


def test_steps_sets_the_epochs_for_the_same_optimiser_budget():
    """train.steps: whole epochs that make at least that many steps, whatever the data's size."""
    from synthaug.classify.train import epochs_for

    assert epochs_for(10, 35, 8) == 2 and epochs_for(1500, 950, 64) == 100 and epochs_for(5, 1000, 64) == 1
    data = make_dataset((15, 10, 10))  # 35 images, 5 batches of 8
    result = fit_classifier(data, TrainConfig(steps=10, batch_size=8, augment="none", epochs=99))
    assert len(result.history) == 2
