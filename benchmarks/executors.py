"""Generation throughput of each executor (issue 7), against a bare loop over the same
generator, on this machine.

    python benchmarks/executors.py            # 3 repeats of every row, side by side
    python benchmarks/executors.py --quick    # a few images: checks the script

Generator: the embedded `small` preset at 28x28 px (MNIST's size, 10 classes; random weights:
the compute is the trained generator's), 15 sde-dpm-solver++ steps with guidance (the
defaults), batches of 128, through every executor; and the random miniature Stable
Diffusion pipeline (`tiny_pipeline`, 32 px, 10 steps), bare and local only: the cost of the
store around the diffusers path, not Stable Diffusion's speed. Rows: one class-balanced plan
of `--images` images (a quarter of that for the miniature pipeline), made into an empty store.

- bare loop: `generator.generate` over the plan's labels and seeds, nothing written;
- local: the default executor (this process: PNGs + metadata);
- accelerate / ray with 1 and 2 workers: the same plan through `accelerate launch` (CPU
  processes) and Ray Data on a local Ray instance; their time includes starting the
  workers and loading the generator in each.

Worker processes share the cores (accelerate gets cores // workers threads per process;
Ray sets one thread per worker), this process uses torch's default; the generators are
warmed up in this process before the first timing. Rows go to benchmarks/results/executors.jsonl (a re-run skips finished
rows); the table to benchmarks/results/executors.md and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import HERE, append_row, environment, publish, read_rows

from synthaug.generate import DiffusionGenerator, GeneratorConfig, SamplerConfig
from synthaug.generate.cache import provenance
from synthaug.generate.executors import execute
from synthaug.generate.stable_diffusion import StableDiffusionGenerator
from synthaug.store import SyntheticStore
from synthaug.testing import tiny_pipeline

CLASSES = [str(c) for c in range(10)]
RUNS = {  # name: (executor, workers)
    "bare loop": (None, None),
    "local": ("local", None),
    "accelerate, 1 worker": ("accelerate", 1),
    "accelerate, 2 workers": ("accelerate", 2),
    "ray, 1 worker": ("ray", 1),
    "ray, 2 workers": ("ray", 2),
}


def generators(folder: Path) -> dict:
    torch.manual_seed(0)
    embedded = DiffusionGenerator(GeneratorConfig(image_size=28, channels=1, classes=CLASSES, preset="small"))
    embedded.save_pretrained(folder / "embedded")
    sd = StableDiffusionGenerator.from_pretrained(tiny_pipeline(folder / "tiny-sd"), CLASSES, channels=1, image_size=28,
                                                  resolution=32, dtype="float32")
    gens = {"embedded small (28 px, 15 steps)": (embedded, SamplerConfig(steps=15, guidance_scale=3.0, batch_size=128)),
            "tiny Stable Diffusion (32 px, 10 steps)": (sd, SamplerConfig(sampler="dpm-solver++", steps=10,
                                                                           guidance_scale=3.0, batch_size=32))}
    for generator, sampling in gens.values():  # warm-up: first calls pay for lazy set-up
        generator.generate([0, 1], [0, 1], sampler=sampling)
    return gens


def measure(name: str, generator, sampling: SamplerConfig, n: int, workdir: Path) -> dict:
    plan = [{"id": f"i{i:06d}", "label": i % 10, "seed": i} for i in range(n)]
    executor, workers = RUNS[name]
    t0 = time.perf_counter()
    if executor is None:
        for i in range(0, n, sampling.batch_size):
            rows = plan[i : i + sampling.batch_size]
            generator.generate([r["label"] for r in rows], [r["seed"] for r in rows], sampler=sampling)
        written = n
    else:
        store = SyntheticStore(workdir / "store", CLASSES)
        written = execute(executor, store, plan, generator, sampling, None, provenance=provenance(generator, sampling),
                          workers=workers, shard_size=sampling.batch_size)
        assert len(store.rows()) == n
        shutil.rmtree(workdir / "store")
    seconds = time.perf_counter() - t0
    return {"images": written, "seconds": seconds, "images_per_second": written / seconds}


def summarise(rows: list[dict]) -> str:
    lines = ["| generator | executor | images/s | vs bare loop | repeats |", "|---|---|---|---|---|"]
    for gen in dict.fromkeys(r["generator"] for r in rows):
        bare = [r["images_per_second"] for r in rows if r["generator"] == gen and r["run"] == "bare loop"]
        for run in RUNS:
            speeds = [r["images_per_second"] for r in rows if r["generator"] == gen and r["run"] == run]
            if not speeds:
                continue
            sd = statistics.stdev(speeds) if len(speeds) > 1 else 0.0
            ratio = f"{statistics.fmean(speeds) / statistics.fmean(bare):.2f}" if bare else "n/a"
            lines.append(f"| {gen} | {run} | {statistics.fmean(speeds):.2f} ± {sd:.2f} | {ratio} | {len(speeds)} |")
    images = sorted({r["images"] for r in rows})
    env = rows[0]["environment"] if rows else {}
    lines += ["", f"{'/'.join(map(str, images))} images per run; torch {env.get('torch')}, {env.get('threads')} threads in "
              f"this process, commit {env.get('commit')}."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats = 16, 1
    results = HERE / "results" / ("executors-quick.jsonl" if args.quick else "executors.jsonl")
    done = {(r["generator"], r["run"], r["repeat"]) for r in read_rows(results)}
    with tempfile.TemporaryDirectory(prefix="synthaug-executors-") as tmp:
        gens = generators(Path(tmp))
        for repeat in range(args.repeats):  # repeats outermost: every executor sees the same machine state
            for gen_name, (generator, sampling) in gens.items():
                embedded = "embedded" in gen_name
                n = args.images if embedded else max(8, args.images // 4)
                for run in args.runs:
                    if (gen_name, run, repeat) in done or (not embedded and RUNS[run][0] not in (None, "local")):
                        continue  # the parallel executors are timed on the embedded generator only
                    out = measure(run, generator, sampling, n, Path(tmp))
                    print(f"{gen_name:40s} {run:24s} repeat {repeat}  {out['images_per_second']:.2f} images/s", flush=True)
                    append_row(results, {"generator": gen_name, "run": run, "repeat": repeat, **out,
                                         "environment": environment()})
    publish(results, "executors", summarise(read_rows(results)), to_benchmarks=not args.quick)


if __name__ == "__main__":
    main()
