"""Executors: who makes a plan's images. Generating is a pure function of plan rows (label,
seed, source image, conditioning), so the rows can be cut into shards and spread out:

- `local` (default): in this process, batch after batch.
- `accelerate`: one process per GPU of a node (`accelerate launch`, each process takes its
  share of the shards with `PartialState.split_between_processes`).
- `ray`: a Ray cluster (or a local Ray instance): Ray Data `map_batches` over the shards with
  a pool of actors (one GPU each when there are GPUs) that load the generator once.

Every executor writes into the same store: images atomically, each worker's metadata rows
into its own shard file, which the driver merges when all are done (`SyntheticStore`). A
re-run skips every row already written; a worker that dies loses only the shard it was
making (Ray retries it on another actor; with accelerate, re-run the command).

Parallel workers rebuild the generator from a job folder (`<store>/.job/`): the generator
saved with `save_pretrained`, the sampler settings, the rows to make and, when rows start
from real images, those images as safetensors. Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..errors import SynthaugError
from ..store import SyntheticStore
from ..utils.io import atomic_save_tensors, atomic_write_json, atomic_write_text, not_a_link
from ..utils.registry import Registry
from ..utils.runtime import progress_bar
from .network import SamplerConfig

EXECUTORS: Registry[Callable] = Registry("executor")
# the package each optional executor needs, and the extra that installs it
NEEDS = {"accelerate": ("accelerate", "sd"), "ray": ("ray", "ray")}


def check_executor(name: str):
    """Refuse an unknown executor, or one whose package is not installed. Writes nothing."""
    import importlib.util

    EXECUTORS.lookup(name)
    if name in NEEDS and importlib.util.find_spec(NEEDS[name][0]) is None:
        package, extra = NEEDS[name]
        raise SynthaugError(f"executor '{name}' needs {package}: pip install 'synthaug[{extra}]', or set executor.name=local")


def check_guided(name: str):
    """Refuse feedback guidance on an executor whose workers sample without its classifier. Writes nothing."""
    if name != "local":
        raise SynthaugError(f"generator.feedback guides the sampling in this process and executor '{name}' samples in "
                            "workers: set executor.name=local, or generator.feedback=0")


JOB_DIR = ".job"
WORKERS_DIR = "workers"  # each live worker writes its pid here (monitoring; tests kill one)


def register_executor(name: str):
    """Register `fn(store, plan, generator, sampling, sources, *, provenance, progress, workers, shard_size,
    address) -> images written`."""
    return EXECUTORS.register(name)


def execute(name: str, store: SyntheticStore, plan: list[dict], generator, sampling: SamplerConfig, sources: ImageDataset,
            *, provenance: dict, progress: bool = False, workers: int | None = None, shard_size: int | None = None,
            address: str | None = None, guide=None) -> int:
    """Make the plan's missing images into `store` with executor `name`. Returns the number
    of images written. `guide`: feedback guidance's classifier, which only `local` takes."""
    if guide is not None:
        check_guided(name)
    options = {"guide": guide} if guide is not None else {}
    return EXECUTORS.lookup(name)(store, plan, generator, sampling, sources, provenance=provenance, progress=progress, workers=workers,
                           shard_size=shard_size or sampling.batch_size, address=address, **options)


@register_executor("local")
def run_local(store, plan, generator, sampling, sources, *, provenance, progress=False, guide=None, **_) -> int:
    options = {"guide": guide} if guide is not None else {}
    return store.fill(plan, lambda rows: generator.generate_rows(rows, sampling, sources=sources, **options),
                      batch_size=sampling.batch_size, progress=progress, provenance=provenance)


# ---------------------------------------------------------------------------- the job folder
def write_job(store: SyntheticStore, plan: list[dict], generator, sampling: SamplerConfig, sources: ImageDataset,
              *, provenance: dict, shard_size: int) -> tuple[Path, int]:
    """Repair the store, then write what parallel workers need to make its missing rows.
    Returns the job folder and the number of shards."""
    store.repair()  # nobody else is writing now
    done = store.done_ids()
    todo = [r for r in plan if r["id"] not in done]
    folder = not_a_link(store.root / JOB_DIR)  # the store's own: a link planted there is neither followed nor removed
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    generator.save_pretrained(folder / "generator")
    needs_sources = any(r.get("source") is not None or r.get("sources") is not None for r in todo)
    if needs_sources:
        atomic_save_tensors(folder / "sources.safetensors",
                            {"images": sources.images.contiguous(), "labels": sources.labels.contiguous()})
    atomic_write_text(folder / "rows.jsonl", "".join(json.dumps(r) + "\n" for r in todo))
    shards = (len(todo) + shard_size - 1) // shard_size
    atomic_write_json(folder / "job.json", {
        "store": str(store.root.resolve()), "classes": store.classes, "sampling": asdict(sampling), "provenance": provenance,
        "fingerprint": generator.fingerprint(), "shard_size": shard_size, "shards": shards, "sources": needs_sources,
    })
    (folder / WORKERS_DIR).mkdir()
    return folder, shards


