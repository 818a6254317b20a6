"""SYNAuG end to end on tiny data with a tiny in-code generator: plan, generate into the
store, train with domain mixup, re-fit the head; caching, resume and the report."""

import json
import math
import sys

import pytest
import torch
from conftest import make_dataset

from synthaug.classify.train import cross_domain_partners
from synthaug.cli import main
from synthaug.config import load_config
from synthaug.data import LoadedDataset, colored
from synthaug.errors import SynthaugError
from synthaug.generate import DiffusionGenerator
from synthaug.plan import balance_plan
from synthaug.recipes import get_recipe
from synthaug.task import make_task

# the whole fill generated (replay_share 0): these tests count the generator's images
FAST = ["train.epochs=2", "train.batch_size=16", "train.augment=none", "split.ratio=8", "split.n_max=32",
        "recipe=synaug", "generator.preset=tiny", "generator.steps=4", "generator.batch_size=8",
        "generator.sampling_steps=3", "generator.sampling_batch_size=16", "synaug.replay_share=0"]


@pytest.fixture(scope="module")
def data():
    return LoadedDataset("tiny", make_dataset((40, 40, 40), seed=0), make_dataset((10, 10, 10), seed=1))


def test_balance_plan():
    ds = make_dataset((10, 4, 1))
    plan = balance_plan(ds, seed=3)
    assert [sum(r["label"] == c for r in plan) for c in range(3)] == [0, 6, 9]
    assert len({r["id"] for r in plan}) == len(plan) == len({r["seed"] for r in plan})
    assert balance_plan(ds, seed=3) == plan and balance_plan(ds, seed=4)[0]["seed"] != plan[0]["seed"]
    assert len(balance_plan(ds, target_per_class=12)) == 2 + 8 + 11
    with pytest.raises(SynthaugError, match="below the largest class"):
        balance_plan(ds, target_per_class=5)
    with pytest.raises(SynthaugError, match="needs a split with groups"):
        balance_plan(ds, by_group=True)


def test_a_partial_fill_fills_its_share_of_the_imbalance_in_log_space_with_the_full_fill_s_first_rows():
    ds = make_dataset((400, 100, 4))
    full = balance_plan(ds, seed=3)
    half = balance_plan(ds, seed=3, fill=0.5)
    assert [sum(r["label"] == c for r in half) for c in range(3)] == [0, 200 - 100, 40 - 4]  # sqrt(400 n)
    assert half == [r for r in full if int(r["id"].split("-")[-1]) < {0: 0, 1: 100, 2: 36}[r["label"]]]
    assert balance_plan(ds, seed=3, fill=1.0) == full
    assert [sum(r["label"] == c for r in balance_plan(ds, target_per_class=900, fill=0.5)) for c in range(3)] == [
        600 - 400, 300 - 100, 60 - 4]
    for bad in (0, 1.5):
        with pytest.raises(SynthaugError, match="synaug.fill must be in"):
            balance_plan(ds, fill=bad)
    ds = make_dataset((10, 3))
    ds.groups, ds.group_names = torch.tensor([0] * 7 + [1] * 3 + [0] * 3), ["red", "green"]  # cell (1, green) is empty
    filled = {}
    for r in balance_plan(ds, by_group=True, fill=0.5):
        filled[r["label"], r["group"]] = filled.get((r["label"], r["group"]), 0) + 1
    assert filled == {(0, 1): 5 - 3, (1, 0): 5 - 3, (1, 1): 3}  # round(sqrt(7 n)); the empty cell counts as one


def test_a_plan_with_nothing_to_generate_trains_no_generator(data, tmp_path, monkeypatch):
    import synthaug.recipes.synaug as synaug_module

    monkeypatch.setattr(synaug_module, "generator_stage", lambda *a, **k: pytest.fail("a generator for no image"))
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", "split.kind=none"])  # balanced: nothing to fill
    result = get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run")
    assert result.extra["generator"]["source"] == "none: nothing to add" and result.extra["synthetic"]["images"] == 0


def test_balance_plan_by_group():
    ds = colored(make_dataset((20, 20, 20)), agreement=0.8, seed=0)
    plan = balance_plan(ds, by_group=True)
    cells = {}
    for c in range(3):
        for g in range(3):
            real = int(((ds.labels == c) & (ds.groups == g)).sum())
            cells[c, g] = real + sum(r["label"] == c and r["group"] == g for r in plan)
    assert len(set(cells.values())) == 1  # every (class, colour) cell is filled to the same size


