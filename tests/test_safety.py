"""synthaug deletes only what it made and writes only under its own folders, whatever names,
ids or metadata it is given; and the defects found by reading the code stay fixed. The
sandbox tests would delete or write a file outside the sandbox if the guard were removed."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import die_after_saving_step, make_dataset, run_cli, write_image_folder
from PIL import Image

from synthaug.errors import SynthaugError
from synthaug.store import SyntheticStore

FAST = ["-s", "data.dataset=digits", "-s", "split.ratio=5", "-s", "train.epochs=1", "-s", "train.augment=none",
        "--quiet"]


# --------------------------------------------------------------------------- 1. --force


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with a user's file beside the runs folder, and a victim folder elsewhere."""
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "precious.txt").write_text("the user's\n")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.tex").write_text("years of work\n")
    monkeypatch.chdir(work)
    return tmp_path


def intact(sandbox):
    return (sandbox / "work" / "precious.txt").exists() and (sandbox / "victim" / "thesis.tex").exists()


@pytest.mark.parametrize("guard", ["all", "without the name rule"])
@pytest.mark.parametrize("name", ["..", "{victim}", "../../victim", "victim"])
def test_force_never_deletes_what_synthaug_did_not_make(name, guard, sandbox, capsys, monkeypatch):
    """`-s name=..` once emptied the working folder; `name=/x` deleted /x. With the name rule
    removed, the marker rule alone still protects (`victim` under runs/ is not a run)."""
    import synthaug.config

    if guard != "all":
        monkeypatch.setattr(synthaug.config, "check_name", lambda value, what: value)
        import synthaug.runs

        monkeypatch.setattr(synthaug.runs, "check_name", lambda value, what: value)
    if name == "victim":  # a user's folder inside output_dir, not made by synthaug
        (sandbox / "work" / "runs" / "victim").mkdir()
        (sandbox / "work" / "runs" / "victim" / "notes.txt").write_text("mine\n")
    name = name.format(victim=sandbox / "victim")
    code, _, err = run_cli(["train", *FAST, "-s", "output_dir=runs", "-s", f"name={name}", "--force"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert intact(sandbox)
    if name == "victim":
        assert (sandbox / "work" / "runs" / "victim" / "notes.txt").exists()


def test_force_replaces_a_run_synthaug_made(sandbox, capsys, monkeypatch):
    args = ["train", *FAST, "-s", "output_dir=runs", "-s", "name=mine"]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    run = sandbox / "work" / "runs" / "mine"
    assert (run / ".synthaug-run").is_file()
    (run / "stale.txt").write_text("left over\n")
    assert run_cli([*args, "-s", "train.lr=0.01", "--force"], capsys, monkeypatch)[0] == 0
    assert not (run / "stale.txt").exists() and (run / "metrics.json").exists() and intact(sandbox)


def test_a_folder_without_the_marker_is_never_written_into(sandbox, capsys, monkeypatch):
    """A folder whose config.yaml is this run's but that has no marker (a user's folder holding a
    dumped config, or an older synthaug's run) is neither resumed nor deleted: resuming writes
    into it and removes its checkpoint folders."""
    args = ["train", *FAST, "-s", "output_dir=runs", "-s", "name=old"]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    run = sandbox / "work" / "runs" / "old"
    (run / ".synthaug-run").unlink()
    (run / "checkpoint").mkdir(exist_ok=True)  # train keeps its classifier's: here the user's own
    (run / "checkpoint" / "notes.txt").write_text("mine\n")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for extra, says in (([], "but no .synthaug-run"), (["-s", "train.lr=0.01", "--force"], "has no .synthaug-run")):
        code, _, err = run_cli([*args, *extra], capsys, monkeypatch)
        assert code == 2 and says in err, err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before and intact(sandbox)
    (run / ".synthaug-run").write_text("")  # the fix the message gives: the run is resumed as it is
    assert run_cli(args, capsys, monkeypatch)[0] == 0


def test_force_never_deletes_a_benchmark_or_a_summary(sandbox, capsys, monkeypatch):
    """Benchmark folders and --seeds summaries carry the run folders' marker: `run --force -s
    name=bench-smoke` once deleted `synthaug bench smoke`'s whole folder."""
    folders = {"bench-smoke": "results.jsonl", "bench-stopped": "generators/g/unet.safetensors",  # stopped in its 1st cell
            "r-seeds-0-1": "summary.json", "q-seeds-0-1": "synthetic/train/metadata.jsonl"}  # a sweep under way
    for name, held in folders.items():
        folder = sandbox / "work" / "runs" / name
        (folder / held).parent.mkdir(parents=True)
        (folder / ".synthaug-run").write_text("made by synthaug\n")
        (folder / held).write_text("hours of work\n")
        code, _, err = run_cli(["train", *FAST, "-s", "output_dir=runs", "-s", f"name={name}", "--force"], capsys,
                               monkeypatch)
        assert code == 2 and "deletes only run folders" in err and (folder / held).exists()
    assert run_cli(["train", *FAST, "-s", "output_dir=runs", "-s", "name=mine"], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["bench", "smoke", "--out", "runs/mine"], capsys, monkeypatch)
    assert code == 2 and "is a run's folder" in err and not (sandbox / "work" / "runs" / "mine" / "results.jsonl").exists()


def test_run_seeds_checks_every_seeds_folder_before_writing(sandbox, capsys, monkeypatch):
    args = [*FAST, "-s", "output_dir=runs", "-s", "report.baselines=[ce]"]
    assert run_cli(["train", *args, "-s", "name=x-s1", "-s", "train.lr=0.01"], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli(["run", "--seeds", "0,1", *args, "-s", "name=x"], capsys, monkeypatch)
    assert code == 2 and "holds a run with a different config" in err
    assert sorted(p.name for p in (sandbox / "work" / "runs").iterdir()) == ["x-s1"]  # no summary, no seed 0


def test_two_runs_stores_validated_keep_their_own_results(tmp_path):
    """Every run's store is `synthetic/`: validating a second one once replaced the first's results."""
    from synthaug.cli import validation_folder

    a, b = tmp_path / "runs" / "A" / "synthetic", tmp_path / "runs" / "B" / "synthetic"
    assert validation_folder("out", a) != validation_folder("out", b)
    assert validation_folder("out", a) == validation_folder("out", a.parent / "x" / ".." / "synthetic")  # the same store
    assert validation_folder("out", a).parent == Path("out") and validation_folder("out", a).name.startswith("validate-synthetic-")


def test_a_refused_run_leaves_no_folder_and_a_corrected_command_works(sandbox, capsys, monkeypatch, tmp_path):
    """A run refused inside its recipe (here: a generator folder that does not match the data)
    leaves no config.yaml behind to block the corrected command."""
    from synthaug.generate import DiffusionGenerator, GeneratorConfig

    gen = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], preset="tiny"))
    gen.save_pretrained(tmp_path / "gen")
    args = ["run", *FAST, "-s", "output_dir=runs", "-s", "recipe=synaug", "-s", "name=r", "-s", "report.baselines=ce"]
    code, _, err = run_cli([*args, "-s", f"generator.path={tmp_path / 'gen'}"], capsys, monkeypatch)
    assert code == 2 and "classes" in err
    assert not (sandbox / "work" / "runs" / "r").exists()
    assert run_cli(["train", *FAST, "-s", "output_dir=runs", "-s", "name=r"], capsys, monkeypatch)[0] == 0
    # --force over that finished run, with the mismatched generator: refused before the old run is deleted
    code, _, err = run_cli([*args, "-s", f"generator.path={tmp_path / 'gen'}", "--force"], capsys, monkeypatch)
    assert code == 2 and "classes" in err
    assert (sandbox / "work" / "runs" / "r" / "metrics.json").exists()


