"""Slow integration tests on the real datasets (make test-slow); skipped where a dataset is
not on the machine."""

import pytest

from synthaug.config import load_config
from synthaug.data import load_dataset
from synthaug.data.sources import FASHION_MNIST_DIRS, _find_cifar10_tarball
from synthaug.runs import train_run

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def shared_cache(monkeypatch, tmp_path_factory):
    # keep the decoded CIFAR-10 between tests of one session
    monkeypatch.setenv("SYNTHAUG_CACHE", str(tmp_path_factory.getbasetemp() / "shared-cache"))


def test_baselines_beat_ce_on_fashion_mnist_lt(tmp_path):
    if not any((__import__("pathlib").Path(d) / "train-images-idx3-ubyte.gz").exists() for d in FASHION_MNIST_DIRS):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    common = ["data.dataset=fashion-mnist", "split.ratio=100", "train.epochs=3", f"output_dir={tmp_path}"]
    _, ce = train_run(load_config(None, [*common, "recipe=ce"]), progress=False)
    _, bs = train_run(load_config(None, [*common, "recipe=balanced-softmax"]), progress=False)
    assert bs["test"]["few_shot_accuracy"] > ce["test"]["few_shot_accuracy"]
    assert bs["test"]["balanced_accuracy"] > ce["test"]["balanced_accuracy"]


def test_cifar10_jpeg_loads():
    if _find_cifar10_tarball() is None:
        pytest.skip("cifar10-jpg.tar.gz not found")
    data = load_dataset("cifar10")
    assert data.train.images.shape == (50000, 3, 32, 32) and data.test.images.shape == (10000, 3, 32, 32)
    assert data.train.class_counts().tolist() == [5000] * 10
    assert data.classes[0] == "airplane"


def test_colored_mnist_reports_worst_group(tmp_path):
    cfg = load_config(None, ["split.kind=colored", "train.epochs=3", f"output_dir={tmp_path}"])
    _, metrics = train_run(cfg, progress=False)
    assert metrics["test"]["worst_group_accuracy"] <= metrics["test"]["balanced_accuracy"]
