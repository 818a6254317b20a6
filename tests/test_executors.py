"""Executors: the local loop, `accelerate` with 2 CPU processes and Ray Data on a local Ray
instance with 2 workers make the same images into the same store; a Ray worker killed mid-run
loses only its shard; leftovers of a crashed run (shard files, cut-off lines, orphan images)
are merged or cleaned and nothing is written twice."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from conftest import make_dataset

from synthaug.errors import SynthaugError
from synthaug.generate import (
    DiffusionGenerator,
    GeneratorConfig,
    GeneratorTrainConfig,
    SamplerConfig,
)
from synthaug.generate.executors import JOB_DIR, WORKERS_DIR, execute
from synthaug.store import SyntheticStore

SAMPLING = SamplerConfig(steps=3, batch_size=8)


@pytest.fixture(scope="module")
def setup():
    ds = make_dataset()
    gen = DiffusionGenerator.fit(ds, GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny"),
                                 GeneratorTrainConfig(steps=2, batch_size=8, warmup_steps=1))
    # enough shards that both Ray workers are up before the work runs out (the killing test needs two)
    plan = [{"id": f"r{i:03d}", "label": i % 3, "seed": 100 + i} for i in range(120)]
    # image-guided rows too: workers must get the source images
    plan += [{"id": f"v{i:03d}", "label": int(ds.labels[i]), "seed": i, "source": i, "strength": 0.5} for i in range(0, 35, 5)]
    reference = SyntheticStore("unused", ds.classes)
    return ds, gen, plan, reference


def images_by_id(store: SyntheticStore) -> dict[str, torch.Tensor]:
    loaded = store.load()
    return {r["id"]: img for r, img in zip(loaded.info["rows"], loaded.images)}


def check_same_images(store, local, plan):
    """Every plan row once, no shard file or job folder left, and the images of the local
    run (worker processes run single-threaded, so a few pixels may differ by float rounding)."""
    ids = [json.loads(line)["id"] for line in store.metadata_file.read_text().splitlines()]
    assert sorted(ids) == sorted(r["id"] for r in plan)
    assert not store.shard_files() and not (store.root / JOB_DIR).exists()
    store.verify()
    got, want = images_by_id(store), images_by_id(local)
    diff = torch.stack([(got[i].int() - want[i].int()).abs() for i in want])
    assert diff.max() <= 3 and (diff > 0).float().mean() < 0.01


@pytest.fixture(scope="module")
def local_store(setup, tmp_path_factory):
    ds, gen, plan, _ = setup
    store = SyntheticStore(tmp_path_factory.mktemp("local"), ds.classes)
    assert execute("local", store, plan, gen, SAMPLING, ds, provenance={"generator": gen.fingerprint()}) == len(plan)
    return store


def test_accelerate_with_two_cpu_processes(setup, local_store, tmp_path):
    ds, gen, plan, _ = setup
    store = SyntheticStore(tmp_path / "store", ds.classes)
    # a first part made in this process: the workers only make the rest
    execute("local", store, plan[:10], gen, SAMPLING, ds, provenance={"generator": gen.fingerprint()})
    written = execute("accelerate", store, plan, gen, SAMPLING, ds, provenance={"generator": gen.fingerprint()}, workers=2,
                      shard_size=6)
    assert written == len(plan) - 10
    check_same_images(store, local_store, plan)


@pytest.mark.slow  # Ray is an optional extra, and starting it takes most of a minute on 2 CPU cores
def test_ray_with_two_workers_one_killed(setup, local_store, tmp_path):
    ray = pytest.importorskip("ray")
    ds, gen, plan, _ = setup
    store = SyntheticStore(tmp_path / "store", ds.classes)
    killed = []

    def kill_a_worker():  # once both workers are up, kill one mid-run
        workers_dir = store.root / JOB_DIR / WORKERS_DIR
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            pids = [int(p.name) for p in workers_dir.glob("*")] if workers_dir.exists() else []
            if len(pids) == 2:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker)
    killer.start()
    try:
        written = execute("ray", store, plan, gen, SAMPLING, ds, provenance={"generator": gen.fingerprint()}, workers=2,
                          shard_size=4)
    finally:
        killer.join()
        ray.shutdown()
    assert killed, "no worker was killed: the test did not exercise a failure"
    assert written == len(plan)
    check_same_images(store, local_store, plan)


def test_a_crashed_run_is_merged_and_resumed(setup, local_store, tmp_path):
    ds, gen, plan, _ = setup
    store = SyntheticStore(tmp_path / "store", ds.classes)
    make = lambda rows: gen.generate_rows(rows, SAMPLING, sources=ds)  # noqa: E731
    provenance = {"generator": gen.fingerprint()}
    store.fill(plan[:5], make, provenance=provenance)
    # a worker wrote 6 rows into its shard file, then died mid-line and after an image without its row
    store.fill(plan[5:11], make, provenance=provenance, shard="s00001")
    with open(store.split_dir / "metadata-s00001.jsonl", "a") as f:
        f.write('{"id": "r011", "file_na')
    orphan = store.split_dir / "class0" / "r013.png"
    orphan.write_bytes((store.split_dir / store.rows()[0]["file_name"]).read_bytes())
    assert {r["id"] for r in store.rows()} == {r["id"] for r in plan[:11]}
    # Ray retries the shard on another worker: its rows start on a new line, after the half one
    store.fill(plan[5:13], make, provenance=provenance, shard="s00001")
    assert {r["id"] for r in store.rows()} == {r["id"] for r in plan[:13]}
    written = execute("local", store, plan, gen, SAMPLING, ds, provenance=provenance)
    assert written == len(plan) - 13
    check_same_images(store, local_store, plan)


def test_unknown_executor_and_bad_shard_names(setup, tmp_path):
    ds, gen, plan, _ = setup
    store = SyntheticStore(tmp_path / "store", ds.classes)
    with pytest.raises(SynthaugError, match="unknown executor 'slurm'"):
        execute("slurm", store, plan, gen, SAMPLING, ds, provenance={})
    with pytest.raises(SynthaugError, match="shard name"):
        store.fill(plan[:1], lambda rows: None, shard="../x")