# --------------------------------------------------------------------------- 2. store paths


CLASSES = ["..", "a/b", "T-shirt/top", ".hidden"]


def rows(ids, label=0):
    return [{"id": i, "label": label, "seed": n, "group": None, "recipe": "t"} for n, i in enumerate(ids)]


def gray(rows_):
    return torch.stack([torch.full((1, 4, 4), 7, dtype=torch.uint8) for _ in rows_])


def test_class_names_never_leave_the_store(tmp_path):
    store = SyntheticStore(tmp_path / "store", CLASSES)
    for label in range(len(CLASSES)):
        store.fill(rows([f"r{label}"], label), gray)
    made = {p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")}
    assert all(str(p).startswith("store/train/") and len(p.parts) == 4 for p in made), made
    assert store.load().labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("classes", [["", "b"], ["a", "a"]])
def test_empty_or_repeated_class_names_are_refused(classes):
    from synthaug.data import ImageDataset

    with pytest.raises(SynthaugError, match="class"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), classes)


@pytest.mark.parametrize("row_id", ["../../../x", "/tmp/x", "..", "", ".hidden", "a\\b"])
def test_row_ids_that_are_not_plain_names_are_refused(row_id, tmp_path):
    store = SyntheticStore(tmp_path / "sandbox" / "store", ["a", "b"])
    with pytest.raises(SynthaugError, match="plain folder name"):
        store.fill(rows([row_id]), gray)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".png"]


