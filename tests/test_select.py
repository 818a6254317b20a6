"""Selection filters and validation metrics on small arrays with known answers, feature
extractors (a tiny in-code CLIP for the pretrained path), and both stages end to end."""

import json

import numpy as np
import pytest
import torch
from conftest import make_dataset
from test_recipes import FAST

from synthaug.classify.evaluate import predict_logits
from synthaug.classify.models import create_model
from synthaug.config import load_config
from synthaug.data import LoadedDataset
from synthaug.errors import SynthaugError
from synthaug.recipes import get_recipe
from synthaug.runs import train_run
from synthaug.select import (
    agreement,
    cluster_representatives,
    confidence,
    density_coverage,
    diversity,
    diversity_ratio,
    domain_gap,
    feature_extractor,
    frechet_distance,
    kernel_distance,
    overgenerate_plan,
    precision_recall,
    realism_scores,
    top_k_per_class,
)
from synthaug.select.filters import _spread
from synthaug.select.stage import matched_per_class
from synthaug.store import SyntheticStore
from synthaug.task import make_task


def gaussian(n, d=4, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_identical_sets_score_perfectly():
    x = gaussian(300)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert density_coverage(x, x)["coverage"] == 1.0


def test_a_shifted_set_scores_worse():
    real, same, shifted = gaussian(400, seed=0), gaussian(400, seed=1), gaussian(400, shift=2.0, seed=1)
    # a pure shift keeps the covariance: the distance is the squared shift, 4 dims x 2^2
    assert frechet_distance(real, real + 2.0) == pytest.approx(16.0, rel=1e-6)
    assert frechet_distance(real, same) < 0.5 < 10 < frechet_distance(real, shifted)
    kid_same, kid_shifted = kernel_distance(real, same)["mean"], kernel_distance(real, shifted)["mean"]
    assert abs(kid_same) < 0.05 and kid_shifted > 1.0
    pr_same, pr_shifted = precision_recall(real, same), precision_recall(real, shifted)
    assert pr_same["precision"] > 0.8 and pr_same["recall"] > 0.8
    assert pr_shifted["precision"] < 0.5 and pr_shifted["recall"] < 0.5
    dc_same, dc_shifted = density_coverage(real, same), density_coverage(real, shifted)
    assert 0.7 < dc_same["density"] < 1.3 and dc_same["coverage"] > 0.8
    assert dc_shifted["density"] < 0.3 and dc_shifted["coverage"] < 0.5
    assert 0.35 < domain_gap(real, same) < 0.65
    assert domain_gap(real, shifted) > 0.95


def test_diversity_and_realism_by_hand():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    assert diversity(features, torch.tensor([0, 0, 1, 1])) == {0: 5.0, 1: 0.0}
    real = make_dataset((10, 10), seed=0)
    assert diversity_ratio(real, real) == pytest.approx(1.0)
    one_image = real.subset(torch.tensor([0] * 5 + [10] * 5))  # every class's images alike
    assert diversity_ratio(one_image, real) == 0.0
    real = gaussian(200, d=2)
    central = real[real.norm(dim=1).argmin()]  # a real sample in the densest region (kept by the pruning)
    scores = realism_scores(real, torch.stack([central, torch.tensor([50.0, 50.0], dtype=torch.float64)]))
    assert scores[0] > 1e6  # on a kept real sample: radius / ~0
    assert scores[1] < 1  # far outside the manifold


def test_confidence_agreement_and_top_k():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3], [0.55, 0.45]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    assert confidence(probs, labels).tolist() == pytest.approx([0.9, 0.4, 0.8, 0.3, 0.55])
    assert agreement(probs, labels, threshold=0.5).tolist() == [True, False, True, False, True]
    assert agreement(probs, labels, threshold=0.6).tolist() == [True, False, True, False, False]
    mask = top_k_per_class(confidence(probs, labels), labels, {0: 2, 1: 1})
    assert mask.tolist() == [True, False, True, False, True]
    # hard: the least sure among the ones read as their class (never image 1 or 3, read as the other class)
    from synthaug.select.filters import Candidates, select_hard

    seen = Candidates(labels=labels, probs=lambda: probs, features=None, real_features=None, real_labels=None)
    kept, hardness = select_hard(seen, {0: 1, 1: 1})
    assert kept.tolist() == [False, False, True, False, True] and hardness.tolist() == pytest.approx([0.1, 0.6, 0.2, 0.7, 0.45])
    assert select_hard(seen, {0: 3, 1: 3})[0].tolist() == [True, False, True, False, True]  # a filter: fewer where too few


