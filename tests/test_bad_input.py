"""Bad input, thrown at the command line as a new user and a security reviewer would: every
case exits 2 with exactly one line on stderr that names the problem and the fix, no
traceback, and leaves every file and folder as it was (the whole sandbox is compared)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_idx, write_image_folder
from PIL import Image

from synthaug.errors import SynthaugError

FAST = ["-s", "data.dataset=digits", "-s", "split.ratio=5", "-s", "train.epochs=1", "-s", "train.augment=none"]


def snapshot(root: Path) -> dict:
    """Every path under `root` with its kind, size, mtime and (for files) content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns,
                                              None if p.is_dir() else hash(p.read_bytes()))
    return out


# --------------------------------------------------------------------------- inputs the cases use


def folder(root):  # a good image folder, 2 classes
    return write_image_folder(root / "imgs", counts=(6, 6))


def one_class(root):
    return write_image_folder(root / "imgs", counts=(8,))


def corrupt_image(root):
    d = folder(root)
    (d / "cls0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def not_an_image(root):
    d = folder(root)
    (d / "cls0" / "notes.csv").write_text("a,b\n")
    return d


def empty_class(root):
    d = folder(root)
    (d / "cls9").mkdir()
    return d


def no_classes(root):
    d = root / "flat"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.png")
    return d


def mixed_sizes(root):
    d = folder(root)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(d / "cls1" / "big.png")
    return d


def bomb(root):
    """A PNG whose header claims 14000 x 14000 pixels (196 Mpx, over PIL's bomb limit)."""
    d = folder(root)
    Image.new("1", (14000, 14000)).save(d / "cls0" / "bomb.png")
    return d


def a_file(name: str, content: bytes):
    """An input maker: a file `name` holding `content`."""
    def make(root):
        (root / name).write_bytes(content)
        return root / name

    make.__name__ = name
    return make


text_file = a_file("file.txt", b"not a folder\n")
non_utf8_config = a_file("latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
bad_yaml = a_file("bad.yaml", b"train: [epochs: 3\n")
list_yaml = a_file("list.yaml", b"- a\n- b\n")
number_key_yaml = a_file("numbers.yaml", b"train: {3: 1}\n")
nul_output_yaml = a_file("nul.yaml", b'output_dir: "runs\\x00x"\n')  # YAML's escape: a NUL in the path


def a_folder(name: str, files: dict[str, bytes]):
    """An input maker: a folder `name` holding `files` (relative path: content)."""
    def make(root):
        (root / name).mkdir()
        for rel, content in files.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_bytes(content)
        return root / name

    make.__name__ = name
    return make


config_dir = a_folder("conf.d", {})
empty_generator = a_folder("gen", {})
bad_generator_json = a_folder("gen", {"generator.json": b"{not json", "unet/config.json": b"{}",
                                      "unet/diffusion_pytorch_model.safetensors": b"\0" * 16})
bad_classifier = a_folder("clf", {"config.json": b"{oops", "model.safetensors": b"\0" * 16})


def colour_classifier(root):
    """A classifier saved for 3-channel 8 px images (the digits are 1-channel)."""
    from synthaug.classify.models import create_model

    create_model("small-cnn", num_classes=10, in_channels=3, image_size=8).save_pretrained(root / "clf3")
    return root / "clf3"


def plain_generator(channels: int):
    """An input maker: a tiny generator saved for the digits' classes at 8 px, conditioned on the
    class alone (no image embedding, no groups)."""
    def make(root):
        from synthaug.generate import DiffusionGenerator, GeneratorConfig

        config = GeneratorConfig(image_size=8, channels=channels, classes=[str(c) for c in range(10)], preset="tiny")
        DiffusionGenerator(config).save_pretrained(root / "gen")
        return root / "gen"

    make.__name__ = f"plain_generator_{channels}"
    return make


def small_store(root):
    """A store synthaug made of the digits' classes, its images 5 px where the digits are 8."""
    from synthaug.store import SyntheticStore

    plan = [{"id": f"r{i}", "label": i, "seed": i, "group": None, "recipe": "t"} for i in range(10)]
    SyntheticStore(root / "store", [str(c) for c in range(10)]).fill(
        plan, lambda rows: torch.zeros((len(rows), 1, 5, 5), dtype=torch.uint8))
    return root / "store"


def digits_store(root):
    """A store synthaug made of the digits' classes and size."""
    from synthaug.store import SyntheticStore

    plan = [{"id": f"r{i}", "label": i % 10, "seed": i, "group": None, "recipe": "t"} for i in range(40)]
    SyntheticStore(root / "store", [str(c) for c in range(10)]).fill(
        plan, lambda rows: torch.randint(0, 255, (len(rows), 1, 8, 8), dtype=torch.uint8))
    return root / "store"


def truncated_tarball(root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = os.urandom(200_000)
        info = tarfile.TarInfo("cifar10/train/cat/0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    p = root / "cifar10-jpg.tar.gz"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return p


def truncated_idx(root):
    d = root / "fmnist"
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(d / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 28, 28), np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    blob = (d / "train-images-idx3-ubyte.gz").read_bytes()
    (d / "train-images-idx3-ubyte.gz").write_bytes(blob[: len(blob) // 2])
    return d


def store_metadata_a_folder(root):
    """A store synthaug made whose metadata file has become a folder."""
    d = digits_store(root)
    (d / "train" / "metadata.jsonl").unlink()
    (d / "train" / "metadata.jsonl").mkdir()
    return d


def escaping_store(root):
    """A synthetic store (its marker says synthaug made it) whose metadata points outside it."""
    d = root / "store"
    (d / "train" / "cls0").mkdir(parents=True)
    (d / ".synthaug-store").write_text("a synthetic image store made by synthaug\n")
    row = {"id": "x", "file_name": "/etc/hostname", "class": "cls0", "label": 0}
    (d / "train" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    return d


def escaping_store_images(root):
    """The same store given by its image folder (train/): still a store, still checked."""
    return escaping_store(root) / "train"


def suite_file(text):
    def make(root):
        (root / "suite.yaml").write_text(text)
        return root / "suite.yaml"
    make.__name__ = "suite_file"
    return make


HAS_SD = all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers", "peft"))
SUITE = "recipes: {ce: [recipe=ce]}\nsettings: {digits: [data.dataset=digits, train.epochs=1]}\n"

# (case id, input maker or None, command line with IN for the input, what the message says)
CASES = [
    ("config-missing", None, ["train", "missing.yaml"], "does not exist"),
    ("config-is-a-folder", config_dir, ["train", "IN"], "is a folder"),
    ("config-not-utf8", non_utf8_config, ["train", "IN"], "not UTF-8"),
    ("config-bad-yaml", bad_yaml, ["train", "IN"], "not valid YAML"),
    ("config-not-a-mapping", list_yaml, ["train", "IN"], "must hold a mapping"),
    ("override-not-key-value", None, ["train", "-s", "train.epochs"], "is not key=value"),
    ("override-unknown-key", None, ["train", "-s", "train.epoch=2"], "did you mean 'train.epochs'"),
    ("override-wrong-type", None, ["train", "-s", "train.epochs=abc"], "expected int"),
    ("override-bad-choice", None, ["train", "-s", "train.loss=hinge"], "use one of"),
    ("override-value-not-a-section", None, ["train", "-s", "seed.x=1"], "not a section"),
    ("override-section-not-a-mapping", None, ["train", "-s", "train=0"], "config section 'train' must be a mapping"),
    ("config-key-not-a-name", number_key_yaml, ["train", "IN"], "config key 3 under 'train' is not a name"),
    ("option-not-parsed", None, ["train", "--seed", "abc"], "see 'synthaug train --help'"),
    ("command-unknown", None, ["trian"], "No such command 'trian'"),
    ("output-dir-nul", nul_output_yaml, ["train", "IN"], "holds a NUL character"),
    ("baselines-nested", None, ["run", *FAST, "-s", "report.baselines=[ce,[x]]"], "report.baselines must be a list"),
    ("ratio-nan", None, ["train", *FAST, "-s", "split.ratio=.nan"], "finite"),
    ("ratio-inf", None, ["train", *FAST, "-s", "split.ratio=.inf"], "finite"),
    ("ratio-below-1", None, ["train", *FAST, "-s", "split.ratio=0.5"], "ratio must be >= 1"),
    ("lr-nan", None, ["train", *FAST, "-s", "train.lr=.nan"], "finite"),
    ("lr-negative", None, ["train", *FAST, "-s", "train.lr=-1"], "train.lr"),
    ("guidance-nan", None, ["train", *FAST, "-s", "generator.guidance_scale=.nan"], "finite"),
    ("tau-inf", None, ["train", *FAST, "-s", "train.tau=.inf"], "finite"),
    ("batch-size-zero", None, ["train", *FAST, "-s", "train.batch_size=0"], "train.batch_size"),
    ("val-per-class-negative", None, ["train", *FAST, "-s", "split.val_per_class=-1"], "val_per_class"),
    ("image-size-tiny", None, ["train", *FAST, "-s", "data.image_size=2"], "image_size"),
    ("channels-2", None, ["train", *FAST, "-s", "data.channels=2"], "channels"),
    ("few-shot-k-too-big", None, ["train", *FAST, "-s", "split.kind=few-shot", "-s", "split.k=500"], "larger than class"),
    # semi-supervised training needs a pool and a recipe whose classifier takes it
    ("ssl-without-pool", None, ["train", *FAST, "-s", "train.ssl=fixmatch"], "split.kind=few-shot"),
    ("fixmatch-on-long-tail", None, ["train", *FAST, "-s", "recipe=fixmatch"], "this split has none"),
    ("ssl-recipe-supervised-only", None, ["train", *FAST, "-s", "split.kind=few-shot", "-s", "split.k=3", "-s",
                                          "train.ssl=fixmatch", "-s", "recipe=ldmlr"], "supervised only"),
    ("ssl-threshold-above-1", None, ["train", *FAST, "-s", "train.ssl_threshold=1.5"], "ssl_threshold"),
    ("ssl-with-sam", None, ["train", *FAST, "-s", "train.ssl=fixmatch", "-s", "train.sam_rho=0.05"], "SAM"),
    ("ssl-strong-unknown-augmentation", None, ["train", *FAST, "-s", "train.ssl_strong=crop+warp"], "unknown augmentation"),
    ("dpt-without-pool", None, ["train", *FAST, "-s", "recipe=dpt"], "this split has none"),
    ("curve-every-negative", None, ["train", *FAST, "-s", "eval.curve_every=-5"], "curve_every"),
    ("name-dotdot", None, ["train", *FAST, "-s", "name=.."], "one plain folder name"),
    ("name-absolute", a_folder("victim", {"keep.txt": b"mine"}), ["train", *FAST, "-s", "name=IN", "--force"],
     "one plain folder name"),
    ("name-nested", None, ["train", *FAST, "-s", "name=a/b"], "one plain folder name"),
    ("name-dot", None, ["train", *FAST, "-s", "name=."], "one plain folder name"),
    ("output-dir-is-a-file", text_file, ["train", *FAST, "-s", "output_dir=IN"], "is a file"),
    ("output-dir-under-a-file", text_file, ["train", *FAST, "-s", "output_dir=IN/runs"], "is a file"),
    ("output-dir-unwritable", None, ["train", *FAST, "-s", "output_dir=/proc/synthaug-runs"], "cannot write"),
    ("output-dir-unwritable-before-the-data-cache", folder,
     ["train", "-s", "data.dataset=IN", "-s", "train.epochs=1", "-s", "output_dir=/proc/synthaug-runs"], "cannot write"),
    ("validate-out-unwritable", digits_store, ["validate", "IN", *FAST, "--out", "/proc/synthaug-validation"],
     "cannot write to --out"),
    ("cache-dir-is-a-file", text_file, ["train", *FAST, "-s", "data.cache_dir=IN"], "is a file"),
    ("generator-cache-is-a-file", text_file,
     ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.cache_dir=IN"], "is a file"),
    ("store-dir-is-a-file", text_file, ["run", *FAST, "-s", "recipe=synaug", "-s", "synaug.store_dir=IN"], "is a file"),
    ("dpt-store-dir-not-ours", a_folder("mine", {"keep.txt": b"mine"}),
     ["run", *FAST, "-s", "recipe=dpt", "-s", "dpt.store_dir=IN"], "holds 'keep.txt', which is not a synthaug store"),
    pytest.param("device-cuda-without-gpu", None, ["train", *FAST, "-s", "train.device=cuda"], "no CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("device-typo", None, ["train", *FAST, "-s", "train.device=cpux"], "train.device"),
    ("unknown-dataset", None, ["train", "-s", "data.dataset=nope"], "unknown dataset 'nope'"),
    ("missing-folder", None, ["train", "-s", "data.dataset=./no/such/folder"], "does not exist"),
    ("seeds-missing-folder", None, ["run", "--seeds", "0,1", "-s", "data.dataset=./no/such/folder"], "does not exist"),
    ("seeds-recipe-check", None, ["run", "--seeds", "0,1", *FAST, "-s", "recipe=synaug", "-s", "synaug.target_per_class=3"],
     "below the largest class"),
    ("corrupt-image", corrupt_image, ["train", "-s", "data.dataset=IN"], "cannot read image"),
    ("not-an-image", not_an_image, ["train", "-s", "data.dataset=IN"], "is not an image"),
    ("empty-class-folder", empty_class, ["train", "-s", "data.dataset=IN"], "holds no images"),
    ("no-class-folders", no_classes, ["train", "-s", "data.dataset=IN"], "no class subfolders"),
    ("mixed-sizes", mixed_sizes, ["train", "-s", "data.dataset=IN", "-s", "split.kind=none"], "differ in size"),
    ("decompression-bomb", bomb, ["train", "-s", "data.dataset=IN"], "too large"),
    ("single-class", one_class, ["train", "-s", "data.dataset=IN", "-s", "split.kind=none"], "two classes"),
    ("unknown-recipe", None, ["train", *FAST, "-s", "recipe=magic"], "unknown recipe 'magic'"),
    ("unknown-selector", None, ["run", *FAST, "-s", "select.method=best"], "unknown selection method 'best'"),
    ("boundary-push-too-far", None, ["run", *FAST, "-s", "select.boundary=1"], "select.boundary must be in [0, 1)"),
    ("push-without-selection", None, ["run", *FAST, "-s", "recipe=ldmlr", "-s", "select.boundary=0.5"],
     "recipe ldmlr does not select its images, so select.boundary would do nothing"),
    ("feedback-negative", None, ["run", *FAST, "-s", "generator.feedback=-0.1"],
     "generator.feedback must be a finite number >= 0"),
    ("feedback-every", None, ["run", *FAST, "-s", "generator.feedback=0.1", "-s", "generator.feedback_every=0"],
     "generator.feedback_every >= 1"),
    ("feedback-criterion", None, ["run", *FAST, "-s", "generator.feedback_criterion=margin"],
     "'generator.feedback_criterion' is 'margin': use one of entropy, loss"),
    ("feedback-without-stage", None, ["run", *FAST, "-s", "recipe=ldmlr", "-s", "generator.feedback=0.1"],
     "recipe ldmlr takes no generator.feedback (the recipes whose images pass select's stage do)"),
    ("feedback-classical", None, ["train", *FAST, "-s", "generator.feedback=0.1"],
     "takes no generator.feedback"),
    ("feedback-stable-diffusion", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.kind=stable-diffusion", "-s", "generator.feedback=0.1"],
     "generator.feedback guides the embedded generator's sampling, not the stable-diffusion generator's"),
    ("guidance-interval-reversed", None, ["run", *FAST, "-s", "generator.guidance_interval=[5.42,0.28]"],
     "generator.guidance_interval is two noise levels [low, high] with 0 <= low < high"),
    ("guidance-interval-one-number", None, ["run", *FAST, "-s", "generator.guidance_interval=[1]"],
     "generator.guidance_interval is two noise levels [low, high]"),
    ("guidance-interval-stable-diffusion", None, ["run", *FAST, "-s", "recipe=synaug", "-s",
                                                  "generator.kind=stable-diffusion", "-s", "generator.guidance_interval=[0.28,5.42]"],
     "generator.guidance_interval limits the embedded generator's guidance, not the stable-diffusion generator's"),
    ("ensemble-size", None, ["run", *FAST, "-s", "generator.ensemble=0"],
     "generator.ensemble is the number of generators, >= 1"),
    ("ensemble-without-stage", None, ["run", *FAST, "-s", "recipe=utilgen", "-s", "generator.ensemble=2"],
     "recipe utilgen takes no generator.ensemble (the recipes whose images pass select's stage do)"),
    ("ensemble-stable-diffusion", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.kind=stable-diffusion",
                                         "-s", "generator.ensemble=2"],
     "generator.ensemble trains that many embedded generators at successive seeds, and this run uses the "
     "stable-diffusion generator"),
    ("translate-share", None, ["run", *FAST, "-s", "synaug.translate=2"], "synaug.translate must be in [0, 1]"),
    ("translate-strength", None, ["run", *FAST, "-s", "synaug.translate=1", "-s", "synaug.translate_strength=0"],
     "synaug.translate_strength must be in (0, 1]"),
    ("translate-from", None, ["run", *FAST, "-s", "synaug.translate_from=same"],
     "synaug.translate_from must be one of other, own"),
    ("translate-source-leads", None, ["run", *FAST, "-s", "synaug.translate_strength=0.3"],
     "synaug.translate_strength 0.3 gives its class 0.38 of the target"),
    ("translate-gamma", None, ["run", *FAST, "-s", "synaug.translate_gamma=-1"], "synaug.translate_gamma must be"),
    ("translate-without-generation", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "synaug.translate=1", "-s",
                                            "synaug.replay=true"],
     "synaug.translate translates generated images and this run generates none"),
    ("selector-without-selection", None, ["train", *FAST, "-s", "select.method=prototype"],
     "does not select its images, so select.method would do nothing"),
    ("validate-auto", None, ["run", *FAST, "-s", "recipe=auto", "-s", "validate.enabled=true"],
     "recipe auto picks a classical recipe"),
    ("validate-without-images", None, ["train", *FAST, "-s", "validate.enabled=true"],
     "recipe ce makes no synthetic images, so validate.enabled would do nothing"),
    ("validate-features-not-images", None, ["run", *FAST, "-s", "recipe=ldmlr", "-s", "validate.enabled=true"],
     "ldmlr generates features, not images, so validate.enabled would do nothing"),
    ("validate-real-replay", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "synaug.replay_share=1", "-s",
                                    "validate.enabled=true"], "synaug.replay_share=1 generates no image"),
    ("unknown-executor", None, ["run", *FAST, "-s", "executor.name=slurm"], "unknown executor 'slurm'"),
    ("unknown-sampler", None, ["train", *FAST, "-s", "generator.sampler=euler"], "use one of sde-dpm-solver++"),
    ("utilgen-on-ray", None, ["run", *FAST, "-s", "recipe=utilgen", "-s", "split.val_per_class=3", "-s",
                              "executor.name=ray"], "leave executor.name=local"),
    ("unknown-baseline", None, ["run", *FAST, "-s", "report.baselines=[ce,magic]"], "unknown recipe 'magic'"),
    ("fill-out-of-range", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "synaug.fill=0"], "synaug.fill must be in (0, 1]"),
    ("target-below-largest", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "synaug.target_per_class=3"],
     "below the largest class"),
    pytest.param("pretrained-folder-not-a-pipeline", a_folder("sd", {"notes.txt": b"mine"}),
                 ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.pretrained=IN"], "not a diffusers pipeline folder",
                 marks=pytest.mark.skipif(not HAS_SD, reason="needs the sd extra")),
    pytest.param("encoder-folder-not-a-model", a_folder("enc", {"notes.txt": b"mine"}),
                 ["run", *FAST, "-s", "recipe=synaug", "-s", "select.method=prototype", "-s", "select.features=hf:IN"],
                 "that folder has no config.json", marks=pytest.mark.skipif(not HAS_SD, reason="needs transformers")),
    ("generator-path-not-image-conditioned", plain_generator(1),
     ["run", *FAST, "-s", "recipe=augcond", "-s", "generator.path=IN"], "is not image-conditioned"),
    ("generator-path-without-groups", plain_generator(3),
     ["run", *FAST, "-s", "recipe=synaug", "-s", "split.kind=colored", "-s", "generator.path=IN"],
     "is not conditioned on groups"),
    ("generator-path-missing", None, ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.path=./nope"], "has no"),
    ("generator-folder-empty", empty_generator, ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.path=IN"],
     "has no generator.json"),
    ("generator-json-corrupt", bad_generator_json, ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.path=IN"],
     "generator.json"),
    ("classifier-config-corrupt", bad_classifier, ["validate", "IN/..", "-s", "data.dataset=digits",
                                                   "--classifier", "IN"], "config.json"),
    ("validate-missing-folder", None, ["validate", "./nope", *FAST], "is not a folder"),
    ("validate-store-other-size", small_store, ["validate", "IN", *FAST], "holds 1x5x5 images and the config's data is 1x8x8"),
    ("validate-classifier-other-channels", colour_classifier, ["validate", "IN/..", *FAST, "--classifier", "IN"],
     "reads 3-channel images and these have 1"),
    ("features-classifier-other-channels", colour_classifier, ["run", *FAST, "-s", "recipe=synaug", "-s",
                                                               "select.method=prototype", "-s", "select.features=IN"],
     "reads 3-channel images"),
    ("validate-store-escapes", escaping_store, ["validate", "IN", *FAST], "outside"),
    ("validate-store-metadata-a-folder", store_metadata_a_folder, ["validate", "IN", *FAST],
     "cannot read the store's metadata"),
    ("validate-store-images-escape", escaping_store_images, ["validate", "IN", *FAST], "outside"),
    ("cifar-tarball-truncated", truncated_tarball, ["datasets", "cifar10"], "truncated"),
    ("fashion-gz-truncated", truncated_idx, ["datasets", "fashion-mnist"], "truncated"),
    ("datasets-unknown", None, ["datasets", "nope"], "unknown dataset 'nope'"),
    ("seed-negative", None, ["train", *FAST, "--seed", "-1"], "seed"),
    ("bench-unknown-suite", None, ["bench", "nosuch"], "no suite 'nosuch'"),
    ("bench-suite-missing", None, ["bench", "nosuch.yaml"], "does not exist"),
    ("bench-suite-bad-yaml", suite_file("settings: [a\n"), ["bench", "IN"], "not valid YAML"),
    ("bench-suite-a-folder", config_dir, ["bench", "IN"], "is a folder, not a file"),
    ("bench-generator-seeds-as-override", suite_file(SUITE.replace("[recipe=ce]", "[recipe=ce, generator_seeds=a]")),
     ["bench", "IN"], "generator_seeds is not an override"),
    ("bench-generator-path-missing", suite_file("recipes: {ce: [recipe=ce], gen: [recipe=ldmlr, generator.path=./nope]}\n"
                                                "settings: {digits: [data.dataset=digits, train.epochs=1]}\n"),
     ["bench", "IN"], "has no"),
    ("bench-suite-unknown-key", suite_file(SUITE + "seeds: [0]\n"), ["bench", "IN"], "unknown key 'seeds'"),
    ("bench-suite-unknown-label", suite_file("recipes: {ce: [recipe=ce]}\nsettings: {digits: {overrides: "
                                             "[data.dataset=digits], recipes: [cee]}}\n"), ["bench", "IN"],
     "no recipe labelled 'cee'"),
    ("bench-suite-unknown-metric", suite_file(SUITE + "metric: balanced_acc\n"), ["bench", "IN"],
     "'balanced_acc' is not a metric synthaug measures"),
    ("bench-suite-append-unknown-key", suite_file("recipes: {ce: [recipe=ce, train.augmnet+=flip]}\n"
                                                  "settings: {digits: [data.dataset=digits, train.epochs=1]}\n"),
     ["bench", "IN"], "recipe 'ce': 'train.augmnet+=flip': no config key 'train.augmnet' to append to"),
    ("bench-worst-group-without-groups", suite_file(SUITE + "metric: worst_group_accuracy\n"), ["bench", "IN"],
     "its split has no groups"),
    ("bench-suite-bad-seeds", suite_file(SUITE + "classifier_seeds: [0, 0]\n"), ["bench", "IN"], "different whole numbers"),
    ("bench-suite-bad-override", suite_file(SUITE.replace("train.epochs=1", "train.epochs=abc")), ["bench", "IN"],
     "expected int"),
    ("bench-suite-unknown-recipe", suite_file(SUITE.replace("recipe=ce", "recipe=magic")), ["bench", "IN"],
     "unknown recipe 'magic'"),
    ("bench-suite-unknown-dataset", suite_file(SUITE.replace("data.dataset=digits", "data.dataset=nope")),
     ["bench", "IN"], "unknown dataset 'nope'"),
    ("analyse-unknown-dataset", None, ["analyse", "nope"], "unknown dataset 'nope'"),
    ("analyse-json-exists", text_file, ["analyse", "digits", "--json", "IN"], "overwrites nothing"),
    ("analyse-negative-probe", None, ["analyse", "digits", "--probe-steps", "-1"], "--probe-steps"),
    ("bench-unknown-generator-seed", suite_file(SUITE), ["bench", "IN", "--generator-seed", "3"],
     "no generator seed 3: use one of none"),
    ("bench-out-not-ours", a_folder("mine", {"keep.txt": b"mine"}), ["bench", "smoke", "--out", "IN"],
     "synthaug did not make"),
]


def case(c):
    """A CASES entry as a pytest parameter named by its id (marks kept)."""
    values, marks = (c.values, c.marks) if hasattr(c, "values") else (c, ())
    return pytest.param(*values[1:], id=values[0], marks=marks)


@pytest.mark.parametrize("make, args, match", [case(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(make, args, match, tmp_path, capsys, monkeypatch):
    inputs, work = tmp_path / "in", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    given = make(inputs) if make else None
    if given is not None and "tarball" in str(make.__name__):
        monkeypatch.setenv("SYNTHAUG_CIFAR10", str(given))
    if given is not None and make.__name__ == "truncated_idx":
        monkeypatch.setenv("SYNTHAUG_FASHION_MNIST_DIR", str(given))
    args = [a.replace("IN", str(given)) if given is not None else a for a in args]
    if args[0] != "datasets":
        args.append("--quiet")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert match in err, err
    assert snapshot(tmp_path) == before


def test_a_data_cache_that_cannot_be_written_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    """The run folder is made before the data cache is written (a run folder that cannot be made
    leaves no cache) and is removed again when the cache cannot be written."""
    monkeypatch.chdir(tmp_path)
    images = folder(tmp_path)
    before = set(snapshot(tmp_path))
    code, out, err = run_cli(["train", "-s", f"data.dataset={images}", "-s", "train.epochs=1", "-s", "output_dir=runs",
                              "-s", "data.cache_dir=/proc/synthaug-cache", "--quiet"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in out + err and len(err.strip().splitlines()) == 1
    assert "cannot write to data.cache_dir" in err, err
    assert set(snapshot(tmp_path)) == before  # no run folder, no output_dir left behind


def test_force_with_a_data_cache_that_cannot_be_written_leaves_the_old_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = folder(tmp_path)
    base = ["train", "-s", f"data.dataset={images}", "-s", "train.epochs=1", "-s", "output_dir=runs", "-s", "name=x",
            "--quiet"]
    assert run_cli(base, capsys, monkeypatch)[0] == 0
    before = snapshot(tmp_path / "runs")
    code, out, err = run_cli([*base, "-s", "data.cache_dir=/proc/synthaug-cache", "--force"], capsys, monkeypatch)
    assert code == 2 and "cannot write to data.cache_dir" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path / "runs") == before  # --force deletes nothing before the cache is written


@pytest.mark.parametrize("package, args, match", [
    ("ray", ["run", *FAST, "-s", "recipe=synaug", "-s", "executor.name=ray"], "executor 'ray' needs ray"),
    ("accelerate", ["run", *FAST, "-s", "recipe=synaug", "-s", "executor.name=accelerate"],
     "executor 'accelerate' needs accelerate"),
    ("peft", ["run", *FAST, "-s", "recipe=synaug", "-s", "generator.pretrained=org/model"], "Stable Diffusion needs"),
    ("transformers", ["run", *FAST, "-s", "recipe=synaug", "-s", "select.method=prototype", "-s",
                      "select.features=hf:org/model"], "select.features hf:org/model needs transformers"),
])
def test_a_missing_optional_package_is_named_before_anything_is_written(package, args, match, tmp_path, capsys,
                                                                        monkeypatch):
    """An option that needs an extra (an executor, Stable Diffusion, a pretrained encoder) fails at
    once when its package is not installed, not after the generator has trained."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*args, "--quiet"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_out_of_gpu_memory_is_one_line_naming_the_batch_sizes(capsys, monkeypatch):
    import synthaug.runs

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(synthaug.runs, "train_run", oom)
    code, _, err = run_cli(["train", *FAST, "--quiet"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lower train.batch_size" in err and "Traceback" not in err


def test_features_that_nothing_uses_need_no_package(monkeypatch):
    """hf: features name an encoder that only selection (select.method) or validation loads."""
    import importlib.util

    from synthaug.config import load_config
    from synthaug.runs import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    preflight(load_config(None, ["recipe=synaug", "select.features=hf:org/model", "validate.features=hf:org/model"]))
    with pytest.raises(SynthaugError, match="validate.features hf:org/model needs transformers"):
        preflight(load_config(None, ["recipe=synaug", "validate.enabled=true", "validate.features=hf:org/model"]))


def test_there_are_at_least_40_kinds_of_bad_input():
    assert len({case(c).id for c in CASES}) == len(CASES) >= 40


def test_an_empty_section_takes_overrides(tmp_path):
    from synthaug.config import load_config

    (tmp_path / "c.yaml").write_text("train:\nsplit:\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.epochs=5"])
    assert cfg.train.epochs == 5


def test_gz_truncation_reads_as_a_clear_error(tmp_path):
    from synthaug.data.sources import read_idx

    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as f:
        f.write(os.urandom(10_000))
    p.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(SynthaugError, match="truncated"):
        read_idx(p)