@pytest.mark.parametrize("file_name", ["ABS", "../../outside.png", "a/../../../outside.png"])
def test_metadata_that_points_outside_is_never_read_or_deleted(file_name, tmp_path):
    outside = tmp_path / "outside.png"
    Image.fromarray(np.full((4, 4), 9, np.uint8)).save(outside)
    before = outside.read_bytes()
    store = SyntheticStore(tmp_path / "s" / "store", ["a", "b"])
    store.fill(rows(["ok"]), gray)
    bad = {"id": "evil", "file_name": str(outside) if file_name == "ABS" else file_name, "class": "a", "label": 0}
    with open(store.metadata_file, "a") as f:
        f.write(json.dumps(bad) + "\n")
    assert [r["id"] for r in store.rows()] == ["ok"]
    with pytest.raises(SynthaugError, match="outside"):
        store.verify()
    store.fill(rows(["ok", "more"]), gray)  # repairs the store: the bad line goes, the outside file stays
    assert outside.read_bytes() == before
    assert [r["id"] for r in store.rows()] == ["ok", "more"]
    store.verify()


def test_a_user_imagefolder_given_as_a_store_is_refused(tmp_path):
    """A Hugging Face imagefolder has train/metadata.jsonl too; its rows are not synthaug's."""
    (tmp_path / "hf" / "train" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "hf" / "train" / "cat" / "p.png")
    (tmp_path / "hf" / "train" / "metadata.jsonl").write_text('{"file_name": "cat/p.png", "caption": "a cat"}\n')
    with pytest.raises(SynthaugError, match="not a synthaug store"):
        SyntheticStore(tmp_path / "hf", ["a", "b"]).fill(rows(["x"]), gray)
    assert (tmp_path / "hf" / "train" / "cat" / "p.png").exists()
    assert "caption" in (tmp_path / "hf" / "train" / "metadata.jsonl").read_text()


def victim(tmp_path, text_file: str) -> Path:
    """A user's folder outside the store: an image, thesis.png, and a text file holding "mine"."""
    outside = tmp_path / "victim"
    outside.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside / "thesis.png")
    (outside / text_file).write_text("mine")
    return outside


def test_a_linked_class_folder_is_never_followed(tmp_path):
    outside = victim(tmp_path, ".x.tmp")
    store = SyntheticStore(tmp_path / "store", ["a", "b"])
    store.fill(rows(["ok"]), gray)
    (store.split_dir / "evil").symlink_to(outside)
    store.fill(rows(["ok", "more"]), gray)
    assert (outside / "thesis.png").exists() and (outside / ".x.tmp").exists()


@pytest.mark.parametrize("link", ["train", "train/metadata.jsonl"])
def test_a_store_whose_image_folder_or_metadata_is_a_link_is_refused(link, tmp_path):
    """The repair deletes unlisted images and rewrites the metadata: through a linked train/ it
    would reach the user's own image folder."""
    outside = victim(tmp_path, "metadata.jsonl")
    store = SyntheticStore(tmp_path / "store", ["a", "b"])
    store.fill(rows(["ok"]), gray)
    target = tmp_path / "store" / link
    if target.is_dir():
        import shutil

        shutil.rmtree(target)
        target.symlink_to(outside)
    else:
        target.unlink()
        target.symlink_to(outside / "metadata.jsonl")
    with pytest.raises(SynthaugError, match=f"holds a link, '{link}'"):
        SyntheticStore(tmp_path / "store", ["a", "b"]).fill(rows(["ok", "more"]), gray)
    assert (outside / "thesis.png").exists() and (outside / "metadata.jsonl").read_text() == "mine"


@pytest.mark.parametrize("bad", [{"file_name": "metadata.jsonl"}, {"file_name": "a/x\u0000.png"}, {"id": "x\u0000"}])
def test_a_row_naming_another_file_or_a_nul_is_a_bad_line(bad, tmp_path):
    """A row pointing at metadata.jsonl once got it deleted as a 'corrupt image', and then the
    whole store as unlisted images."""
    store = SyntheticStore(tmp_path / "store", ["a", "b"])
    store.fill(rows(["r1", "r2"]), gray)
    row = {"id": "evil", "file_name": "a/evil.png", "class": "a", "label": 0, **bad}
    with open(store.metadata_file, "a") as f:
        f.write(json.dumps(row) + "\n")
    assert store.problems()["bad_lines"] == ["line 3"]
    assert store.fill(rows(["r1", "r2"]), gray) == 0  # nothing lost, nothing regenerated
    assert [r["id"] for r in store.rows()] == ["r1", "r2"]


def test_a_store_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "mine" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mine" / "cat" / "photo.png")
    with pytest.raises(SynthaugError, match="not a synthaug store"):
        SyntheticStore(tmp_path / "mine", ["a", "b"]).fill(rows(["x"]), gray)
    assert (tmp_path / "mine" / "cat" / "photo.png").exists() and not (tmp_path / "mine" / "train").exists()