def test_novel_keeps_what_the_real_images_do_not_show():
    from synthaug.select.filters import Candidates, select_novel

    real, real_labels = torch.tensor([[0.0, 0.0], [10.0, 10.0]]), torch.tensor([0, 1])
    # class 0: a near-copy of its real image, two far ones next to each other, one on the other side, one far from it
    # but on class 1's real image, and a far one the scorer reads as class 1; class 1: one candidate
    features = torch.tensor([[0.1, 0.0], [5.0, 0.0], [5.2, 0.0], [0.0, -3.0], [10.0, 10.5], [9.0, 0.0], [10.0, 9.0]])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1])
    probs = torch.tensor([[0.9, 0.1]] * 5 + [[0.2, 0.8], [0.1, 0.9]])
    seen = Candidates(labels=labels, probs=lambda: probs, features=lambda: features, real_features=lambda: real,
                      real_labels=real_labels)
    kept, scores = select_novel(seen, {0: 3, 1: 1})
    # farthest from its own class's real image first (10, 10.5), then 5.2, then the one farthest from the real image
    # and those (0, -3), not 5.2's neighbour
    assert kept.tolist() == [False, False, True, True, True, False, True]
    assert scores[:5].tolist() == pytest.approx([0.1, 0.2, 5.2, 3.0, float(torch.tensor([10.0, 10.5]).norm())])
    readable = probs.argmax(1) == labels
    assert scores[kept & (labels == 0)].min() >= scores[~kept & readable & (labels == 0)].max()
    kept, scores = select_novel(seen, {0: 9, 1: 9})  # a filter: fewer, and no candidate kept twice
    assert kept.tolist() == [True, True, True, True, True, False, True]
    assert scores[:5].tolist() == pytest.approx([0.1, 0.2, 5.2, 3.0, float(torch.tensor([10.0, 10.5]).norm())])
    # a class without real images starts from its candidates' centre
    alone = Candidates(labels=labels[:4], probs=lambda: probs[:4], features=lambda: features[:4],
                       real_features=lambda: real[1:], real_labels=real_labels[1:])
    assert select_novel(alone, {0: 1})[0].tolist() == [False, False, False, True]


def test_cluster_selection_keeps_one_of_every_cluster():
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    g = torch.Generator().manual_seed(0)
    features = torch.cat([centres[j] + torch.randn(n, 2, generator=g) for j, n in enumerate((30, 10, 5))])
    labels = torch.zeros(len(features), dtype=torch.long)
    mask, scores = cluster_representatives(features, labels, {0: 3}, clusters=3)
    kept = features[mask]
    assert len(kept) == 3
    assert sorted(int(torch.cdist(k[None], centres).argmin()) for k in kept) == [0, 1, 2]
    assert mask.sum() == 3 and (scores <= 0).all()
    assert _spread(10, np.array([30, 10, 5])).tolist() == [7, 2, 1]  # 6.7, 2.2, 1.1 of 10
    assert _spread(2, np.array([1, 1, 1])).sum() == 2


def test_overgenerate_plan():
    plan = [{"id": f"r{i}", "label": i % 2, "group": None, "seed": i} for i in range(5)]  # 3 of class 0, 2 of class 1
    out = overgenerate_plan(plan, 2.5)
    assert out[:5] == plan
    assert len({r["id"] for r in out}) == len(out)
    assert sum(r["label"] == 0 for r in out) == 8 and sum(r["label"] == 1 for r in out) == 5
    assert len({r["seed"] for r in out}) == len(out)
    assert overgenerate_plan(plan, 1.0) == plan
    hundred = [{"id": f"r{i}", "label": 0, "group": None, "seed": i} for i in range(100)]
    assert len(overgenerate_plan(hundred, 1.1)) == 110  # not 111 (1.1 * 100 = 110.00000000000001)
    with pytest.raises(SynthaugError, match="overgenerate"):
        overgenerate_plan(plan, 0.5)