def test_cross_domain_partners():
    domains = torch.tensor([0, 0, 0, 1, 1])
    partner = cross_domain_partners(domains)
    assert (domains[partner] != domains).all()
    assert cross_domain_partners(torch.zeros(4, dtype=torch.long)).sort().values.tolist() == [0, 1, 2, 3]


def test_synaug_end_to_end_reuses_generator_and_store(data, tmp_path):
    config = load_config(None, [*FAST, f"output_dir={tmp_path}"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    syn = result.extra["synthetic"]
    assert syn["counts_after"] == [32, 32, 32] and syn["images"] == 32 - 11 + 32 - 4
    assert result.extra["generator"]["source"] == "trained"
    assert set(result.seconds) >= {"generator", "generate", "train", "refit_head", "evaluate"}
    rows = [json.loads(line) for line in (tmp_path / "run" / "synthetic" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["generator"] == result.extra["generator"]["fingerprint"] and rows[0]["recipe"] == "synaug"
    again = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    assert again.extra["generator"]["source"] == "cache" and again.extra["synthetic"]["generated_now"] == 0


@pytest.mark.parametrize("flags", [[], ["synaug.domain_mixup=false"], ["synaug.refit_head=false"]])
def test_ablations(data, tmp_path, flags, monkeypatch):
    import synthaug.classify.train as train_module
    import synthaug.recipes.synaug as synaug_module

    seen, partners = {}, []
    real_fit, real_mix, real_refit = synaug_module.fit_classifier, train_module.mix_batch, synaug_module.refit_head
    monkeypatch.setattr(synaug_module, "fit_classifier",
                        lambda train, cfg, **kw: seen.update(mix=cfg.mix, domains=kw["domains"]) or real_fit(train, cfg, **kw))
    monkeypatch.setattr(train_module, "mix_batch", lambda *a, **kw: partners.append(kw.get("partner")) or real_mix(*a, **kw))
    monkeypatch.setattr(synaug_module, "refit_head", lambda *a, **kw: seen.update(refit=True) or real_refit(*a, **kw))
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", *flags])
    result = get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run")
    assert ("refit_head" in result.seconds) == config.synaug.refit_head == seen.get("refit", False)
    on = config.synaug.domain_mixup
    assert seen["mix"] == ("domain-mixup" if on else "none") and seen["domains"].unique().tolist() == [0, 1]
    # every batch mixed (mix_prob 1), each image with a partner from the other domain, not a random one
    assert len(partners) == (2 * math.ceil(len(seen["domains"]) / 16) if on else 0)
    assert all(p is not None for p in partners)


def test_a_partial_fill_reaches_the_run(data, tmp_path):
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", "synaug.fill=0.5", "train.loss=balanced-softmax"])
    syn = get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run").extra["synthetic"]
    assert syn["counts_after"] == [32, 19, 11] and syn["images"] == 19 - 11 + 11 - 4  # sqrt(32 n), rounded


def test_a_target_above_the_largest_class_fills_every_class_to_it(data, tmp_path):
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", "synaug.target_per_class=40", "synaug.replay=true"])
    syn = get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run").extra["synthetic"]
    assert syn["counts_after"] == [40, 40, 40] and syn["images"] == 40 - 32 + 40 - 11 + 40 - 4


def test_groups_are_balanced_and_reported(data, tmp_path):
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", "split.kind=colored", "split.agreement=0.9"])
    task = make_task(data, config.split)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    assert "worst_group_accuracy" in result.metrics
    rows = [json.loads(line) for line in (tmp_path / "run" / "synthetic" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["conditioning"] == "class+group" and r["group"] is not None for r in rows)


def test_with_groups_the_head_is_re_fit_on_cell_balanced_real_data(data, tmp_path, monkeypatch):
    """SYNAuG's last step re-fits the head on uniformly subsampled real data: with groups, each
    (class, group) cell cut to the same count, or the colour-biased real data teaches the
    head the colour again."""
    import synthaug.data.splits as splits
    import synthaug.recipes.synaug as synaug_module

    given, cells = [], []
    real, real_subsample = synaug_module.refit_head, splits.class_balanced_subsample
    monkeypatch.setattr(synaug_module, "refit_head", lambda *a, **kw: given.append(kw["by_group"]) or real(*a, **kw))

    def subsample(*a, **kw):  # the real images the head is re-fit on: their (class, group) cells' sizes
        kept = real_subsample(*a, **kw)
        counts = torch.bincount(kept.cells())
        cells.append(counts[counts > 0])
        return kept

    monkeypatch.setattr(splits, "class_balanced_subsample", subsample)
    base = [*FAST, f"output_dir={tmp_path}", "split.kind=colored", "split.agreement=0.9", "synaug.replay=true"]
    for flags, by_group in (([], True), (["synaug.balance_groups=false"], False)):
        config = load_config(None, [*base, *flags])
        get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / f"run{by_group}")
    assert given == [True, False] and len(cells) == 2
    assert len(cells[0].unique()) == 1 and len(cells[1].unique()) > 1  # every cell alike, or the colour's bias kept
    config = load_config(None, [*base, "synaug.refit_per_class=all"])
    with pytest.raises(SynthaugError, match="refit_per_class=all"):
        get_recipe("synaug").check(make_task(data, config.split), config)


def test_group_dro_with_domain_mixup_fails_before_anything_is_generated(data, tmp_path):
    """Group DRO weighs each image's own loss; domain mixup blends two: the check says so first."""
    base = [*FAST, f"output_dir={tmp_path}", "split.kind=colored", "split.agreement=0.9", "train.group_method=dro"]
    config = load_config(None, base)
    with pytest.raises(SynthaugError, match="synaug.domain_mixup=false"):
        get_recipe("synaug").check(make_task(data, config.split), config)
    config = load_config(None, [*base, "synaug.domain_mixup=false", "synaug.replay=true"])
    get_recipe("synaug").check(make_task(data, config.split), config)
    assert not list(tmp_path.iterdir())


def test_replay_fills_a_cell_without_real_images_from_its_class():
    from synthaug.recipes.synaug import replay

    ds = make_dataset((6, 6))
    ds.groups, ds.group_names = ds.labels.clone(), ["red", "green"]  # cells (0, 1) and (1, 0) have no image
    plan = balance_plan(ds, by_group=True, seed=0)
    drawn = replay(ds, plan)
    assert len(drawn) == len(plan) == 12 and drawn.labels.tolist() == [r["label"] for r in plan]


def test_generation_interrupted_then_resumed(data, tmp_path, monkeypatch):
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", "generator.sampling_batch_size=8"])
    task = make_task(data, config.split)
    real_generate, calls = DiffusionGenerator.generate, []

    def dies_on_second_batch(self, labels, seeds, **kw):
        calls.append(list(seeds))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, labels, seeds, **kw)

    monkeypatch.setattr(DiffusionGenerator, "generate", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    monkeypatch.setattr(DiffusionGenerator, "generate", real_generate)
    result = get_recipe("synaug").run(task, config, workdir=tmp_path / "run")
    assert result.extra["synthetic"]["generated_now"] == 32 - 11 + 32 - 4 - 8  # only what was missing
    assert result.extra["synthetic"]["images"] == 49


def test_pretrained_generator_that_does_not_match(data, tmp_path):
    other = make_dataset((5, 5), seed=2)
    config = load_config(None, [*FAST, f"output_dir={tmp_path}"])
    from synthaug.generate import GeneratorConfig, GeneratorTrainConfig

    gen = DiffusionGenerator.fit(other, GeneratorConfig(image_size=8, channels=1, classes=other.classes, preset="tiny"),
                                 GeneratorTrainConfig(steps=1, batch_size=4))
    gen.save_pretrained(tmp_path / "gen")
    config = load_config(None, [*FAST, f"output_dir={tmp_path}", f"generator.path={tmp_path / 'gen'}"])
    with pytest.raises(SynthaugError, match="classes"):
        get_recipe("synaug").run(make_task(data, config.split), config, workdir=tmp_path / "run")


def test_synthaug_run_writes_report(tmp_path, capsys, monkeypatch):
    args = ["synthaug", "run", "--quiet", "-s", "data.dataset=digits", "-s", "split.ratio=10", "-s", f"output_dir={tmp_path}",
            "-s", "report.baselines=ce,oracle", *[a for kv in FAST if not kv.startswith("split.") for a in ("-s", kv)]]
    monkeypatch.setattr(sys, "argv", args)
    main()
    out = capsys.readouterr().out
    assert "report:" in out and "oracle" in out
    run = tmp_path / "digits-lt10-synaug-s0"
    page = (run / "report.html").read_text()
    for section in ("Test metrics", "Training images per class", "Real and synthetic samples", "Per-class test accuracy",
                    "Generator training", "Time per stage"):
        assert section in page
    assert page.count("data:image/png;base64,") >= 5 and "<script" not in page
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["baselines"]) == {"ce", "oracle"} and metrics["synthetic"]["images"] > 0