@pytest.mark.parametrize("planted", ["train/a/.more.png.tmp", "train/.metadata.jsonl.tmp", ".synthaug-store"])
def test_a_link_planted_where_the_store_writes_is_refused_not_followed(planted, tmp_path):
    """Temporary files and the marker are written at fixed names: a link planted at one would
    carry the write into the user's file."""
    outside = victim(tmp_path, "notes.txt")
    store = SyntheticStore(tmp_path / "store", ["a", "b"])
    store.fill(rows(["ok"]), gray)
    if planted == ".synthaug-store":
        (store.root / planted).unlink()
    if "metadata" in planted:  # a line cut off by a crash: the repair rewrites the metadata
        with open(store.metadata_file, "a") as f:
            f.write('{"id": "cut')
    (store.root / planted).symlink_to(outside / "notes.txt")
    with pytest.raises(SynthaugError, match="is a link, not a file synthaug wrote"):
        store.fill(rows(["ok", "more"]), gray)
    assert (outside / "notes.txt").read_text() == "mine"


def test_a_store_of_other_data_is_refused_before_the_run_writes(sandbox, capsys, monkeypatch):
    """Its classes are checked with the data, before the run folder is made and the generator
    trained (it was checked once the images were about to be added)."""
    store = SyntheticStore(sandbox / "other", ["cat", "dog"])
    store.fill(rows(["c0"]), gray)
    before = {p: p.stat().st_mtime_ns for p in (sandbox / "other").rglob("*")}
    code, _, err = run_cli(["run", *FAST, "-s", "recipe=synaug", "-s", "output_dir=runs", "-s",
                            f"synaug.store_dir={sandbox / 'other'}"], capsys, monkeypatch)
    assert code == 2 and "belongs to other data" in err, err
    assert not any((sandbox / "work" / "runs").iterdir()) and intact(sandbox)
    assert {p: p.stat().st_mtime_ns for p in (sandbox / "other").rglob("*")} == before


def test_checkpoints_are_removed_only_inside_the_run_folder(tmp_path):
    """`rounds/r*/valuation` is globbed: a `rounds` link planted in a run folder led the removal out."""
    from synthaug.runs import remove_checkpoints

    outside = tmp_path / "victim"
    (outside / "r1" / "valuation").mkdir(parents=True)
    (outside / "r1" / "valuation" / "data.txt").write_text("mine")
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "rounds").symlink_to(outside)
    remove_checkpoints(run)
    assert not (run / "checkpoint").exists() and (outside / "r1" / "valuation" / "data.txt").read_text() == "mine"


def test_a_linked_marker_marks_nothing(sandbox, capsys, monkeypatch):
    """A benchmark folder or a run folder whose marker is a link to a user's file is not
    synthaug's: refused, and the file is not written through the link."""
    target = sandbox / "victim" / "thesis.tex"
    bench = sandbox / "work" / "bench"
    bench.mkdir()
    (bench / ".synthaug-run").symlink_to(target)
    code, _, err = run_cli(["bench", "smoke", "--out", str(bench)], capsys, monkeypatch)
    assert code == 2 and "did not make" in err and target.read_text() == "years of work\n"
    args = ["train", *FAST, "-s", "output_dir=runs", "-s", "name=linked"]
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    run = sandbox / "work" / "runs" / "linked"
    (run / ".synthaug-run").unlink()
    (run / ".synthaug-run").symlink_to(target)
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "but no .synthaug-run" in err and target.read_text() == "years of work\n"


def test_a_seeds_summary_is_never_a_runs_folder(sandbox, capsys, monkeypatch):
    """`run --seeds 0,1 name=x` writes its summary to x-seeds-0-1: a run named so is not taken over."""
    args = [*FAST, "-s", "output_dir=runs", "-s", "report.baselines=[ce]"]
    assert run_cli(["train", *args, "-s", "name=x-seeds-0-1"], capsys, monkeypatch)[0] == 0
    run = sandbox / "work" / "runs" / "x-seeds-0-1"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, _, err = run_cli(["run", "--seeds", "0,1", *args, "-s", "name=x"], capsys, monkeypatch)
    assert code == 2 and "is a run's folder, not a --seeds summary" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert sorted(p.name for p in (sandbox / "work" / "runs").iterdir()) == ["x-seeds-0-1"]


# --------------------------------------------------------------------------- 3, 4. images


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    from synthaug.data import load_dataset

    for c in range(2):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
            Image.fromarray(ramp).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    data = load_dataset(tmp_path / "imgs")
    x = data.train.images[0, 0].flatten().tolist()
    assert x[0] == 0 and x[-1] == 255 and x[32] == round(32 * 1040 / 257)
    assert (data.train.images == 255).float().mean() < 0.05

    from synthaug.data.sources import to_uint8

    assert to_uint8(Image.fromarray(np.full((2, 2), 0.5, np.float32))).flatten().tolist() == [128] * 4
    with pytest.raises(SynthaugError, match="outside"):
        to_uint8(Image.fromarray(np.full((2, 2), -3.0, np.float32)))


# --------------------------------------------------------------------------- 5, 20. the report


