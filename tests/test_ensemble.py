"""Generator ensembles (generate/ensemble.py, `generator.ensemble`): each image is made by the
member its seed falls to, exactly as that member makes it alone; the stage trains the members at
successive seeds (the first is the run's single generator); a store names the ensemble."""

import pytest
import torch
from conftest import make_dataset

from synthaug.config import load_config
from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.generate.cache import check_store_made, load_generator
from synthaug.generate.ensemble import Ensemble, member_seeds
from synthaug.generate.stage import generate_stage, generator_stage
from synthaug.store import SyntheticStore

SAMPLER = SamplerConfig(steps=3, guidance_scale=2.0, precision="float32")


@pytest.fixture(scope="module")
def members():
    ds = make_dataset((12, 8, 4))
    config = GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny")
    train = GeneratorTrainConfig(steps=3, batch_size=8, warmup_steps=1)
    return ds, [DiffusionGenerator.fit(ds, config, train, seed=s) for s in (0, 1, 2)]


def test_each_image_is_its_seed_s_member_s_image_in_any_batch(members):
    """Row i is made by member seed mod k, bit for bit as that member makes it alone; plain,
    image-guided and mixed rows alike; splitting the batch changes nothing; `generate` agrees."""
    ds, gens = members
    ensemble = Ensemble(gens)
    rows = [{"id": f"r{i}", "label": i % 3, "seed": 100 + i} for i in range(7)]
    rows += [{"id": f"g{i}", "label": 2, "seed": 200 + i, "kind": "guided", "source": i, "strength": 0.6}
             for i in range(5)]
    images = ensemble.generate_rows(rows, SAMPLER, ds)
    for row, image in zip(rows, images):
        alone = gens[row["seed"] % 3].generate_rows([row], SAMPLER, ds)[0]
        assert torch.equal(image, alone)
    assert torch.equal(torch.cat([ensemble.generate_rows(rows[:4], SAMPLER, ds),
                                  ensemble.generate_rows(rows[4:], SAMPLER, ds)]), images)
    plain = rows[:7]
    assert torch.equal(ensemble.generate([r["label"] for r in plain], [r["seed"] for r in plain], sampler=SAMPLER),
                       images[:7])
    by_member = ensemble.parts([r["seed"] for r in rows])
    assert sorted(i for part in by_member for i in part) == list(range(len(rows))) and all(by_member)


def test_generate_splits_every_per_image_argument_by_member(members):
    """Image-guided generation from given images at one strength per image, and generation from
    given initial noise: each image as its member makes it alone from its own arguments."""
    ds, gens = members
    ensemble = Ensemble(gens)
    labels, seeds, strengths = [0, 1, 2, 0, 1], [10, 11, 12, 13, 14], [0.5, 0.6, 0.7, 0.8, 0.9]
    init = ds.images[[0, 12, 20, 1, 13]]
    guided = ensemble.generate(labels, seeds, sampler=SAMPLER, init_images=init, strength=strengths)
    noise = torch.randn(5, *ensemble.noise_shape, generator=torch.Generator().manual_seed(0))
    noised = ensemble.generate(labels, seeds, sampler=SAMPLER, noise=noise)
    for i, seed in enumerate(seeds):
        member = gens[seed % 3]
        assert torch.equal(guided[i], member.generate([labels[i]], [seed], sampler=SAMPLER, init_images=init[i:i + 1],
                                                      strength=[strengths[i]])[0])
        assert torch.equal(noised[i], member.generate([labels[i]], [seed], sampler=SAMPLER, noise=noise[i:i + 1])[0])
    assert not torch.equal(guided, noised)


def test_the_ensemble_is_named_by_its_members_and_saved_as_their_folders(members, tmp_path):
    ds, gens = members
    ensemble = Ensemble(gens[:2])
    assert ensemble.fingerprint() not in (gens[0].fingerprint(), gens[1].fingerprint())
    assert ensemble.fingerprint() != Ensemble(gens[1::-1]).fingerprint() != Ensemble([gens[0], gens[2]]).fingerprint()
    assert ensemble.train_seconds == pytest.approx(gens[0].train_seconds + gens[1].train_seconds)
    ensemble.save_pretrained(tmp_path / "saved")
    loaded = load_generator(tmp_path / "saved", device="cpu")
    assert isinstance(loaded, Ensemble) and loaded.fingerprint() == ensemble.fingerprint()
    rows = [{"id": f"r{i}", "label": i % 3, "seed": i} for i in range(4)]
    assert torch.equal(loaded.generate_rows(rows, SAMPLER), ensemble.generate_rows(rows, SAMPLER))
    with pytest.raises(SynthaugError, match="at least 2 generators"):
        Ensemble(gens[:1])
    two = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], preset="tiny"))
    grouped = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=ds.classes, num_groups=2, preset="tiny"))
    for other in (two, grouped):
        with pytest.raises(SynthaugError, match="one shape, conditioning, classes and groups"):
            Ensemble([gens[0], other])


def _config(tmp_path, *extra):
    return load_config(None, ["recipe=synaug", "generator.preset=tiny", "generator.steps=3", "generator.batch_size=8",
                              "generator.sampling_steps=3", "generator.precision=float32", "generator.seed=5",
                              f"output_dir={tmp_path}", *extra])