def test_matched_per_class_and_config_errors():
    real, synthetic = make_dataset((10, 2, 5)), make_dataset((0, 6, 1), seed=1)
    real_cut, synthetic_cut = matched_per_class(real, synthetic, cap=4, seed=0)
    assert real_cut.class_counts().tolist() == synthetic_cut.class_counts().tolist() == [0, 2, 1]
    from synthaug.runs import preflight

    with pytest.raises(SynthaugError, match="unknown selection method 'best'"):
        preflight(load_config(None, ["select.method=best"]))
    with pytest.raises(SynthaugError, match="overgenerate must be >= 1"):
        load_config(None, ["select.overgenerate=0.5"])


def test_feature_extractors(tmp_path):
    images = make_dataset((3, 2), channels=1, size=8).images
    assert feature_extractor("pixels")(images).shape == (5, 64)
    model = create_model("small-cnn", num_classes=2, in_channels=1, image_size=8)
    from_classifier = feature_extractor("classifier", classifier=model)(images)
    assert from_classifier.shape[0] == 5 and from_classifier.ndim == 2
    model.save_pretrained(tmp_path / "clf")
    assert torch.allclose(feature_extractor(str(tmp_path / "clf"))(images), from_classifier, atol=1e-5)
    assert feature_extractor(torch.nn.Conv2d(1, 2, 8))(images).shape == (5, 2)
    with pytest.raises(SynthaugError, match="need a trained classifier"):
        feature_extractor("classifier")
    with pytest.raises(SynthaugError, match="unknown feature extractor"):
        feature_extractor("no-such-thing")


def test_pretrained_encoder_from_a_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=8)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip")
    extract = feature_extractor(f"hf:{tmp_path / 'clip'}", device="cpu")
    features = extract(make_dataset((3, 2), channels=1, size=8).images)
    assert features.shape[0] == 5 and features.ndim == 2 and torch.isfinite(features).all()
    with pytest.raises(SynthaugError, match="cannot load an image encoder"):
        feature_extractor(f"hf:{tmp_path / 'missing'}")


@pytest.fixture(scope="module")
def data():
    return LoadedDataset("tiny", make_dataset((40, 40, 40), seed=0), make_dataset((10, 10, 10), seed=1))


def test_selection_keeps_the_planned_count(data, tmp_path, monkeypatch):
    from synthaug.select.filters import SELECTORS

    store_dir = tmp_path / "store"  # shared: every method selects from the same candidates
    given = []
    for method, selector in list(SELECTORS.items()):  # each told the config's options
        monkeypatch.setitem(SELECTORS, method, lambda *a, f=selector, **kw: (given.append(kw), f(*a, **kw))[1])
    for method in ("confidence", "agreement", "realism", "cluster", "random", "diffult", "diffult-band", "prototype", "hard",
                   "novel"):
        config = load_config(None, [*FAST, "recipe=synaug", f"output_dir={tmp_path}", f"synaug.store_dir={store_dir}",
                                    f"select.method={method}", "select.overgenerate=2", "select.threshold=0.2",
                                    "select.clusters=2", "select.k=2", "train.epochs=1", "synaug.replay_share=0"])
        task = make_task(data, config.split)
        result = get_recipe("synaug").run(task, config, workdir=tmp_path / method)
        deficits = (task.train.class_counts().max() - task.train.class_counts()).tolist()
        info = result.extra["synthetic"]["selection"]
        assert info["candidates"] == 2 * sum(deficits)
        assert given and all(kw == {"threshold": 0.2, "k": 2, "clusters": 2, "seed": config.seed} for kw in given)
        given.clear()
        rows = SyntheticStore(store_dir, task.train.classes).rows()
        assert len(rows) == 2 * sum(deficits)  # generated once, scored by every method
        kept = {r["id"] for r in rows if r["scores"][f"selected_{method}"]}
        assert kept == {r["id"] for r in result.synthetic.info["rows"]}
        if method in ("agreement", "diffult", "diffult-band", "prototype", "hard", "novel"):  # filters: may keep fewer, and say so
            assert all(k <= d for k, d in zip(result.synthetic.class_counts().tolist(), deficits))
            assert info["kept"] + info["shortfall"] == sum(deficits)
            continue
        assert result.synthetic.class_counts().tolist() == deficits and info["shortfall"] == 0
        score = f"select_{method}"
        for c in range(3):  # the kept images of a class score at least as high as the dropped ones
            of_class = [r for r in rows if r["label"] == c]
            if of_class and method != "cluster":
                low_kept = min(r["scores"][score] for r in of_class if r["id"] in kept)
                high_dropped = max(r["scores"][score] for r in of_class if r["id"] not in kept)
                assert low_kept >= high_dropped