def test_plot_labels_are_literal_and_the_backend_is_left_alone(tmp_path, capsys, monkeypatch):
    import matplotlib
    import matplotlib.pyplot as plt

    root = write_image_folder(tmp_path / "imgs", counts=(6, 6), size=(8, 8), mode="L")
    (root / "cls0").rename(root / "$\\frac{$")
    (root / "cls1").rename(root / "50$ or $x^2")
    backend = matplotlib.get_backend()
    fig = plt.figure()

    def refuse(*args, **kwargs):
        raise AssertionError("the report switched the user's matplotlib backend")

    monkeypatch.setattr(matplotlib, "use", refuse)
    args = ["run", "-s", f"data.dataset={root}", "-s", "split.kind=none", "-s", "train.epochs=1", "-s",
            "train.augment=none", "-s", "report.baselines=ce", "-s", f"output_dir={tmp_path / 'runs'}", "--quiet"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert list((tmp_path / "runs").rglob("report.html"))
    assert matplotlib.get_backend() == backend and plt.fignum_exists(fig.number)
    plt.close(fig)


def test_pairs_grid_takes_any_row_id():
    """Over-generated candidates are named `<id>~<j>`: the report never parses ids."""
    from synthaug.recipes.augcond import pairs_grid

    real = make_dataset((4, 4), size=8)
    synthetic = make_dataset((3, 3), size=8, seed=1)
    ids = ["augcond-x-c0-000001~1", "weird", "augcond-x-c0-000000", "x~2", "y", "z"]
    synthetic.info["rows"] = [{"id": i, "sources": [0, 1]} for i in ids]
    assert "data:image/png;base64," in pairs_grid(real, synthetic, lines=2, per_line=2)


# --------------------------------------------------------------------------- 15. train, then run


@pytest.mark.parametrize("recipe", ["ce", "synaug"])
def test_run_after_train_compares_and_reports_without_training_the_classifier_again(tmp_path, capsys, monkeypatch,
                                                                                    recipe):
    from synthaug.utils.loop import Checkpoint

    base = [*FAST, "-s", f"output_dir={tmp_path}", "-s", "name=x", "-s", "report.baselines=[ce,balanced-softmax]",
            "-s", f"recipe={recipe}", "-s", "generator.preset=tiny", "-s", "generator.steps=4",
            "-s", "generator.sampling_steps=2"]
    assert run_cli(["train", *base], capsys, monkeypatch)[0] == 0
    trained = json.loads((tmp_path / "x" / "metrics.json").read_text())
    assert not (tmp_path / "x" / "report.html").exists()
    assert (tmp_path / "x" / "checkpoint").is_dir()  # train keeps its classifier's last checkpoint, for run
    saved, real_save = [], Checkpoint.save
    monkeypatch.setattr(Checkpoint, "save", lambda self, *a, **kw: saved.append(self.folder) or real_save(self, *a, **kw))
    code, out, err = run_cli(["run", *base], capsys, monkeypatch)
    assert code == 0, err
    metrics = json.loads((tmp_path / "x" / "metrics.json").read_text())
    # the recipe (ce) is not trained again as its own baseline
    assert set(metrics["baselines"]) == ({"balanced-softmax"} if recipe == "ce" else {"ce", "balanced-softmax"})
    assert (tmp_path / "x" / "report.html").exists()
    assert tmp_path / "x" / "checkpoint" not in saved  # its classifier resumed at its end: not one step trained
    assert metrics["test"] == trained["test"] and not (tmp_path / "x" / "checkpoint").exists()


# --------------------------------------------------------------------------- 16. validation


def test_validation_is_redone_when_its_inputs_change(tmp_path):
    from synthaug.config import load_config
    from synthaug.data import LoadedDataset
    from synthaug.select.stage import validation_stage
    from synthaug.task import make_task

    data = LoadedDataset("tiny", make_dataset((30, 30, 30)), make_dataset((10, 10, 10), seed=1))
    config = load_config(None, ["split.kind=none", "validate.features=pixels", "validate.cas=false"])
    task = make_task(data, config.split)
    synthetic = make_dataset((12, 12, 12), seed=2)
    first = validation_stage(task, synthetic, config, None, workdir=tmp_path)
    stamp = (tmp_path / "validation.json").stat().st_mtime_ns
    assert validation_stage(task, synthetic, config, None, workdir=tmp_path)["key"] == first["key"]
    assert (tmp_path / "validation.json").stat().st_mtime_ns == stamp  # reused, not redone
    other = make_dataset((12, 12, 12), seed=3)
    assert validation_stage(task, other, config, None, workdir=tmp_path)["frechet_distance"] != first["frechet_distance"]
    config = load_config(None, ["split.kind=none", "validate.features=pixels", "validate.cas=false", "validate.k=5"])
    assert validation_stage(task, synthetic, config, None, workdir=tmp_path)["key"] != first["key"]


# --------------------------------------------------------------------------- 17. checkpoints


@pytest.mark.parametrize("links", [True, False])
def test_a_new_file_is_written_whole_and_never_over_another(links, tmp_path, monkeypatch):
    """analyse --json's write; without hard links (FAT, some network mounts) it creates the file exclusively."""
    import os

    from synthaug.utils.io import write_new_json

    if not links:
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    assert write_new_json(tmp_path / "a.json", {"x": 1}) and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    (tmp_path / "b.json").write_text("theirs")
    assert not write_new_json(tmp_path / "b.json", {"x": 2}) and (tmp_path / "b.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary file left


def test_a_scorer_saved_half_is_trained_again_from_its_checkpoint(tmp_path, monkeypatch):
    """save_pretrained writes the weights last; a folder that holds them without config.json (a
    kill between the two under an older order) is not taken as a saved scorer."""
    import synthaug.select.stage as stage
    from synthaug.config import load_config

    data = make_dataset((12, 12), seed=0)
    config = load_config(None, ["train.epochs=1", "train.batch_size=8", "train.augment=none"])
    first = stage.scorer_for(data, config, tmp_path / "scorers")
    (saved,) = [p for p in (tmp_path / "scorers").iterdir() if p.is_dir()]
    (saved / "config.json").unlink()
    again = stage.scorer_for(data, config, tmp_path / "scorers")  # trained again, not a raw error
    assert (saved / "config.json").is_file()
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), again.state_dict().values(), strict=True))


