from pathlib import Path

import pytest

from synthaug.classify.train import TrainConfig
from synthaug.config import RunConfig, dump_config, load_config
from synthaug.errors import SynthaugError
from synthaug.generate.network import GeneratorConfig, SamplerConfig


def test_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: crt\ntrain:\n  epochs: 7\n  lr: 1\nsplit:\n  ratio: 10\n")
    cfg = load_config(path, ["train.epochs=3", "data.dataset=digits", "split.n_max=null"])
    assert cfg.recipe == "crt" and cfg.train.epochs == 3 and cfg.train.lr == 1.0
    assert isinstance(cfg.train.lr, float) and cfg.split.ratio == 10.0 and cfg.split.n_max is None
    assert cfg.data.dataset == "digits" and cfg.train.batch_size == RunConfig().train.batch_size
    assert load_config(None, []).to_dict() == RunConfig().to_dict()
    # the dumped config loads back to the same thing
    (tmp_path / "d.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "d.yaml").to_dict() == cfg.to_dict()
    # YAML 1.1 reads 1e-3 as a string: a float field takes it as the number it means
    assert load_config(None, ["generator.lr=1e-3"]).generator.lr == 0.001


def test_a_path_from_the_home_folder_means_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: ~/runs\nsynaug:\n  store_dir: ~/store\n")
    cfg = load_config(path, ["generator.pretrained=~/models/sd15", "data.cache_dir=~/cache", "generator.prompt=~{name}"])
    assert cfg.output_dir == str(tmp_path / "runs") and cfg.synaug.store_dir == str(tmp_path / "store")
    assert cfg.generator.pretrained == str(tmp_path / "models/sd15") and cfg.data.cache_dir == str(tmp_path / "cache")
    assert cfg.generator.prompt == "~{name}"  # text, not a path: left alone


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.epoch=3"], r"unknown config key 'train.epoch' \(did you mean 'train.epochs'\?\)"),
        (["nonsense=1"], "unknown config key 'nonsense'"),
        (["train.epochs=many"], "train.epochs' got 'many': expected int"),
        (["train.loss=focal"], "train.loss' is 'focal': use one of ce, logit-adjusted, balanced-softmax"),
        (["split.kind=zipf"], "use one of none, long-tail"),
        (["train.epochs"], "not key=value"),
        (["train.augment=crop+blur"], "unknown augmentation 'blur'"),
        (["train.refit_per_class=abc"], "use 'all', 'min' or a positive number"),
        (["train.mix_alpha=0"], "mix_alpha must be > 0"),
        (["generator.checkpoint_every=0"], "checkpoint_every must be >= 1"),
        (["split.val_per_class=-1"], "val_per_class must be >= 0"),
        (["train.lr=[0.1"], "not valid YAML"),
        (["train.lr=fast"], "train.lr' got 'fast': expected float"),
        (["data.channels=7"], "data.channels must be 1 or 3"),
        (["data.image_size=2"], "data.image_size must be >= 4"),
        (["synaug=false"], "config section 'synaug' must be a mapping"),
        (["report.baselines=[ce,[crt]]"], "report.baselines must be a list of recipe names"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(SynthaugError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(SynthaugError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(SynthaugError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SynthaugError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_run_name():
    assert load_config(None, ["data.dataset=fashion-mnist", "split.ratio=100", "recipe=crt"]).run_name() == \
        "fashion-mnist-lt100-crt-s0"
    assert load_config(None, ["split.kind=few-shot", "split.k=5"]).run_name() == "mnist-5k-5shot-ce-s0"


@pytest.mark.parametrize("path", sorted((__import__("pathlib").Path(__file__).parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert load_config(path).recipe


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    from synthaug.recipes import get_recipe

    get_recipe(config.recipe)
    for name in config.report.baselines:
        get_recipe(name)


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(loss="focal"),
    lambda: TrainConfig(sampler="balanced"),
    lambda: SamplerConfig(sampler="euler"),
    lambda: GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], image_pairing="other"),
])
def test_settings_built_in_code_check_their_choices(make):
    """The Literal types validate settings made in code too, not only those read by the config."""
    with pytest.raises(SynthaugError, match="use one of"):
        make()


def test_options_added_later_leave_cache_keys_alone_at_their_former_values():
    """Caches named by a hash of settings (labellers, scorers, checkpoints, shared stores,
    generators) keep their names when synthaug gains an option, as long as it is at the value
    synthaug had before it; a default changed since (Min-SNR on) names new caches apart."""
    from dataclasses import asdict

    from synthaug.classify import TrainConfig
    from synthaug.config import GeneratorSection
    from synthaug.generate.network import GeneratorTrainConfig
    from synthaug.utils.keys import drop_former, key_dict

    # the section's list: the training's, and sampling's (a store made before keeps its name)
    assert TrainConfig.ADDED and GeneratorSection.ADDED == {**GeneratorTrainConfig.ADDED, "group_guidance_scale": None,
                                                            "feedback": 0.0, "feedback_criterion": "entropy",
                                                            "feedback_every": 1, "ensemble": 1,
                                                            "guidance_interval": None}
    plain = key_dict(TrainConfig())
    assert not set(TrainConfig.ADDED) & set(plain)
    assert plain == {k: v for k, v in asdict(TrainConfig()).items() if k not in TrainConfig.ADDED}
    assert key_dict(TrainConfig(drw_start=0.8))["drw_start"] == 0.8
    section = asdict(GeneratorSection(cbdm_weight=1.0))
    kept = drop_former(section, GeneratorSection)
    assert kept["cbdm_weight"] == 1.0 and kept["steps"] == section["steps"] and "class_sampler" not in kept
    assert kept["min_snr_gamma"] == 5.0  # today's default is not the former plain loss: it is named
    assert "min_snr_gamma" not in drop_former(asdict(GeneratorSection(min_snr_gamma=0.0)), GeneratorSection)
    assert "group_guidance_scale" not in kept
    assert drop_former(asdict(GeneratorSection(group_guidance_scale=1.0)), GeneratorSection)["group_guidance_scale"] == 1.0
    assert not any(k.startswith("feedback") for k in kept)  # a store made before feedback guidance keeps its name


def test_a_record_without_a_later_option_ran_at_its_former_value():
    """A run recorded before `generator.min_snr_gamma` existed trained without it: re-running it
    at today's default is a change, pinning the former value is not."""
    from synthaug.config import RunConfig, config_changes, flatten

    recorded = {k: v for k, v in flatten(RunConfig().to_dict()).items() if k != "generator.min_snr_gamma"}
    assert config_changes(recorded, RunConfig()) == ["generator.min_snr_gamma: 0.0 -> 5.0"]
    assert config_changes(recorded, load_config(None, ["generator.min_snr_gamma=0"])) == []


def test_a_split_option_counts_only_for_the_split_kinds_that_read_it():
    """`split.test_colours` (added; every, where the former test drew one colour) changes a
    coloured run, not a long-tailed one; neither does a long-tail option a coloured run."""
    from synthaug.config import config_changes, flatten

    def before(overrides):  # recorded before split.test_colours existed
        return {k: v for k, v in flatten(load_config(None, overrides).to_dict()).items() if k != "split.test_colours"}

    assert config_changes(before([]), load_config(None, [])) == []
    assert config_changes(before([]), load_config(None, ["split.agreement=0.5"])) == []
    coloured = ["split.kind=colored"]
    assert config_changes(before(coloured), load_config(None, coloured)) == ["split.test_colours: 'drawn' -> 'every'"]
    drawn = [*coloured, "split.test_colours=drawn"]
    assert config_changes(before(coloured), load_config(None, drawn)) == []
    assert config_changes(before(coloured), load_config(None, [*drawn, "split.ratio=10"])) == []
    assert config_changes(before(coloured), load_config(None, [*drawn, "split.agreement=0.5"])) == \
        ["split.agreement: 0.95 -> 0.5"]


def test_a_recipe_section_s_defaults_count_only_for_the_runs_that_read_it():
    """TADA's defaults moved (share None -> 0.35): a finished ce or SYNAuG run (whose report
    baselines do not include a TADA recipe) is not "different" for it, a TADA run is. And a
    TADA run recorded before `tada.share` and `tada.synthetic_weight` existed ran the paper's
    k-means at weight 1 (the section's `ADDED`)."""
    import synthaug.recipes  # noqa: F401  (registers which recipes read which section)
    from synthaug.config import config_changes, flatten, unread_sections

    def before(overrides):  # the record of a run made when tada.share defaulted to None
        return {**flatten(load_config(None, overrides).to_dict()), "tada.share": None}

    for recipe in ("ce", "synaug"):
        assert "tada" in unread_sections(load_config(None, [f"recipe={recipe}"]))
        assert config_changes(before([f"recipe={recipe}"]), load_config(None, [f"recipe={recipe}"])) == []
    assert config_changes(before(["recipe=tada"]), load_config(None, ["recipe=tada"])) == ["tada.share: None -> 0.35"]
    baseline = ["recipe=ce", "report.baselines=[tada-upsample]"]  # a baseline reads it: it counts
    assert config_changes(before(baseline), load_config(None, baseline)) == ["tada.share: None -> 0.35"]
    assert unread_sections(load_config(None, ["recipe=auto"])) == set()
    older = {k: v for k, v in before(["recipe=tada"]).items() if k not in ("tada.share", "tada.synthetic_weight")}
    assert config_changes(older, load_config(None, ["recipe=tada"])) == \
        ["tada.share: None -> 0.35", "tada.synthetic_weight: 1.0 -> 0.3"]
    assert config_changes(older, load_config(None, ["recipe=tada", "tada.share=null", "tada.synthetic_weight=1"])) == []