def test_validation_stage_in_a_run(data, tmp_path, monkeypatch):
    from synthaug.data import sources

    monkeypatch.setitem(sources.SOURCES, "tiny-select", sources.Source("tiny-select", "test data",
                                                                       lambda cache: (data.train, data.test)))
    config = load_config(None, [*FAST, "recipe=synaug", f"output_dir={tmp_path}", "validate.enabled=true",
                                "name=validated", "data.dataset=tiny-select", "select.method=confidence",
                                "select.overgenerate=1.5", "report.baselines=ce"])
    run_dir, metrics = train_run(config, progress=False, compare=True)
    page = (run_dir / "report.html").read_text()
    assert "<h2>Selection</h2>" in page and "<h2>Synthetic set validation</h2>" in page and "CAS" in page
    v = metrics["validation"]
    for key in ("frechet_distance", "kernel_distance", "precision", "recall", "density", "coverage", "diversity_ratio",
                "domain_gap", "memorization", "cas"):
        assert key in v
    assert 0 <= v["cas"]["balanced_accuracy"] <= 1 and v["cas"]["classes"] == 2  # the head class gets no images
    per_class = v["cas"]["per_class"]  # each class the synthetic set has, by name; balanced accuracy is their mean
    assert len(per_class) == 2 and set(per_class) < set(data.train.classes)
    assert sum(per_class.values()) / 2 == pytest.approx(v["cas"]["balanced_accuracy"])
    assert "CAS per class" in page and all(f"<th>{name}</th>" in page.split("CAS per class")[1] for name in per_class)
    assert json.loads((run_dir / "validation.json").read_text())["frechet_distance"] == v["frechet_distance"]
    assert not (run_dir / "cas-checkpoint").exists()


def test_a_validation_written_before_cas_had_its_classes_is_done_again(data, tmp_path):
    from synthaug.select.stage import validation_stage

    config = load_config(None, [*FAST, "validate.features=pixels"])
    task = make_task(data, config.split)
    synthetic = make_dataset((20, 20, 20), seed=2)
    first = validation_stage(task, synthetic, config, None, workdir=tmp_path)
    done = tmp_path / "validation.json"
    older = json.loads(done.read_text())
    del older["cas"]["per_class"]
    done.write_text(json.dumps(older))
    again = validation_stage(task, synthetic, config, None, workdir=tmp_path)
    assert again["cas"]["per_class"] == first["cas"]["per_class"] and len(first["cas"]["per_class"]) == 3


def test_validate_command_on_a_folder(tmp_path, capsys, monkeypatch):
    import sys

    from PIL import Image

    from synthaug.cli import main
    from synthaug.data import load_dataset

    test = load_dataset("digits").test
    for c in range(10):  # "synthetic" images: real held-out digits, 6 per class
        (tmp_path / "gen" / str(c)).mkdir(parents=True)
        for i, idx in enumerate(torch.nonzero(test.labels == c).flatten()[:6].tolist()):
            Image.fromarray(test.images[idx, 0].numpy()).save(tmp_path / "gen" / str(c) / f"{i}.png")
    args = ["synthaug", "validate", str(tmp_path / "gen"), "-s", "data.dataset=digits", "-s", "split.ratio=10",
            "-s", "train.epochs=2", "-s", "validate.cas=false", "-s", f"output_dir={tmp_path / 'runs'}"]
    monkeypatch.setattr(sys, "argv", args)
    main()
    out = capsys.readouterr().out
    assert "frechet_distance" in out and "precision" in out
    # written under the output folder, nothing beside the user's images
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen", "runs"]
    (done,) = (tmp_path / "runs").glob("validate-gen-*")  # the folder's name and a hash of its path
    result = json.loads((done / "validation.json").read_text())
    assert result["synthetic_images"] == result["real_images"] <= 60
    assert result["memorization"]["median"] > 0.5  # held-out real images are not copies
    (tmp_path / "gen" / "cat").mkdir()
    Image.fromarray(test.images[0, 0].numpy()).save(tmp_path / "gen" / "cat" / "0.png")
    monkeypatch.setattr(sys, "argv", [*args[:2], str(tmp_path / "gen"), *args[3:]])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "class folder 'cat'" in capsys.readouterr().err
    # an --out folder holding someone else's files is refused before anything is written
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "validation.json").write_text("theirs")
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path / "mine")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "did not make" in capsys.readouterr().err
    assert (tmp_path / "mine" / "validation.json").read_text() == "theirs"