def test_a_scorer_read_back_scores_as_the_one_just_trained(tmp_path):
    """A resumed run reads the scorer it trained before: in the memory layout it trained in
    (channels_last), so its scores, and the images they keep, are the same to the bit."""
    import synthaug.select.stage as stage
    from synthaug.config import load_config

    data = make_dataset((12, 12), seed=0, size=12)
    config = load_config(None, ["train.epochs=1", "train.batch_size=8", "train.augment=none", "train.channels_last=true"])
    trained = stage.scorer_for(data, config, tmp_path / "scorers")
    read = stage.scorer_for(data, config, tmp_path / "scorers")
    assert read is not trained
    x = data.images.float()
    with torch.no_grad():
        assert torch.equal(trained.eval()(x), read.eval()(x))


def test_a_data_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """safetensors reports a folder it cannot write as its own error, not an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    from synthaug.data.sources import save_decoded

    def refuse(tensors, path, metadata=None):
        open(path, "wb").close()
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with pytest.raises(SynthaugError, match="cannot write the data cache in .* set data.cache_dir"):
        save_decoded(tmp_path / "cache" / "x.safetensors", {"images": torch.zeros(2)})
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file left


def test_a_generator_checkpoint_resumes_only_on_the_same_data(tmp_path, monkeypatch):
    from synthaug.generate import (
        DiffusionGenerator,
        GeneratorConfig,
        GeneratorTrainConfig,
    )

    a, b = make_dataset((8, 8), size=8, seed=0), make_dataset((8, 8), size=8, seed=5)  # same size, other pixels
    config = GeneratorConfig(image_size=8, channels=1, classes=a.classes, preset="tiny")
    train = GeneratorTrainConfig(steps=4, batch_size=4, checkpoint_every=2)
    undo = die_after_saving_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        DiffusionGenerator.fit(a, config, train, checkpoint_dir=tmp_path / "ck")
    undo()
    on_b = DiffusionGenerator.fit(b, config, train, checkpoint_dir=tmp_path / "ck")
    fresh = DiffusionGenerator.fit(b, config, train)
    assert on_b.fingerprint() == fresh.fingerprint()


# --------------------------------------------------------------------------- 18. the prior


def test_balanced_softmax_uses_the_prior_the_sampler_presents():
    from synthaug.classify import TrainConfig, fit_classifier
    from synthaug.classify.train import presented_prior

    counts = torch.tensor([100, 10, 1])
    assert torch.allclose(presented_prior("class-balanced", counts), torch.full((3,), 1 / 3))
    assert torch.allclose(presented_prior("uniform", counts), counts / counts.sum())
    data = make_dataset((30, 6, 3), size=8)
    fits = [fit_classifier(data, TrainConfig(epochs=1, batch_size=8, augment="none", sampler="class-balanced", loss=loss),
                           seed=0).model for loss in ("ce", "balanced-softmax")]
    for p, q in zip(fits[0].parameters(), fits[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6)  # a uniform prior adjusts nothing: no double correction


@pytest.mark.parametrize("loss, expected", [("balanced-softmax", 0.5), ("ce", 0.2)])
def test_balanced_softmax_counts_each_image_by_its_loss_weight(loss, expected):
    """Identical images, 10 per class, class 1 weighted 0.25: weighted cross-entropy learns
    p(1) = 2.5 / 12.5 = 0.2; Balanced Softmax, whose prior is the weighted mass (0.8, 0.2),
    learns logits that say 0.5 (a prior from the counts would leave 0.2)."""
    from synthaug.classify import TrainConfig, fit_classifier
    from synthaug.data.dataset import ImageDataset

    data = ImageDataset(torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(2).repeat_interleave(10), ["a", "b"])
    weights = torch.where(data.labels == 1, 0.25, 1.0)
    model = fit_classifier(data, TrainConfig(epochs=40, batch_size=20, lr=0.1, weight_decay=0, augment="none", loss=loss),
                           seed=0, sample_weights=weights).model.eval()
    with torch.no_grad():
        p = model(torch.zeros(1, 1, 8, 8)).softmax(-1)[0, 1].item()
    assert abs(p - expected) < 0.05


# --------------------------------------------------------------------------- 19. metrics


def test_density_balls_are_open_and_use_five_neighbours():
    from synthaug.select import density_coverage
    from synthaug.select.metrics import set_metrics

    real = torch.arange(10, dtype=torch.float64)[:, None]
    on_edges = torch.tensor([[1.0]], dtype=torch.float64)  # on the edge of the balls of 0 and 2 (k=1)
    assert density_coverage(real, on_edges, k=1)["density"] == 1.0  # its own ball only
    x, y = torch.randn(60, 3, dtype=torch.float64), torch.randn(60, 3, dtype=torch.float64)
    labels = torch.zeros(60, dtype=torch.long)
    assert set_metrics(x, y, labels, labels)["density"] == density_coverage(x, y, k=5)["density"]


def test_the_domain_classifier_is_at_chance_on_near_copies():
    from synthaug.select import domain_gap

    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g, dtype=torch.float64)
    copies = real + 1e-3 * torch.randn(200, 8, generator=g, dtype=torch.float64)
    assert 0.45 <= domain_gap(real, copies) <= 0.55  # was 0.395 with folds that split a copy from its original


# --------------------------------------------------------------------------- 7. archives


def tarball(path: Path, classes, truncate=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for part in ("train", "test"):
            for c in classes:
                for i in range(3):
                    png = io.BytesIO()
                    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(png, format="PNG")
                    info = tarfile.TarInfo(f"{part}/{c}/{i}.png")
                    info.size = len(png.getvalue())
                    tar.addfile(info, io.BytesIO(png.getvalue()))
    blob = buf.getvalue()
    path.write_bytes(blob[: len(blob) // 2] if truncate else blob)
    return path


def test_a_bad_tarball_leaves_nothing_and_the_cache_follows_the_archive(tmp_path, monkeypatch):
    import os

    from synthaug.data import load_dataset

    archive = tmp_path / "cifar10-jpg.tar.gz"
    monkeypatch.setenv("SYNTHAUG_CIFAR10", str(archive))
    tarball(archive, ["cat", "dog"], truncate=True)
    with pytest.raises(SynthaugError, match="truncated"):
        load_dataset("cifar10")
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".extract-")]
    assert not (tmp_path / "cache").exists()  # the cache folder made for it is gone too
    tarball(archive, ["cat", "dog"])
    assert load_dataset("cifar10").classes == ["cat", "dog"]
    tarball(archive, ["cat", "dog", "emu"])
    os.utime(archive, ns=(1, 1))  # another archive at the same path
    assert load_dataset("cifar10").classes == ["cat", "dog", "emu"]


# --------------------------------------------------------------------------- 13. the generator cache


def test_a_corrupt_cached_generator_names_the_folder_to_delete(tmp_path):
    from synthaug.config import load_config
    from synthaug.generate.cache import generator_fingerprint, generator_for, train_config

    data = make_dataset((6, 6), size=8)
    section = load_config(None, ["generator.preset=tiny"]).generator
    folder = tmp_path / generator_fingerprint(data, section, 0, precision=train_config(section).precision)
    folder.mkdir()
    (folder / "generator.json").write_text("{broken")
    with pytest.raises(SynthaugError, match=f"delete the folder '{folder}'"):
        generator_for(data, section, cache_root=tmp_path)


@pytest.mark.parametrize("planted", ["unet", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"])
def test_a_saved_generator_never_writes_through_a_planted_link(planted, tmp_path):
    from synthaug.generate.diffusion import DiffusionGenerator
    from synthaug.generate.network import GeneratorConfig

    gen = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], preset="tiny"))
    folder, outside = tmp_path / "generator", tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("theirs")
    (outside / "diffusion_pytorch_model.safetensors").write_text("theirs")
    (folder / planted).parent.mkdir(parents=True, exist_ok=True)
    (folder / planted).symlink_to(outside if planted == "unet" else outside / Path(planted).name)
    try:
        gen.save_pretrained(folder)
    except SynthaugError as e:
        assert "is a link" in str(e)
    assert [p.read_text() for p in sorted(outside.iterdir())] == ["theirs", "theirs"]
    if planted != "unet":  # a link at a file's name is replaced by the file, and the folder loads back
        assert not (folder / planted).is_symlink()
        back = DiffusionGenerator.from_pretrained(folder, device="cpu")
        assert all(torch.equal(v, back.unet.state_dict()[k]) for k, v in gen.unet.state_dict().items())


def test_a_link_planted_at_the_store_s_job_folder_is_refused_not_followed_nor_emptied(tmp_path):
    """The parallel executors empty and refill `<store>/.job`: a link planted there is refused in one
    line (it had ended in a traceback), and what it points at is neither emptied nor written."""
    from synthaug.generate.diffusion import DiffusionGenerator
    from synthaug.generate.executors import JOB_DIR, write_job
    from synthaug.generate.network import GeneratorConfig, SamplerConfig

    outside = victim(tmp_path, "notes.txt")
    store = SyntheticStore(tmp_path / "store", ["a", "b"])
    store.fill(rows(["ok"]), gray)
    (store.root / JOB_DIR).symlink_to(outside, target_is_directory=True)
    gen = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=["a", "b"], preset="tiny"))
    with pytest.raises(SynthaugError, match="is a link, not a file synthaug wrote"):
        write_job(store, rows(["ok", "more"]), gen, SamplerConfig(), None, provenance={}, shard_size=4)
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt", "thesis.png"]
    assert (outside / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe", ["synaug", "synaug-selected", "augcond", "tada", "utilgen", "utilgen-later"])
def test_a_store_made_at_another_guidance_is_refused_before_the_generator_trains(recipe, sandbox, capsys, monkeypatch):
    """The sampler's settings are known before the generator: a store that holds rows this run may
    write made at another guidance is refused by the run's checks, not once a generator (and TADA's
    early model, UtilGen's rounds) has trained for it. TADA's rows do not depend on which examples
    its early model targets, UtilGen's later rounds' ids and classes not on the earlier rounds, and a
    selection's over-generated candidates not on the selection."""
    from synthaug.config import load_config
    from synthaug.data import load_dataset
    from synthaug.generate.cache import sampler_config
    from synthaug.plan import balance_plan, targeted_plan, utility_plan
    from synthaug.recipes import get_recipe
    from synthaug.recipes.augcond import plan_of
    from synthaug.recipes.synaug import split_replay
    from synthaug.recipes.utilgen import sampling_of
    from synthaug.select.stage import overgenerate_plan
    from synthaug.task import make_task

    store_dir = sandbox / "store"
    name = recipe.split("-")[0]
    split = {"synaug": ["split.ratio=5"], "augcond": ["split.kind=few-shot", "split.k=5", "augcond.expand=3",
                                                     "augcond.embed_dim=8"],
             "tada": ["split.kind=none"], "utilgen": ["split.ratio=5", "split.val_per_class=3", "utilgen.rounds=2"]}[name]
    args = ["data.dataset=digits", *split, "train.epochs=4", f"recipe={name}", "output_dir=runs",
            f"{name}.store_dir={store_dir}", "generator.preset=tiny", "generator.steps=2",
            *(["select.method=random"] if recipe == "synaug-selected" else [])]
    config = load_config(None, args)
    task = make_task(load_dataset("digits"), config.split)
    sampling, seed = sampler_config(config.generator), config.generator.plan_seed
    if name == "synaug":
        plan = split_replay(balance_plan(task.train, seed=seed), config.synaug.replay_share, task.train)[1]
        if recipe == "synaug-selected":  # the candidates beyond the plan's own rows
            plan = overgenerate_plan(plan, config.select.overgenerate)[len(plan):]
    elif name == "augcond":
        plan = plan_of(task, config)
    elif name == "tada":  # the last examples: ones the early model may well have learnt
        every = torch.ones(len(task.train), dtype=torch.bool)
        plan = targeted_plan(task.train, every, variants=config.tada.variants, strength=config.tada.strength, seed=seed)[-3:]
    else:
        sampling = sampling_of(config)
        round_name = "r1" if recipe == "utilgen" else "final"  # the final set starts from the last round's images
        plan = utility_plan(task.train, per_class=2, round_name=round_name, seed=seed)
    made = plan[:3]
    SyntheticStore(store_dir, task.train.classes).fill(
        made, lambda r: torch.zeros((len(r), 1, 8, 8), dtype=torch.uint8),
        provenance={"generator": "0" * 16, "guidance_scale": 2.0, "sampler": f"{sampling.sampler}/{sampling.steps}"})
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")}
    code, _, err = run_cli(["run", *(a for arg in args for a in ("-s", arg)), "--quiet"], capsys, monkeypatch)
    want = f"holds '{made[0]['id']}' made with guidance_scale 2.0, not {sampling.guidance_scale}"
    assert code == 2 and want in err, err
    assert len(err.strip().splitlines()) == 1 and not any((sandbox / "work" / "runs").iterdir()) and intact(sandbox)
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")} == before
    get_recipe(name).check(task, load_config(None, [*args, "generator.guidance_scale=2"]))  # the store's own passes