def test_the_stage_trains_the_members_at_successive_seeds_and_a_store_names_the_ensemble(tmp_path):
    """ensemble=2 at seed 5: the generators of seeds 5 and 6, the first the one the run trains alone
    (from the cache); the store's rows record the ensemble's fingerprint, so a store a single
    generator made refuses the ensemble's run, and the reverse."""
    ds = make_dataset((12, 8, 4))
    single, info = generator_stage(ds, _config(tmp_path))
    assert info["trained_now"]
    ensemble, info = generator_stage(ds, _config(tmp_path, "generator.ensemble=2"))
    assert isinstance(ensemble, Ensemble) and member_seeds(5, 2) == [5, 6]
    assert ensemble.members[0].fingerprint() == single.fingerprint()
    assert [m["source"] for m in info["members"]] == ["cache", "trained"]
    assert info["fingerprint"] == ensemble.fingerprint() and info["trained_now"]
    sixth, _ = generator_stage(ds, _config(tmp_path, "generator.seed=6"))
    assert ensemble.members[1].fingerprint() == sixth.fingerprint()
    plan = [{"id": f"r{i}", "label": i % 3, "seed": i} for i in range(6)]
    config = _config(tmp_path, "generator.ensemble=2")
    images, _ = generate_stage(plan, ensemble, config, tmp_path / "store", ds)
    assert {r["generator"] for r in SyntheticStore(tmp_path / "store", ds.classes).rows()} == {ensemble.fingerprint()}
    assert torch.equal(images.images, ensemble.generate_rows(plan, SamplerConfig(steps=3, guidance_scale=3.0,
                                                                                      precision="float32")))
    assert {r["ensemble"] for r in SyntheticStore(tmp_path / "store", ds.classes).rows()} == {2}
    with pytest.raises(SynthaugError, match="made with ensemble 2, not 1"):
        generate_stage(plan, single, _config(tmp_path), tmp_path / "store", ds)
    generate_stage(plan, single, _config(tmp_path), tmp_path / "single", ds)
    assert all("ensemble" not in r for r in SyntheticStore(tmp_path / "single", ds.classes).rows())
    with pytest.raises(SynthaugError, match="made with ensemble 1, not 2"):
        generate_stage(plan, ensemble, config, tmp_path / "single", ds)
    # the ensemble's size is known before its members train: a recipe's store check refuses there already
    for store, other in [("single", config), ("store", _config(tmp_path))]:
        with pytest.raises(SynthaugError, match="made with ensemble"):
            check_store_made(tmp_path / store, ds.classes, plan, other.generator)
    check_store_made(tmp_path / "store", ds.classes, plan, config.generator)  # its own passes
    ensemble.save_pretrained(tmp_path / "saved")  # a saved ensemble as generator.path: its size read from its folder
    saved = _config(tmp_path, f"generator.path={tmp_path / 'saved'}").generator
    check_store_made(tmp_path / "store", ds.classes, plan, saved)
    with pytest.raises(SynthaugError, match="made with ensemble 1, not 2"):
        check_store_made(tmp_path / "single", ds.classes, plan, saved)


def test_an_ensemble_of_one_is_the_generator_and_leaves_names_alone(tmp_path):
    from synthaug.generate.cache import generator_fingerprint
    from synthaug.utils.keys import key_dict

    ds = make_dataset((6, 4, 2))
    plain = _config(tmp_path)
    assert "ensemble" not in key_dict(plain.generator)
    assert key_dict(_config(tmp_path, "generator.ensemble=2").generator)["ensemble"] == 2
    assert generator_fingerprint(ds, plain.generator, 0) == \
        generator_fingerprint(ds, _config(tmp_path, "generator.ensemble=3").generator, 0)
    gen, _ = generator_stage(ds, plain)
    assert isinstance(gen, DiffusionGenerator)


def test_a_saved_ensemble_serves_the_recipes_an_ensemble_serves_and_the_stage_trains_only_embedded_ones(members,
                                                                                                      tmp_path):
    """generator.path at a saved ensemble: refused for a recipe whose images skip select's stage
    (UtilGen moves a single generator's policy), taken by SYNAuG, with feedback too; the stage
    itself refuses an ensemble of a generator the run does not train."""
    from synthaug.runs import preflight

    _, gens = members
    Ensemble(gens[:2]).save_pretrained(tmp_path / "saved")
    path = f"generator.path={tmp_path / 'saved'}"
    with pytest.raises(SynthaugError, match="recipe utilgen takes no generator.ensemble .* point generator.path at a "
                                            "single generator"):
        preflight(_config(tmp_path, path, "recipe=utilgen"))
    preflight(_config(tmp_path, path))
    preflight(_config(tmp_path, path, "generator.feedback=0.03"))
    with pytest.raises(SynthaugError, match="generator.ensemble trains that many embedded generators"):
        generator_stage(make_dataset((6, 4, 2)), _config(tmp_path, path, "generator.ensemble=2"))


def test_saving_refuses_a_link_planted_at_a_member_s_folder(members, tmp_path):
    """A link at `member-0` (pointing elsewhere) is refused, and nothing is written through it."""
    _, gens = members
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "member-0").symlink_to(outside, target_is_directory=True)
    with pytest.raises(SynthaugError, match="is a link, not a file synthaug wrote"):
        Ensemble(gens[:2]).save_pretrained(tmp_path / "saved")
    assert not any(outside.iterdir()) and not (tmp_path / "saved" / "generator.json").exists()