def test_with_groups_a_reader_drops_the_candidates_of_another_group(data, tmp_path, monkeypatch):
    """On a coloured split the scorer learns the class on cell-balanced batches (not the colour
    that stands in for it), and a group reader, trained the same way with labels and groups
    swapped, drops the candidates it reads as another group before the selector keeps any."""
    import synthaug.select.stage as stage

    trained, fit = [], stage.fit_classifier
    monkeypatch.setattr(stage, "fit_classifier", lambda train, cfg, **kw: trained.append((train, cfg)) or fit(train, cfg, **kw))
    store_dir = tmp_path / "store"
    base = [*FAST, "recipe=synaug", f"output_dir={tmp_path}", f"synaug.store_dir={store_dir}", "split.kind=colored",
            "split.agreement=0.9", "select.overgenerate=2", "train.epochs=1", "synaug.replay_share=0"]
    config = load_config(None, [*base, "select.method=random"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "random")
    [(reader_data, reader_cfg)] = trained  # `random` needs no scorer: the reader alone was trained
    assert reader_data.labels.tolist() == task.train.groups.tolist() and reader_data.classes == task.train.group_names
    assert reader_data.groups.tolist() == task.train.labels.tolist() and reader_cfg.group_method == "balanced-sampling"
    info = result.extra["synthetic"]["selection"]
    rows = SyntheticStore(store_dir, task.train.classes).rows()
    misread = {r["id"] for r in rows if not r["scores"]["group_read"]}
    assert 0 < info["group_misread"] == len(misread) < len(rows)
    assert not misread & {r["id"] for r in result.synthetic.info["rows"]}
    reader = stage.group_reader_for(task.train, config, store_dir / "scorers")  # trained once, read from the store
    assert len(trained) == 1 and not list((store_dir / "scorers").glob("*-checkpoint"))  # its checkpoint gone once saved
    assert (predict_logits(reader, result.synthetic.images).argmax(1) == result.synthetic.groups).all()

    trained.clear()  # the scorer: cross-entropy on cell-balanced batches; without the reader nothing is dropped first
    config = load_config(None, [*base, "select.method=confidence", "select.read_groups=false"])
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "confidence")
    [(scorer_data, scorer_cfg)] = trained
    assert scorer_data is task.train and (scorer_cfg.loss, scorer_cfg.group_method) == ("ce", "balanced-sampling")
    assert result.extra["synthetic"]["selection"]["group_misread"] is None
    assert result.extra["synthetic"]["selection"]["shortfall"] == 0  # every planned image kept, misread or not


@pytest.fixture(scope="module")
def scorer(data):
    """A small-cnn that reads the tiny data's classes (row bands) with a margin to spare."""
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=3, in_channels=1, image_size=8)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x = data.train.images.float() / 255
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), data.train.labels).backward()
        optimiser.step()
    return model.eval()


@pytest.mark.parametrize("push", [0.5, 0.9])
def test_the_boundary_push_moves_images_part_way_to_their_rival(scorer, data, push):
    from synthaug.select.boundary import boundary_push, margins

    images, labels = data.train.images, data.train.labels
    pushed, found = boundary_push(scorer, images, labels, push)
    moved = found["pushed"]
    assert pushed.dtype == torch.uint8 and pushed.shape == images.shape
    assert moved.sum() > 0.6 * len(images)  # nearly every image read as its class moves
    assert torch.equal(pushed[~moved], images[~moved]) and (pushed[moved] != images[moved]).flatten(1).any(1).all()
    # the margin to the nearest rival shrinks by about `push` (DeepFool on the linearised margin, then uint8)
    ratio = (found["margin_after"][moved] / found["margin_before"][moved]).median()
    assert abs(float(ratio) - (1 - push)) < 0.1
    after = margins(predict_logits(scorer, pushed), labels)
    assert torch.allclose(after, found["margin_after"], atol=1e-4)
    assert (after[found["margin_before"] > 0] > 0).all()  # cleaning: no image is pushed over to another class


