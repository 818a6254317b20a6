"""The synthetic store: layout, atomic writes, resume without duplicates, consistency."""

import json

import pytest
import torch

from synthaug.errors import SynthaugError
from synthaug.store import SyntheticStore

CLASSES = ["zero", "T-shirt/top"]


def plan(n=10):
    return [{"id": f"synaug-{i:04d}", "label": i % 2, "seed": 100 + i, "group": None, "recipe": "synaug"} for i in range(n)]


def fake_images(rows, calls=None):
    if calls is not None:
        calls.extend(r["id"] for r in rows)
    return torch.stack([torch.full((1, 8, 8), r["seed"] % 256, dtype=torch.uint8) for r in rows])


def test_layout_metadata_and_load(tmp_path):
    store = SyntheticStore(tmp_path / "syn", CLASSES)
    assert store.fill(plan(), fake_images, batch_size=4, provenance={"generator": "abc"}) == 10
    assert (tmp_path / "syn" / "train" / "zero" / "synaug-0000.png").exists()
    assert (tmp_path / "syn" / "train" / "T-shirt_top" / "synaug-0001.png").exists()
    rows = [json.loads(line) for line in (tmp_path / "syn" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert rows[1] == {"file_name": "T-shirt_top/synaug-0001.png", "class": "T-shirt/top", "id": "synaug-0001",
                       "label": 1, "seed": 101, "group": None, "recipe": "synaug", "generator": "abc"}
    ds = store.load()
    assert ds.images.shape == (10, 1, 8, 8) and ds.labels.tolist() == [0, 1] * 5
    assert int(ds.images[3, 0, 0, 0]) == 103
    store.verify()


def test_rows_load_in_the_order_asked_not_the_order_written(tmp_path):
    """A store filled out of plan order (a repair, a resumed job, another plan sharing it) loads
    a plan's rows in the plan's order, so the training set and the selectors' draws do not
    depend on the store's history."""
    store = SyntheticStore(tmp_path, CLASSES)
    rows = plan(8)
    store.fill(rows[4:], fake_images)
    store.fill(rows, fake_images)  # the first four written last
    ids = [r["id"] for r in rows]
    ds = store.load(ids=ids)
    assert [r["id"] for r in ds.info["rows"]] == ids
    assert ds.images[:, 0, 0, 0].tolist() == [r["seed"] for r in rows] and ds.labels.tolist() == [0, 1] * 4
    assert [r["id"] for r in store.load(ids=ids[::-1] + ids[:2]).info["rows"]] == ids[::-1]  # once each
    assert [r["id"] for r in store.load().info["rows"]] == ids[4:] + ids[:4]  # the whole store: as written


def test_interrupted_fill_resumes_without_duplicates(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    calls = []

    def dies_on_third_batch(rows):
        if len(calls) >= 6:
            raise KeyboardInterrupt
        return fake_images(rows, calls)

    with pytest.raises(KeyboardInterrupt):
        store.fill(plan(), dies_on_third_batch, batch_size=3)
    assert len(store.rows()) == 6
    calls.clear()
    assert store.fill(plan(), lambda rows: fake_images(rows, calls), batch_size=3) == 4
    assert calls == [f"synaug-{i:04d}" for i in range(6, 10)]  # only the missing rows
    assert [r["id"] for r in store.rows()] == [f"synaug-{i:04d}" for i in range(10)]
    assert store.fill(plan(), fake_images) == 0  # a finished store is not redone
    store.verify()


def test_crash_debris_is_repaired(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    store.fill(plan(4), fake_images)
    split = tmp_path / "train"
    # a metadata line cut off mid-write, an image without its row, a temp file
    with (split / "metadata.jsonl").open("a") as f:
        f.write('{"file_name": "zero/synaug-0004.png", "id": "synaug-00')
    (split / "zero" / "synaug-0099.png").write_bytes((split / "zero" / "synaug-0000.png").read_bytes())
    (split / "zero" / ".synaug-0004.png.tmp").write_bytes(b"half")
    with pytest.raises(SynthaugError, match="bad lines"):
        store.verify()
    calls = []
    assert store.fill(plan(6), lambda rows: fake_images(rows, calls)) == 2
    assert calls == ["synaug-0004", "synaug-0005"]
    store.verify()
    assert not (split / "zero" / "synaug-0099.png").exists()


def test_a_store_refuses_images_from_another_generator_or_sampler(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    store.fill(plan(4), fake_images, provenance={"generator": "aaa", "sampler": "ddim/15"})
    with pytest.raises(SynthaugError, match="made with generator aaa, not bbb"):
        store.fill(plan(6), fake_images, provenance={"generator": "bbb", "sampler": "ddim/15"})
    with pytest.raises(SynthaugError, match="made with sampler ddim/15, not ddim/30"):
        store.fill(plan(6), fake_images, provenance={"generator": "aaa", "sampler": "ddim/30"})
    assert len(store.load(ids=["synaug-0001", "synaug-0003"])) == 2
    assert store.fill(plan(6), fake_images, provenance={"generator": "aaa", "sampler": "ddim/15"}) == 2
    # a key recorded only away from its former value: its absence is that value, both ways
    with pytest.raises(SynthaugError, match="made with group_guidance_scale None, not 1.5"):
        store.check_made(plan(6), {"generator": "aaa", "sampler": "ddim/15", "group_guidance_scale": 1.5})
    split = SyntheticStore(tmp_path / "split", CLASSES)
    split.fill(plan(2), fake_images, provenance={"generator": "aaa", "group_guidance_scale": 1.5})
    with pytest.raises(SynthaugError, match="made with group_guidance_scale 1.5, not None"):
        split.check_made(plan(2), {"generator": "aaa"})
    assert len(split.check_made(plan(2), {"generator": "aaa", "group_guidance_scale": 1.5})) == 2


def test_metadata_that_disagrees_with_files(tmp_path):
    store = SyntheticStore(tmp_path, CLASSES)
    store.fill(plan(4), fake_images)
    (tmp_path / "train" / "zero" / "synaug-0002.png").unlink()
    with pytest.raises(SynthaugError, match="missing"):
        store.verify()
    (tmp_path / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "dog/y.png", "class": "dog", "id": "y"}) + "\n")
    with pytest.raises(SynthaugError, match="unknown class 'dog'"):
        store.verify()
    with pytest.raises(SynthaugError, match="empty"):
        SyntheticStore(tmp_path / "none", CLASSES).load()


def test_store_loads_as_hf_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    store = SyntheticStore(tmp_path, CLASSES)
    store.fill(plan(4), fake_images)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == 4 and ds[0]["seed"] == 100


def test_memorization_ratio_flags_copies():
    from conftest import make_dataset

    from synthaug.select.metrics import memorization_ratio

    train, heldout = make_dataset((20, 20), seed=0), make_dataset((20, 20), seed=1)
    copies = train.subset(torch.arange(len(train)))
    fresh = make_dataset((20, 20), seed=2)
    assert memorization_ratio(copies, train, heldout)["median"] == 0.0
    assert 0.7 < memorization_ratio(fresh, train, heldout)["median"] < 1.3


def test_scores_are_merged_into_the_metadata(tmp_path):
    store = SyntheticStore(tmp_path, ["a", "b"])
    plan = [{"id": f"r{i}", "label": i % 2, "seed": i} for i in range(4)]
    store.fill(plan, lambda rows: torch.zeros(len(rows), 1, 4, 4, dtype=torch.uint8))
    store.set_scores({"r1": {"utility_r1": 0.25}, "r2": {"utility_r1": 0.75}})
    store.set_scores({"r1": {"utility_r2": 0.5}})
    rows = {r["id"]: r for r in store.rows()}
    assert rows["r1"]["scores"] == {"utility_r1": 0.25, "utility_r2": 0.5} and rows["r2"]["scores"] == {"utility_r1": 0.75}
    assert "scores" not in rows["r0"] or not rows["r0"]["scores"]
    store.verify()
    with pytest.raises(SynthaugError, match="no image 'r9'"):
        store.set_scores({"r9": {"utility_r1": 1.0}})


def test_a_row_made_otherwise_is_refused(tmp_path):
    store = SyntheticStore(tmp_path, ["a", "b"])
    plan = [{"id": f"r{i}", "label": i % 2, "seed": i, "strength": 0.5} for i in range(3)]
    make = lambda rows: torch.zeros(len(rows), 1, 4, 4, dtype=torch.uint8)  # noqa: E731
    store.fill(plan, make)
    assert store.fill(plan, make) == 0  # the same rows again: nothing to do
    with pytest.raises(SynthaugError, match="made with strength 0.5, not 0.3"):
        store.fill([{**r, "strength": 0.3} for r in plan], make)
    with pytest.raises(SynthaugError, match="made with seed 1, not 7"):
        store.fill([{**plan[1], "seed": 7}], make)


def test_corrupt_images_and_bad_rows_are_found_said_and_regenerated(tmp_path, capsys):
    store = SyntheticStore(tmp_path, CLASSES)
    store.fill(plan(6), fake_images)
    split = tmp_path / "train"
    lines = (split / "metadata.jsonl").read_text().splitlines()
    (split / json.loads(lines[0])["file_name"]).write_bytes(b"\x89PNG\r\n\x1a\n cut")  # corrupt image
    row = json.loads(lines[1])
    del row["id"]  # a row without its id
    lines[1] = json.dumps(row)
    lines.append("[1, 2]")  # JSON, but not a row
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    found = store.problems()
    assert len(found["corrupt"]) == 1 and len(found["bad_lines"]) == 2 and len(found["unlisted"]) == 1
    with pytest.raises(SynthaugError, match="damaged: 2 bad lines .* 1 corrupt"):
        store.verify()
    with pytest.raises(SynthaugError, match="corrupt"):
        store.load()
    calls = []
    assert store.fill(plan(6), lambda rows: fake_images(rows, calls)) == 2
    assert calls == ["synaug-0000", "synaug-0001"]
    assert "1 corrupt" in capsys.readouterr().err
    store.verify()
    ds = store.load()
    first = [r["id"] for r in ds.info["rows"]].index("synaug-0000")
    assert len(ds) == 6 and int(ds.images[first, 0, 0, 0]) == 100


def test_exclusive_makes_processes_take_turns(tmp_path):
    """Two holders of the same lock file (cells side by side training one scorer) take turns:
    the second enters only once the first has left."""
    import threading
    import time

    from synthaug.utils.io import exclusive

    events = []

    def second():
        with exclusive(tmp_path / "key.lock"):
            events.append("second in")

    with exclusive(tmp_path / "key.lock"):
        events.append("first in")
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        events.append("first out")
    waiting.join(timeout=10)
    assert events == ["first in", "first out", "second in"]
