import pytest
import torch
from conftest import make_dataset

from synthaug.data import (
    UNLABELED,
    balanced_validation,
    class_balanced_subsample,
    colored,
    every_colour,
    few_shot,
    long_tail,
    long_tail_counts,
    shot_thresholds,
)
from synthaug.errors import SynthaugError


def test_exponential_profile_matches_formula():
    counts = long_tail_counts(500, 10, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert counts == [int(500 * 100 ** (-i / 9)) for i in range(10)]
    assert counts == sorted(counts, reverse=True)


def test_step_profile():
    assert long_tail_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    assert long_tail_counts(100, 5, 10, "step", minority_fraction=0.2) == [100] * 4 + [10]


@pytest.mark.parametrize("ratio", [0.5, 0, -3])
def test_ratio_below_one_is_an_error(ratio):
    with pytest.raises(SynthaugError, match="ratio must be >= 1"):
        long_tail_counts(100, 3, ratio)


def test_long_tail_subset_is_seeded_and_sized():
    ds = make_dataset((30, 30, 30))
    a, b, c = long_tail(ds, 10, seed=1), long_tail(ds, 10, seed=1), long_tail(ds, 10, seed=2)
    assert a.class_counts().tolist() == [30, 9, 3]
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert long_tail(ds, 4, profile="step", n_max=20).class_counts().tolist() == [20, 20, 5]
    with pytest.raises(SynthaugError, match="n_max"):
        long_tail(ds, 10, n_max=31)


def test_few_shot_and_pool():
    ds = make_dataset((10, 8, 6))
    labelled, pool = few_shot(ds, 3, seed=0)
    assert labelled.class_counts().tolist() == [3, 3, 3]
    assert len(pool) == 24 - 9 and (pool.labels == UNLABELED).all()
    assert pool.class_counts().sum() == 0
    # no image is in both
    both = torch.cat([labelled.images, pool.images]).flatten(1)
    assert len(torch.unique(both, dim=0)) == len(ds)


def test_few_shot_k_too_large():
    with pytest.raises(SynthaugError, match="k=7 is larger than class 'class2'"):
        few_shot(make_dataset((10, 8, 6)), 7)


def test_colored_agreement_and_groups():
    ds = make_dataset((200, 200, 200))
    train = colored(ds, agreement=0.9, seed=0)
    assert train.channels == 3 and train.group_names[:3] == ["red", "green", "blue"]
    agree = (train.groups == train.labels).float().mean()
    assert 0.85 < agree < 0.95
    test = colored(ds, agreement=None, seed=1)
    assert 0.2 < (test.groups == test.labels).float().mean() < 0.45  # chance is 1/3
    red = train.images[(train.groups == 0)].float()
    assert (red[:, 0].mean() > 3 * red[:, 1].mean())  # red images are red
    with pytest.raises(SynthaugError, match="agreement"):
        colored(ds, agreement=1.5)


def test_every_colour_paints_each_image_in_each_colour():
    """The coloured test without the draw: every (class, colour) cell holds all of the
    class's images, each painted as `colored` paints it."""
    ds = make_dataset((30, 20, 10))
    test = every_colour(ds)
    assert len(test) == 3 * len(ds) and test.channels == 3
    cells = torch.bincount(test.labels * 3 + test.groups, minlength=9).view(3, 3)
    assert cells.tolist() == [[30] * 3, [20] * 3, [10] * 3]
    drawn = colored(ds, agreement=None, seed=1)
    for i in (0, 25, 59):  # the same image in the colour it drew matches the drawn test's pixels
        g = int(drawn.groups[i])
        assert torch.equal(test.images[g * len(ds) + i], drawn.images[i])
        assert int(test.labels[g * len(ds) + i]) == int(ds.labels[i])


def test_make_task_tests_a_coloured_split_in_every_colour_by_default():
    from synthaug.config import load_config
    from synthaug.data import LoadedDataset
    from synthaug.task import make_task

    data = LoadedDataset("toy", make_dataset((40, 40, 40)), make_dataset((10, 10, 10)))
    every = make_task(data, load_config(None, ["split.kind=colored"]).split)
    drawn = make_task(data, load_config(None, ["split.kind=colored", "split.test_colours=drawn"]).split)
    assert len(every.test) == 90 and len(drawn.test) == 30
    assert torch.equal(every.train.images, drawn.train.images)  # the test only
    with pytest.raises(SynthaugError, match="test_colours"):
        load_config(None, ["split.test_colours=some"])


def test_balanced_validation():
    ds = make_dataset((20, 10, 5))
    rest, val = balanced_validation(ds, 2, seed=0)
    assert val.class_counts().tolist() == [2, 2, 2]
    assert rest.class_counts().tolist() == [18, 8, 3]
    with pytest.raises(SynthaugError, match="val_per_class"):
        balanced_validation(ds, 5)


def test_class_balanced_subsample():
    ds = make_dataset((20, 10, 5))
    assert class_balanced_subsample(ds).class_counts().tolist() == [5, 5, 5]
    assert class_balanced_subsample(ds, 3).class_counts().tolist() == [3, 3, 3]
    coloured = colored(make_dataset((40, 40)), agreement=0.8, seed=0)
    cells = torch.bincount(coloured.labels * 2 + coloured.groups, minlength=4)
    cut = class_balanced_subsample(coloured, by_group=True)
    assert torch.bincount(cut.labels * 2 + cut.groups, minlength=4).tolist() == [int(cells.min())] * 4
    assert (cut.labels == cut.groups).float().mean() == 0.5  # the colour no longer predicts the class


def test_shot_thresholds_scale_with_head():
    assert shot_thresholds(500) == (100.0, 20.0)  # the CIFAR-100-LT convention
    assert shot_thresholds(6000) == (1200.0, 240.0)
    assert shot_thresholds(400, many=50, few=10) == (50.0, 10.0)
