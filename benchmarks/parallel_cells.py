"""Run one setting of a bench suite as parallel `synthaug bench` processes on one machine: the
cells of a short GPU lease (one H100 or H200 shared by many small classifiers) in minutes rather
than one after another.

    python benchmarks/parallel_cells.py cifar10-gpu --setting "CIFAR-10-LT r100" --out /tmp/lt \\
        --workers 10 --minutes 6 --stop 9 --export rows.jsonl

Each cell (recipe, classifier seed) runs as `synthaug bench SUITE --setting S --recipe R --seed N`
in its own folder, so no two processes write one results.jsonl. Generative cells share one
generator cache and one store folder (each job folder links to them): each generator seed's first
generative cell trains it; the recipes that write one store (SYNAuG's fills differ in how much of
a plan is generated, not in its images) run their first seed one after another, and their other
seeds start once the store's last writer is done (a cell that opens a store repairs what it finds,
so none reads while another writes). The real-replay control draws real images only (no generator,
no store) and runs at once. Ready cells start first-seed-first, so a lease that runs out leaves
every recipe with as many seeds as the rest; a cell whose prerequisite failed is dropped.
With --alone the generator's cell runs first with no other beside it: on an H200, 2,400 generator
steps take 1.7 minutes alone and did not end within 8 beside 11 classifiers. --skip leaves out
the cells an earlier lease finished, so a setting larger than one lease runs over several.

After `--minutes` no cell starts; at `--stop` the running ones are stopped (their rows are
lost, the others kept). Every finished row goes into `--export` as it lands (one JSON line per
cell, as results.jsonl holds it; `--commit` fills the commit a copy without .git cannot read),
so the rows survive a lease that ends early. Exit status 0: every cell has a row; 1: a cell failed;
2: cells left without a row (the time ran out). Merge the rows into a suite folder with --merge:

    python benchmarks/parallel_cells.py cifar10-gpu --merge rows.jsonl --into benchmarks/results/bench/cifar10-gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from synthaug.bench import load_suite, read_results
from synthaug.bench.runner import MARKER, RESULTS, cell_changes
from synthaug.bench.suite import Cell, with_locations
from synthaug.recipes import get_recipe
from synthaug.utils.io import atomic_write_text

SHARED = ("generators", "stores")  # the folders generative jobs share (linked into each job folder)


@dataclass
class Job:
    cell: Cell
    name: str
    generative: bool  # trains or reads the shared generator and store
    after: list[str] = field(default_factory=list)  # jobs that must finish first
    alone: bool = False  # trains the generator: with --alone, no other cell runs beside it
    process: subprocess.Popen | None = None
    started: float | None = None
    rc: int | None = None


def writes_store(cell: Cell) -> bool:
    """Whether the cell reads a generator and writes a shared store (the real-replay and unseen
    controls do neither)."""
    if cell.generator_seed is None:
        return False
    synaug = cell.config.sections.get("synaug")
    return not (cell.config.recipe == "synaug" and synaug is not None and (synaug.replay or synaug.unseen))


def plan_jobs(suite, setting: str, out: Path, last: list[str] = (), skip: set[str] = frozenset()) -> list[Job]:
    """The setting's cells as jobs with the order they must keep (see the module's docstring);
    the cells of `last` (recipe labels: a reference such as the oracle) after the others that
    nothing waits for, the cells in `skip` (keys of rows from an earlier lease) left out: the first
    generative cell left of each generator seed trains it again (a new machine holds none)."""
    recipes = list(dict.fromkeys(c.recipe for c in suite.cells_ if c.setting == setting))  # names jobs alike in every lease
    cells = [c for c in suite.cells_ if c.setting == setting and c.key not in skip]
    jobs, firsts, trainer, writers, store_of = [], {}, {}, {}, {}
    for cell in sorted(cells, key=lambda c: (c.seed, recipes.index(c.recipe))):
        name = f"{recipes.index(cell.recipe):02d}-s{cell.seed}-g{cell.generator_seed}"
        job = Job(cell, name, writes_store(cell))
        jobs.append(job)
        if not job.generative:
            continue
        section = get_recipe(cell.config.recipe).shared_store
        store_of[name] = getattr(with_locations(cell, out / "shared"), section).store_dir if section else name
        if (cell.recipe, cell.generator_seed) in firsts:
            continue  # a later seed: placed below, once every writer of its store is known
        firsts[cell.recipe, cell.generator_seed] = name
        # a recipe's first seed fills (its part of) the store: after its generator's trainer and the store's last writer
        job.after = list(dict.fromkeys(a for a in (trainer.get(cell.generator_seed), writers.get(store_of[name])) if a))
        trainer.setdefault(cell.generator_seed, name)
        job.alone = trainer[cell.generator_seed] == name
        writers[store_of[name]] = name
    for job in jobs:  # later seeds read a store only once its last writer is done (a reader repairs what it finds)
        if job.generative and firsts[job.cell.recipe, job.cell.generator_seed] != job.name:
            job.after = [writers[store_of[job.name]]]
    blocking = {a for j in jobs for a in j.after}
    # what others wait for first, then first seeds first, then `last`
    jobs.sort(key=lambda j: (j.name not in blocking, j.cell.recipe in last, j.cell.seed, j.name))
    return jobs


def job_folder(job: Job, out: Path) -> Path:
    folder = out / "jobs" / job.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("a benchmark folder made by synthaug\n")
    if job.generative:
        for name in SHARED:
            (out / "shared" / name).mkdir(parents=True, exist_ok=True)
            link = folder / name
            if not link.is_symlink():
                link.symlink_to((out / "shared" / name).resolve(), target_is_directory=True)
    return folder


def export(out: Path, path: Path, commit: str | None) -> list[dict]:
    """Every finished row of every job folder, into `path` (atomic); returns them."""
    rows = []
    for folder in sorted((out / "jobs").glob("*")):
        for row in read_results(folder):
            if commit:  # a copy of the working tree may carry an older .git than the code it ran
                row["commit"] = commit
            rows.append(row)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_results_file(path: Path) -> list[dict]:
    """The rows of a results.jsonl or an --export file."""
    if not path.is_file():
        sys.exit(f"--skip '{path}' is not a file")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def finished(suite, rows: list[dict]) -> set[str]:
    """Keys of the cells these rows finished: a row counts when its cell is the suite's today, as
    `synthaug bench` decides (an edited cell runs again; an option added to synthaug since does not)."""
    cells = {c.key: c for c in suite.cells_}
    return {r["cell"] for r in rows if r.get("cell") in cells and not cell_changes(r, cells[r["cell"]])}


def run(args) -> int:
    suite = load_suite(args.suite)
    if args.setting not in {s.name for s in suite.settings}:
        sys.exit(f"suite '{suite.name}' has no setting '{args.setting}'")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in args.last if r not in {c.recipe for c in suite.cells_ if c.setting == args.setting}]
    if unknown:
        sys.exit(f"setting '{args.setting}' has no recipe '{unknown[0]}' (--last)")
    skip = finished(suite, [r for path in args.skip for r in read_results_file(Path(path))])
    jobs = plan_jobs(suite, args.setting, out, args.last, skip)
    if not jobs:
        print("every cell of the setting has a row (--skip): nothing to run")
        return 0
    export_path = Path(args.export) if args.export else out / "rows.jsonl"
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    # decode the data once, before the workers (each would decode and cache it at the same time)
    from synthaug.data import load_dataset
    data = jobs[0].cell.config.data
    t0 = time.perf_counter()
    load_dataset(data.dataset, image_size=data.image_size, channels=data.channels, cache_dir=data.cache_dir)
    print(f"{len(jobs)} cells, {args.workers} workers x {threads} threads; data ready in {time.perf_counter() - t0:.0f} s",
          flush=True)
    start, done, failed, dropped = time.perf_counter(), set(), set(), set()
    minutes = lambda: (time.perf_counter() - start) / 60  # noqa: E731
    pending = list(jobs)

    def stop(job: Job, sig: int):
        try:
            os.killpg(job.process.pid, sig)
        except ProcessLookupError:
            pass

    former = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a lease's end: the finally below still runs
    try:
        while True:
            for job in [j for j in jobs if j.process is not None and j.rc is None]:
                job.rc = job.process.poll()
                if job.rc is None:
                    continue
                (done if job.rc == 0 else failed).add(job.name)
                rows = export(out, export_path, args.commit)
                print(f"[{minutes():5.2f} min] {job.name} ({job.cell.recipe}, seed {job.cell.seed}) "
                      f"{'done' if job.rc == 0 else f'FAILED rc {job.rc}'} in {time.perf_counter() - job.started:.0f} s; "
                      f"{len(rows)} rows", flush=True)
                if job.rc:
                    print(tail(out / "logs" / f"{job.name}.log"), flush=True)
            while lost := [j for j in pending if any(a in failed | dropped for a in j.after)]:  # and what waits on them
                for job in lost:
                    pending.remove(job)
                    dropped.add(job.name)
                    print(f"[{minutes():5.2f} min] {job.name} ({job.cell.recipe}, seed {job.cell.seed}) dropped: "
                          f"a cell it waits for failed", flush=True)
            running = [j for j in jobs if j.process is not None and j.rc is None]
            if minutes() >= args.stop:
                for job in running:
                    stop(job, signal.SIGTERM)
                print(f"[{minutes():5.2f} min] stop: {len(running)} running cell(s) stopped, {len(pending)} not started",
                      flush=True)
                time.sleep(5)  # a grace period: a stopped cell keeps its checkpoint
                break
            ready = [j for j in pending if all(a in done for a in j.after)]
            if not running and (not ready or minutes() >= args.minutes):
                if pending:
                    print(f"[{minutes():5.2f} min] {len(pending)} cell(s) not started"
                          + (": the time is spent" if minutes() >= args.minutes else ""), flush=True)
                break
            # with --alone, a generator's cell starts first and nothing beside it until it is done
            solo = args.alone and any(j.alone for j in pending + running)
            if minutes() < args.minutes and not (solo and running):
                for job in [j for j in ready if j.alone][:1] if solo else ready[: args.workers - len(running)]:
                    folder = job_folder(job, out)
                    cmd = [sys.executable, "-c", "from synthaug.cli import main; main()", "bench", args.suite,
                           "--out", str(folder), "--setting", args.setting, "--recipe", job.cell.recipe,
                           "--seed", str(job.cell.seed), "--quiet"]
                    if job.cell.generator_seed is not None:
                        cmd += ["--generator-seed", str(job.cell.generator_seed)]
                    (out / "logs").mkdir(exist_ok=True)
                    with open(out / "logs" / f"{job.name}.log", "w") as log:
                        job.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                       start_new_session=True)
                    job.started = time.perf_counter()
                    pending.remove(job)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, former)
        for job in jobs:
            if job.process is not None:
                stop(job, signal.SIGKILL)  # the whole group, its children too
        rows = export(out, export_path, args.commit)
        missing = len(jobs) - len({r["cell"] for r in rows} & {j.cell.key for j in jobs})
        print(f"{len(rows)} rows in {export_path}; {missing} cell(s) without a row; failed: {sorted(failed) or 'none'}"
              + (f"; dropped: {sorted(dropped)}" if dropped else ""), flush=True)
    return 1 if failed else 2 if missing else 0


def merge(args) -> int:
    """Add the exported rows to a suite folder's results.jsonl (a cell's newer row replaces its older)."""
    into = Path(args.into)
    if not (into / MARKER).is_file():
        sys.exit(f"'{into}' is not a bench folder (no {MARKER})")
    rows = {r["cell"]: r for r in read_results(into)}
    new = [json.loads(line) for line in Path(args.merge).read_text().splitlines() if line.strip()]
    rows.update({r["cell"]: r for r in new})
    atomic_write_text(into / RESULTS, "".join(json.dumps(r) + "\n" for r in rows.values()))
    print(f"{len(new)} rows merged into {into / RESULTS} ({len(rows)} in all): rewrite its leaderboard with "
          f"synthaug bench {args.suite} --out {into} --report-only")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", help="a shipped suite or a suite YAML file")
    p.add_argument("--setting", help="the setting whose cells run")
    p.add_argument("--out", default="runs/parallel-cells", help="the jobs' folders (one per cell) and logs")
    p.add_argument("--workers", type=int, default=8, help="cells at a time")
    p.add_argument("--minutes", type=float, default=60.0, help="start no cell after this many minutes")
    p.add_argument("--stop", type=float, default=float("inf"), help="stop the running cells after this many minutes")
    p.add_argument("--last", action="append", default=[],
                   help="a recipe whose cells start after the others that nothing waits for (repeatable)")
    p.add_argument("--skip", action="append", default=[],
                   help="rows from an earlier lease (a results.jsonl or an --export file): their cells do not run")
    p.add_argument("--alone", action="store_true",
                   help="the cell that trains the generator runs with no other beside it (sharing the GPU slows it most)")
    p.add_argument("--export", help="the finished rows, one JSON line each (default: OUT/rows.jsonl)")
    p.add_argument("--commit", help="the commit the rows ran at (the device's copy of the tree may carry an older .git)")
    p.add_argument("--merge", help="exported rows to add to the suite folder --into")
    p.add_argument("--into", help="a suite folder (with --merge)")
    args = p.parse_args()
    if args.merge:
        if not args.into:
            p.error("--merge needs --into (the suite folder the rows join)")
        return merge(args)
    if not args.setting:
        p.error("--setting is required (or --merge)")
    shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