class JobWorker:
    """Makes the shards of a job folder: loads the generator once (checking its fingerprint),
    then writes each shard's images and rows into the store under the shard's own name."""

    def __init__(self, job_dir: str | os.PathLike, device: str = "auto"):
        from ..store import check_store_folder
        from .cache import load_generator

        self.dir = Path(job_dir)
        self.job = json.loads((self.dir / "job.json").read_text())
        check_store_folder(self.job["store"], "the job's store")
        self.generator = load_generator(self.dir / "generator", device=device)
        if self.generator.fingerprint() != self.job["fingerprint"]:
            raise SynthaugError(f"the generator in {self.dir / 'generator'} is not the one the job was written for: "
                                "run the generation again")
        self.sampling = SamplerConfig(**self.job["sampling"])
        self.store = SyntheticStore(self.job["store"], self.job["classes"])
        self.sources = None
        if self.job["sources"]:
            from safetensors.torch import load_file

            t = load_file(self.dir / "sources.safetensors")
            self.sources = ImageDataset(t["images"], t["labels"], self.job["classes"])
        self.rows = [json.loads(line) for line in (self.dir / "rows.jsonl").read_text().splitlines()]
        (self.dir / WORKERS_DIR / str(os.getpid())).touch()

    def run_shard(self, shard: int) -> int:
        size = self.job["shard_size"]
        rows = self.rows[shard * size : (shard + 1) * size]
        return self.store.fill(rows, lambda r: self.generator.generate_rows(r, self.sampling, sources=self.sources),
                               batch_size=self.sampling.batch_size, provenance=self.job["provenance"], shard=f"s{shard:05d}")


def _finish(store: SyntheticStore, folder: Path):
    store.merge_shards()
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------- accelerate
@register_executor("accelerate")
def run_accelerate(store, plan, generator, sampling, sources, *, provenance, progress=False, workers=None, shard_size,
                   **_) -> int:
    """`accelerate launch` with `workers` processes (default: one per GPU, else 2 on the
    CPU), each making its share of the shards."""
    check_executor("accelerate")
    before = len(store.done_ids())
    folder, shards = write_job(store, plan, generator, sampling, sources, provenance=provenance, shard_size=shard_size)
    if shards:
        gpus = torch.cuda.device_count()
        n = workers or max(gpus, 2 if not gpus else 1)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               # on a CPU the processes share the cores (accelerate would give each 2 threads)
               *(["--cpu", "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))] if not gpus
                 else ["--multi_gpu"] * (n > 1)),
               "-m", "synthaug.generate.executors", str(folder)]
        env = {**os.environ, "SYNTHAUG_PROGRESS": "1" if progress else "0"}
        result = subprocess.run(cmd, env=env)
        if result.returncode:
            raise SynthaugError(f"accelerate workers failed (exit {result.returncode}): the rows they finished are kept; "
                                "run the generation again to make the rest")
    _finish(store, folder)
    return len(store.done_ids()) - before


def accelerate_worker(job_dir: str):
    """One `accelerate launch` process: its share of the shards, on its own device."""
    from accelerate import PartialState

    state = PartialState()
    worker = JobWorker(job_dir, device=str(state.device))
    shards = list(range(worker.job["shards"]))
    with state.split_between_processes(shards) as mine:
        show = state.is_main_process and os.environ.get("SYNTHAUG_PROGRESS") == "1"
        with progress_bar(show) as bar:
            task = bar.add_task(f"generate ({state.num_processes} processes)", total=len(mine), info="")
            for shard in mine:
                worker.run_shard(shard)
                bar.advance(task)
    state.wait_for_everyone()


# ---------------------------------------------------------------------------- ray
class _RayShardMaker:
    """A Ray Data actor: loads the job's generator once, then makes the shards it is given."""

    def __init__(self, job_dir: str):
        self.worker = JobWorker(job_dir, device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict) -> dict:
        written = [self.worker.run_shard(int(s)) for s in batch["shard"]]
        return {"shard": batch["shard"], "written": written}


@register_executor("ray")
def run_ray(store, plan, generator, sampling, sources, *, provenance, progress=False, workers=None, shard_size,
            address=None, **_) -> int:
    """Ray Data over the shards with `workers` actors (default: one per GPU of the cluster,
    else 2), on the cluster at `address` (default: a running one, else a local instance).
    The store must be on a file system every node sees."""
    check_executor("ray")
    import ray

    before = len(store.done_ids())
    folder, shards = write_job(store, plan, generator, sampling, sources, provenance=provenance, shard_size=shard_size)
    if shards:
        started = not ray.is_initialized()
        if started:  # a local instance gets a CPU slot per actor, plus one for Ray Data's own tasks
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="warning",
                     **({} if address else {"num_cpus": max(os.cpu_count() or 1, (workers or 2) + 1)}))
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            n = workers or gpus or 2
            ds = ray.data.from_items([{"shard": s} for s in range(shards)], override_num_blocks=shards)
            made = ds.map_batches(_RayShardMaker, fn_constructor_args=(str(folder),), batch_size=1,
                                  compute=ray.data.ActorPoolStrategy(size=n), num_gpus=1 if gpus else 0, num_cpus=1,
                                  max_restarts=-1, max_task_retries=-1)
            with progress_bar(progress) as bar:
                task = bar.add_task(f"generate (ray, {n} workers)", total=shards, info="")
                for _ in made.iter_rows():
                    bar.advance(task)
        finally:
            if started:
                ray.shutdown()
    _finish(store, folder)
    return len(store.done_ids()) - before


if __name__ == "__main__":  # the entry point of accelerate's processes
    accelerate_worker(sys.argv[1])