def test_the_boundary_push_puts_back_the_images_it_pushes_over(scorer, data):
    """So close to the boundary, rounding to uint8 pushes some images over: they stay as generated."""
    from synthaug.select.boundary import boundary_push, margins

    images, labels = data.train.images, data.train.labels
    pushed, found = boundary_push(scorer, images, labels, 0.99)
    readable = margins(predict_logits(scorer, images), labels) > 0
    assert 0 < int(found["pushed"].sum()) < int(readable.sum())  # some were put back
    assert (margins(predict_logits(scorer, pushed), labels)[readable] > 0).all()
    unchanged, none = boundary_push(scorer, images, labels, 0.0)
    assert torch.equal(unchanged, images) and not none["pushed"].any()


@pytest.mark.parametrize("method", ["none", "prototype"])
def test_a_run_pushes_its_kept_images_and_leaves_the_store_as_generated(data, tmp_path, method):
    import synthaug.select.stage as stage
    from synthaug.select.boundary import margins

    store_dir = tmp_path / "store"
    base = [*FAST, "recipe=synaug", f"output_dir={tmp_path}", f"synaug.store_dir={store_dir}", f"select.method={method}",
            "train.epochs=1", "synaug.replay_share=0"]
    config = load_config(None, [*base, "select.boundary=0.6"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "pushed")
    info = result.extra["synthetic"]["boundary"]
    store = SyntheticStore(store_dir, task.train.classes)
    everything = store.load()
    at = {r["id"]: n for n, r in enumerate(everything.info["rows"])}
    kept = [r["id"] for r in result.synthetic.info["rows"]]
    generated = everything.images[[at[i] for i in kept]]  # the store's images, as generated
    moved = (result.synthetic.images != generated).flatten(1).any(1)
    assert info["images"] == len(kept) and info["pushed"] == int(moved.sum()) > 0
    assert not any(k.startswith("boundary") for r in store.rows() for k in r.get("scores") or {})  # the run's alone
    scorer = stage.scorer_for(task.train, config, store_dir / "scorers")  # the scorer the push used, from the store
    before = margins(predict_logits(scorer, generated), result.synthetic.labels)
    after = margins(predict_logits(scorer, result.synthetic.images), result.synthetic.labels)
    assert (after[moved] < before[moved]).all() and (after[moved] > 0).all()
    assert float(before.median()) == pytest.approx(info["margin_before"], abs=1e-4)
    # the push's seconds (and the scorer's training) apart from the generation's, where the cost counts them
    assert result.seconds["select"] >= info["seconds"] > 0
    if method == "prototype":
        assert result.seconds["select"] == pytest.approx(info["seconds"] + result.extra["synthetic"]["selection"]["seconds"])
    # without the push the same store gives back its images as generated
    plain = get_recipe("synaug").run(task, load_config(None, base), workdir=tmp_path / "plain")
    assert "boundary" not in plain.extra["synthetic"] and torch.equal(plain.synthetic.images, generated)
    assert ("select" in plain.seconds) == (method != "none")


def test_the_boundary_push_does_not_depend_on_the_batch(scorer, data):
    from synthaug.select.boundary import boundary_push

    whole, found = boundary_push(scorer, data.train.images, data.train.labels, 0.5)
    batched, found_batched = boundary_push(scorer, data.train.images, data.train.labels, 0.5, batch_size=7)
    assert torch.equal(whole, batched) and torch.equal(found["pushed"], found_batched["pushed"])


def test_a_flat_margin_is_not_pushed_off_the_image_range(data):
    """Where the margin barely depends on the pixels, DeepFool's step would be unbounded."""
    from synthaug.select.boundary import boundary_push

    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        flat[1].weight.zero_()
        flat[1].weight[2].fill_(1e-7)  # the margin over class 1 grows by 1e-7 a pixel
        flat[1].bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    images = data.train.images[data.train.labels == 2]  # read as class 2 by a margin of 1
    pushed, found = boundary_push(flat, images, torch.full((len(images),), 2), 0.5)
    assert torch.equal(pushed, images) and not found["pushed"].any()
