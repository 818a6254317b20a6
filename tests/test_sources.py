import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx, write_image_folder

from synthaug.data import SOURCES, load_dataset
from synthaug.errors import SynthaugError


def test_digits_real_data():
    data = load_dataset("digits")
    assert data.train.images.shape[1:] == (1, 8, 8) and data.train.images.dtype == torch.uint8
    assert len(data.train) + len(data.test) == 1797
    assert data.classes == [str(i) for i in range(10)]
    assert int(data.train.images.max()) == 255
    # the held-out split is deterministic
    assert torch.equal(load_dataset("digits").test.labels, data.test.labels)


def test_mnist_5k_real_data():
    data = load_dataset("mnist-5k")
    assert data.train.images.shape == (4000, 1, 28, 28) and len(data.test) == 1000
    assert data.train.class_counts().tolist() == [400] * 10


def _fake_fashion(root, compress=True, names=("train", "t10k")):
    rng = np.random.default_rng(0)
    for prefix, n in zip(names, (30, 10)):
        suffix = ".gz" if compress else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 255, (n, 28, 28)), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)


def test_fashion_mnist_idx_files(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("SYNTHAUG_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    monkeypatch.setattr("synthaug.data.sources.FASHION_MNIST_DIRS", ())
    data = load_dataset("fashion-mnist")
    assert data.train.images.shape == (30, 1, 28, 28) and len(data.test) == 10
    assert data.classes[0] == "T-shirt/top" and data.train.labels[:3].tolist() == [0, 1, 2]


def test_fashion_mnist_torchvision_fallback(tmp_path, monkeypatch):
    """Without the Debian files, torchvision's FashionMNIST is used (its download is skipped
    when the raw files are already in the cache)."""
    monkeypatch.setattr("synthaug.data.sources.FASHION_MNIST_DIRS", ())
    _fake_fashion(tmp_path / "cache" / "torchvision" / "FashionMNIST" / "raw", compress=False)
    data = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    assert data.train.images.shape == (30, 1, 28, 28)


def test_fashion_mnist_missing_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("synthaug.data.sources.FASHION_MNIST_DIRS", ())

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr("torchvision.datasets.FashionMNIST.download", no_network)
    with pytest.raises(SynthaugError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", cache_dir=tmp_path / "c")


def test_corrupt_idx(tmp_path, monkeypatch):
    _fake_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").write_bytes(b"garbage")
    monkeypatch.setenv("SYNTHAUG_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    with pytest.raises(SynthaugError, match="IDX"):
        load_dataset("fashion-mnist")


def test_cifar10_from_jpeg_tarball(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for part, n in (("train", 3), ("test", 2)):
        for c in ("airplane", "cat"):
            write_image_folder(src / part, counts=(n,), size=(32, 32), fmt="jpg")
            (src / part / "cls0").rename(src / part / c)
    tarball = tmp_path / "cifar10-jpg.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for p in ("train", "test"):
            tar.add(src / p, arcname=p)
    monkeypatch.setenv("SYNTHAUG_CIFAR10", str(tarball))
    cache = tmp_path / "cache"  # conftest's SYNTHAUG_CACHE
    data = load_dataset("cifar10")
    assert data.classes == ["airplane", "cat"]
    assert data.train.images.shape == (6, 3, 32, 32) and len(data.test) == 4
    again = load_dataset("cifar10")  # second load comes from the decoded cache
    assert torch.equal(again.train.images, data.train.images)
    assert [p.name for p in (cache / "folders").iterdir()][0].startswith("archive-")  # read, not extracted
    assert sorted(p.name for p in cache.iterdir()) == ["folders"]


def _tar(folder, archive, mode="w:gz", extra=()):
    with tarfile.open(archive, mode) as tar:
        for p in sorted(folder.iterdir(), reverse=True):  # an order unlike the folder's listing
            tar.add(p, arcname=p.name)
        for name, path in extra:
            tar.add(path, arcname=name)
    return archive


@pytest.mark.parametrize("layout", ["train and test", "classes only", "inside its own folder"])
def test_an_archive_is_read_as_its_extracted_folder_without_extracting_it(tmp_path, layout):
    import os

    src = tmp_path / "src"
    if layout == "classes only":
        write_image_folder(src, counts=(5, 6), size=(12, 12), mode="L")
        cls0 = src / "cls0"
    else:
        write_image_folder(src / "train", counts=(3, 2, 4), size=(12, 12))
        write_image_folder(src / "test", counts=(2, 2, 1), size=(12, 12))
        write_image_folder(src / "train" / "cls1" / "more", counts=(2,), size=(12, 12))  # nested, as rglob reads it
        cls0 = src / "train" / "cls0"
    os.link(cls0 / "0.png", cls0 / "9-hard.png")  # a hard link (the second copy a tar stores as a link) and a
    (cls0 / "8-soft.png").symlink_to("1.png")  # symbolic one: read through, as from the extracted folder
    (tmp_path / "escaped.png").write_bytes((cls0 / "0.png").read_bytes())
    if layout == "inside its own folder":  # tar czf data.tar.gz src/
        archive = tmp_path / "data.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(src, arcname="src")
    else:
        archive = _tar(src, tmp_path / "data.tar.gz", extra=[("../escaped.png", tmp_path / "escaped.png")])
    with tarfile.open(archive) as tar:
        kinds = {m.name.rsplit("/", 1)[-1]: m.type for m in tar}
    assert kinds["9-hard.png"] == tarfile.LNKTYPE and kinds["8-soft.png"] == tarfile.SYMTYPE
    folder = load_dataset(str(src), cache_dir=tmp_path / "folder-cache")
    cache = tmp_path / "cache"
    read = load_dataset(str(archive), cache_dir=cache, defer_cache=True)
    assert not cache.exists()  # nothing written before the run's checks pass
    assert read.classes == folder.classes
    for a, b in ((read.train, folder.train), (read.test, folder.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    read.save_cache()
    assert [p.name.startswith("archive-") for p in (cache / "folders").iterdir()] == [True]
    again = load_dataset(str(archive), cache_dir=cache)  # from the decoded cache, the same split
    assert torch.equal(again.train.images, folder.train.images) and torch.equal(again.test.labels, folder.test.labels)


def test_a_damaged_archive_or_one_without_classes_is_one_clear_error(tmp_path):
    write_image_folder(tmp_path / "src" / "train", counts=(2, 2))
    archive = _tar(tmp_path / "src", tmp_path / "data.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(SynthaugError, match="cannot read .*cut.tar.gz.*truncated or corrupt"):
        load_dataset(str(cut), cache_dir=tmp_path / "cache")
    (tmp_path / "src" / "train" / "cls1" / "notes.txt").write_text("x")
    with pytest.raises(SynthaugError, match="notes.txt' in .* is not an image"):
        load_dataset(str(_tar(tmp_path / "src", tmp_path / "text.tar")), cache_dir=tmp_path / "cache")
    (tmp_path / "src" / "train" / "cls1" / "notes.txt").unlink()
    (tmp_path / "src" / "train" / "cls2").mkdir()
    with pytest.raises(SynthaugError, match="class folder 'train/cls2' in .* holds no images"):
        load_dataset(str(_tar(tmp_path / "src", tmp_path / "empty.tar")), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_cifar10_downloads_its_binary_version_and_reads_it_without_pickle(monkeypatch, tmp_path):
    import hashlib
    import io
    import pickle

    rng = np.random.default_rng(0)
    labels = {f"data_batch_{i}.bin": rng.integers(0, 2, 3) for i in range(1, 6)} | {"test_batch.bin": np.array([1, 0])}
    pixels = {n: rng.integers(0, 256, (len(v), 3072)) for n, v in labels.items()}
    fake = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        files = {n: np.column_stack([labels[n], pixels[n]]).astype(np.uint8).tobytes() for n in labels}
        for name, data in {**files, "batches.meta.txt": b"airplane\nautomobile\n\n"}.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    md5 = hashlib.md5(fake.read_bytes()).hexdigest()
    downloads = []

    def download_url(url, root, md5=None):
        downloads.append(url)
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / url.rsplit("/", 1)[1]).write_bytes(fake.read_bytes())

    monkeypatch.setattr("synthaug.data.sources.CIFAR10_BINARY", ("https://example.org/cifar-10-binary.tar.gz", md5))
    monkeypatch.setattr("torchvision.datasets.utils.download_url", download_url)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle"))
    data = load_dataset("cifar10")
    assert data.classes == ["airplane", "automobile"] and data.train.images.shape == (15, 3, 32, 32)
    train = np.concatenate([pixels[f"data_batch_{i}.bin"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(data.train.images.numpy(), train)
    assert data.train.labels.tolist() == np.concatenate([labels[f"data_batch_{i}.bin"] for i in range(1, 6)]).tolist()
    assert data.test.labels.tolist() == [1, 0]
    load_dataset("cifar10")
    assert len(downloads) == 1  # kept in the cache, checked against its MD5


def test_image_folder_flat_rgb(tmp_path):
    root = write_image_folder(tmp_path / "f", counts=(10, 5))
    data = load_dataset(root)
    assert data.classes == ["cls0", "cls1"]
    assert data.train.channels == 3 and data.train.image_size == (10, 10)
    assert len(data.train) + len(data.test) == 15
    assert data.train.info["test_split"].startswith("stratified")


def test_a_folder_is_decoded_once_and_again_when_it_changes(tmp_path, monkeypatch):
    """The decoded-tensor cache: a second load reads it (no image is opened), a changed file
    or a broken cache file decodes afresh, and nothing is written outside the cache folder."""
    from PIL import Image

    from synthaug.data import sources

    root = write_image_folder(tmp_path / "f", counts=(6, 5))
    first = load_dataset(root, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "folders").glob("*.safetensors"))
    assert len(cached) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "f"]
    opened = []
    read = sources._read_image
    monkeypatch.setattr(sources, "_read_image", lambda path: opened.append(path) or read(path))
    again = load_dataset(root, cache_dir=tmp_path / "cache")
    assert opened == [] and torch.equal(again.train.images, first.train.images)

    Image.new("RGB", (10, 10), (1, 2, 3)).save(root / "cls0" / "0.png")  # changed in place
    fresh = load_dataset(root, cache_dir=tmp_path / "cache")
    assert len(opened) == 11 and len(list((tmp_path / "cache" / "folders").glob("*.safetensors"))) == 2
    everything = torch.cat([fresh.train.images, fresh.test.images])
    assert (everything == torch.tensor([1, 2, 3], dtype=torch.uint8)[:, None, None]).all(dim=(1, 2, 3)).any()

    opened.clear()
    for file in (tmp_path / "cache" / "folders").glob("*.safetensors"):
        file.write_bytes(b"cut short")
    load_dataset(root, cache_dir=tmp_path / "cache")
    assert len(opened) == 11


def test_a_run_writes_the_decoded_cache_only_once_its_checks_pass(tmp_path):
    """load_dataset(defer_cache=True) holds the write until save_cache()."""
    root = write_image_folder(tmp_path / "f", counts=(4, 3))
    data = load_dataset(root, cache_dir=tmp_path / "cache", defer_cache=True)
    assert not (tmp_path / "cache").exists() and len(data.pending) == 1
    data.save_cache()
    assert len(list((tmp_path / "cache" / "folders").glob("*.safetensors"))) == 1 and not data.pending


def test_image_folder_train_test_gray_resize_and_channels(tmp_path):
    write_image_folder(tmp_path / "f" / "train", counts=(3, 3), mode="L", size=(12, 9))
    write_image_folder(tmp_path / "f" / "test", counts=(2, 2), mode="L", size=(12, 9))
    data = load_dataset(tmp_path / "f", image_size=8, channels=3)
    assert data.train.images.shape == (6, 3, 8, 8) and data.test.images.shape == (4, 3, 8, 8)
    gray = load_dataset(tmp_path / "f")
    assert gray.train.images.shape == (6, 1, 9, 12)


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    write_image_folder(tmp_path / "f", counts=(2, 2), size=(10, 10))
    write_image_folder(tmp_path / "g", counts=(2,), size=(16, 12))
    (tmp_path / "g" / "cls0" / "0.png").rename(tmp_path / "f" / "cls0" / "big.png")
    with pytest.raises(SynthaugError, match="image_size"):
        load_dataset(tmp_path / "f")
    assert load_dataset(tmp_path / "f", image_size=8).train.image_size == (8, 8)


def test_hf_imagefolder(tmp_path):
    pytest.importorskip("datasets")
    write_image_folder(tmp_path / "hf" / "train", counts=(3, 2), mode="L")
    write_image_folder(tmp_path / "hf" / "test", counts=(2, 2), mode="L")
    data = load_dataset(f"hf:{tmp_path / 'hf'}")
    assert data.classes == ["cls0", "cls1"]
    assert data.train.images.shape == (5, 1, 10, 10) and len(data.test) == 4


def test_every_registered_source_has_a_description():
    assert set(SOURCES) >= {"digits", "mnist-5k", "fashion-mnist", "cifar10"}
    assert all(s.description for s in SOURCES.values())


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class subfolders"),
        (lambda root: (write_image_folder(root), (root / "empty").mkdir()), "holds no images"),
        (lambda root: (write_image_folder(root), (root / "cls0" / "bad.png").write_bytes(b"not a png")), "cannot read image"),
        (lambda root: (write_image_folder(root), (root / "cls1" / "notes.txt").write_text("x")), "is not an image"),
    ],
    ids=["missing", "empty", "empty-class", "corrupt", "non-image"],
)
def test_bad_folders(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(SynthaugError, match=match):
        load_dataset(str(root) + "/")


def test_unknown_name():
    with pytest.raises(SynthaugError, match="unknown dataset 'nope'"):
        load_dataset("nope")


def test_a_class_folder_may_carry_the_name_a_store_gives_it(tmp_path):
    """'T-shirt/top' cannot be a folder name: the store writes 'T-shirt_top', and validating the
    store's class folders reads them back as their classes; two folders of one class are refused."""
    from PIL import Image

    from synthaug.data.dataset import ImageDataset
    from synthaug.data.sources import read_class_folder

    like = ImageDataset(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2]),
                        ["T-shirt/top", "Ankle boot", "Bag"])
    for folder, n in (("T-shirt_top", 2), ("Ankle_boot", 3), ("Bag", 1)):
        (tmp_path / "gen" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8), 10 * i, dtype=np.uint8)).save(tmp_path / "gen" / folder / f"{i}.png")
    read = read_class_folder(tmp_path / "gen", like)
    assert read.classes == like.classes and read.labels.bincount().tolist() == [2, 3, 1]
    (tmp_path / "gen" / "Ankle boot").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "gen" / "Ankle boot" / "0.png")
    with pytest.raises(SynthaugError, match="class 'Ankle boot' has two folders"):
        read_class_folder(tmp_path / "gen", like)
    # a store's name that two classes share names neither
    (tmp_path / "gen" / "Ankle boot").rename(tmp_path / "other")
    twins = ImageDataset(like.images, like.labels, ["T-shirt/top", "Ankle boot", "Ankle/boot"])
    with pytest.raises(SynthaugError, match="may hold any of the classes Ankle boot, Ankle/boot"):
        read_class_folder(tmp_path / "gen", twins)


def test_a_hugging_face_image_folder_is_not_taken_for_a_store(tmp_path):
    """`synthaug validate ds/train` reads a user's imagefolder as class folders; only a folder
    synthaug made (its marker) is read as a store."""
    import json

    from synthaug.store import MARKER, is_store

    (tmp_path / "ds" / "train" / "Bag").mkdir(parents=True)
    row = {"file_name": "Bag/0.png", "label": 2}
    (tmp_path / "ds" / "train" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    assert not is_store(tmp_path / "ds")
    (tmp_path / "ds" / MARKER).write_text("made by synthaug\n")
    assert is_store(tmp_path / "ds")
