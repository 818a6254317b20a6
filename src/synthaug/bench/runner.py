"""`synthaug bench SUITE`: run every cell of a suite into one folder, resumably.

    <out>/results.jsonl      one row per finished cell (the newest run of each cell)
    <out>/leaderboard.md     per setting: mean ± std, the paired 95% interval against the best
    <out>/leaderboard.html   classical baseline and a verdict; the page adds plots
    <out>/cells/             one run folder per cell (an interrupted cell resumes from its checkpoint)
    <out>/generators/        trained generators, by fingerprint: one per setting and generator seed
    <out>/stores/            synthetic stores, shared by the classifier seeds of a plan

A finished cell is never redone. A cell whose config changed since it ran (an edited suite) is
refused, or re-run with `force`; `rerun` re-runs chosen cells whose config did not change (the
code did). The cells a `force` or `rerun` runs afresh are listed in <out>/.synthaug-pending.json
until each finishes, so that one interrupted goes on where it stopped: the cells it redid are
kept, the one it was running resumes from its checkpoint. Every check that can fail runs before
the first write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import SynthaugError
from ..utils.io import atomic_write_text, marked, write_marker
from ..utils.paths import check_folder, make_folders
from .suite import Cell, Suite, changes, settings_of, with_locations

MARKER = ".synthaug-run"
RESULTS = "results.jsonl"
LOCK = ".synthaug-bench.lock"  # the pid of the bench writing into the folder
PENDING = ".synthaug-pending.json"  # the cells `force` or `rerun` run afresh, by command and state (`Pending`)


def check_lock(out: Path):
    """Refuse a folder another live `synthaug bench` is writing to (a stale lock is taken over)."""
    try:
        pid = int((out / LOCK).read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stale: that process is gone
    except PermissionError:
        pass
    if pid != os.getpid():
        raise SynthaugError(f"another synthaug bench (pid {pid}) is writing to '{out}': wait for it to finish or "
                            "stop it, then run again")


def read_results(out: Path) -> list[dict]:
    """The rows of `out`/results.jsonl (a damaged line is skipped, with a warning)."""
    path = Path(out) / RESULTS
    rows = []
    if not path.is_file():
        return rows
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path} line {n} is not JSON: skipped (its cell runs again)", file=sys.stderr)
            continue
        if not _well_formed(row):
            print(f"{path} line {n} is not a bench row (a field is missing or of the wrong type): skipped (its cell "
                  "runs again)", file=sys.stderr)
            continue
        rows.append(row)
    return rows


NUMBER = (int, float)
# the fields the bench and its leaderboard read from every row, by type (None allowed for the second group)
ROW_FIELDS = {"cell": str, "setting": str, "recipe": str, "seed": int, "metrics": dict, "seconds": dict,
              "images_generated": int, "generated_now": int}
OPTIONAL_FIELDS = {"generator_seed": int, "generator": str, "generator_train_seconds": NUMBER, "memorization": NUMBER,
                   "per_class": dict, "settings": dict}


def _well_formed(row) -> bool:
    """Whether a results line has the fields a bench row has, of their types."""
    def of(value, kind) -> bool:
        return isinstance(value, kind) and not isinstance(value, bool)

    return (isinstance(row, dict) and all(of(row.get(key), kind) for key, kind in ROW_FIELDS.items())
            and all(key in row and (row[key] is None or of(row[key], kind)) for key, kind in OPTIONAL_FIELDS.items())
            and all(v is None or of(v, NUMBER) for v in row["metrics"].values())
            and all(of(v, NUMBER) for v in row["seconds"].values()))


class Pending:
    """The cells `force` or `rerun` chose to run afresh, one batch per command, each cell by state:
    "chosen" (its old run folder still there), "started" (its fresh run began: resume it) or
    "redone". A batch is dropped once every cell of it is redone, so the same command, interrupted
    and run again, goes on with its batch (the cells it redid are kept) and a later one starts
    its own. A damaged list is read as none, with a warning (its cells run afresh again)."""

    STATES = ("chosen", "started", "redone")

    def __init__(self, out: Path, keys: set[str]):
        self.path, self.batches = Path(out) / PENDING, []
        try:
            found = json.loads(self.path.read_text()).get("batches")
            assert isinstance(found, list) and all(isinstance(b, dict) and set(b.values()) <= set(self.STATES)
                                                   for b in found)
        except FileNotFoundError:
            found = []
        except (OSError, ValueError, AttributeError, AssertionError):
            print(f"{self.path} cannot be read: ignored", file=sys.stderr)
            found = []
        for batch in found:  # a cell edited out of the suite is dropped, and a batch left with nothing to do
            batch = {k: v for k, v in batch.items() if k in keys}
            if any(v != "redone" for v in batch.values()):
                self.batches.append(batch)
        self.new: dict[str, str] = {}

    def states(self) -> dict[str, str]:
        return {k: v for batch in [*self.batches, self.new] for k, v in batch.items()}

    def get(self, key: str) -> str | None:
        return self.states().get(key)

    def set(self, key: str, state: str):
        batch = next((b for b in self.batches if key in b), None)
        (batch if batch is not None else self.new)[key] = state

    def save(self):
        """Write the batches left (none: the file goes)."""
        left = [b for b in [*self.batches, self.new] if any(v != "redone" for v in b.values())]
        if left:
            atomic_write_text(self.path, json.dumps({"batches": left}, indent=1) + "\n")
        else:
            self.path.unlink(missing_ok=True)


def check_out(out: Path):
    """The suite's folder: new, empty, or one synthaug made. Writes nothing."""
    check_folder(out, "--out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise SynthaugError(f"--out '{out}' is a file or a link: give a folder")
    if out.is_dir() and any(out.iterdir()) and not marked(out, MARKER):
        raise SynthaugError(f"--out '{out}' holds files synthaug did not make (no {MARKER}): give a new or empty folder")
    if (out / "config.yaml").is_file() or (out / "summary.json").is_file():  # they share the marker
        raise SynthaugError(f"--out '{out}' is a run's folder or a --seeds summary, not a benchmark's: give a new or "
                            "empty folder")


def cell_changes(row: dict, cell: Cell) -> list[str]:
    """How `cell` differs from the settings its finished `row` ran with; empty for the same cell
    (an option added to synthaug since, at its former value, is no change)."""
    return [] if row.get("fingerprint") == cell.fingerprint else changes(row.get("settings") or {}, cell.config)


def plan(suite: Suite, out: Path, *, force: bool = False, rerun: bool = False,
         pending: dict[str, str] | None = None) -> tuple[list[Cell], list[Cell], dict[str, dict]]:
    """(cells to run, of them the ones to run afresh, finished rows by cell). Raises on a changed
    cell without `force` (finished, or stopped in its run and changed since); with `rerun`, every
    finished cell runs afresh but one an interrupted rerun redid (`pending`), and the cells that
    one left run whether or not `rerun` is given."""
    pending = pending or {}
    from ..runs import started_elsewise

    done = {r["cell"]: r for r in read_results(out)}
    todo, again, changed, first = [], [], [], None
    for cell in suite.cells_:
        row = done.get(cell.key)
        if row is None:
            config = with_locations(cell, out)
            found = started_elsewise(Path(config.output_dir) / config.run_name(), config)
            if found:  # its run folder holds a started run of another config (stopped, then changed): afresh, with force
                changed.append(cell)
                again.append(cell)
                first = first or found[0]
            else:
                todo.append(cell)
            continue
        found = cell_changes(row, cell)
        if found:
            changed.append(cell)
            first = first or found[0]
        if found or (rerun and pending.get(cell.key) != "redone") or pending.get(cell.key) in ("chosen", "started"):
            again.append(cell)
    if changed and not force:
        raise SynthaugError(f"{len(changed)} cell(s) of suite '{suite.name}' changed since they ran (first: "
                            f"'{changed[0].key}', {first}): pass --force to re-run them, or give another --out")
    return todo + again, again, done


def preflight(cells: list[Cell], out: Path, metrics: dict[str, str] | None = None) -> list:
    """Every check a cell's run would make before writing, for every cell to run: config,
    device, model, store folders, data, split, the recipe's own check and the model folders it
    reads (`check_folders_fit`); and that the setting's `metrics` (by setting) can be measured.
    Returns the datasets loaded, their cache writes held back (`LoadedDataset.save_cache`)."""
    from ..data import load_dataset
    from ..recipes import get_recipe
    from ..runs import check_task
    from ..runs import preflight as run_preflight
    from ..task import make_task

    tasks, loaded = {}, []
    for cell in cells:
        config = with_locations(cell, out)
        run_preflight(config)
        key = json.dumps([config.data.__dict__, config.split.__dict__], sort_keys=True, default=str)
        if key not in tasks:
            data = load_dataset(config.data.dataset, image_size=config.data.image_size, channels=config.data.channels,
                                cache_dir=config.data.cache_dir, defer_cache=True)
            loaded.append(data)
            try:
                tasks[key] = make_task(data, config.split)
            except SynthaugError as e:
                raise SynthaugError(f"setting '{cell.setting}': {e}") from None
        try:
            check_task(tasks[key], config, [get_recipe(config.recipe)])
            if (metrics or {}).get(cell.setting) == "worst_group_accuracy" and tasks[key].train.groups is None:
                raise SynthaugError("its metric is worst_group_accuracy and its split has no groups: use "
                                    "split.kind=colored, or another metric")
        except SynthaugError as e:
            raise SynthaugError(f"cell '{cell.key}': {e}") from None
    return loaded


def run_suite(suite: Suite, out: str | Path, *, force: bool = False, rerun: bool = False, progress: bool = True,
              echo=print, settings: list[str] = (), recipes: list[str] = (),
              generator_seeds: list[int] = (), seeds: list[int] = ()) -> list[dict]:
    """Run the suite's unfinished cells (and, with `force`, its changed ones), only those of
    `settings`, `recipes`, `generator_seeds` (then only generative cells) and classifier `seeds`
    when given; returns the rows of results.jsonl. `rerun` runs the chosen finished cells afresh, their run folders
    replaced (trained generators and stores whose fingerprints still match are reused), for when
    the code behind a recipe changed.
    Stops starting cells once `suite.minutes` are spent (run again to go on)."""
    from ..runs import clear_run_dir, started_elsewise, train_run
    from .leaderboard import write_leaderboard

    out = Path(out)
    check_out(out)
    check_lock(out)
    for name, known, what in ((settings, {s.name for s in suite.settings}, "setting"),
                              (recipes, {r for s in suite.settings for r in s.recipes}, "recipe")):
        for n in name:
            if n not in known:
                raise SynthaugError(f"suite '{suite.name}' has no {what} '{n}': use one of {', '.join(sorted(known))}")
    scope = [c for c in suite.cells_ if not settings or c.setting in settings]  # the chosen settings' cells
    known = {c.generator_seed for c in scope if c.generator_seed is not None}
    for g in generator_seeds:
        if g not in known:
            raise SynthaugError(f"suite '{suite.name}' has no generator seed {g}: use one of "
                                f"{', '.join(map(str, sorted(known))) or 'none (no recipe generates)'}")
    known = {c.seed for c in scope}
    for s in seeds:
        if s not in known:
            raise SynthaugError(f"suite '{suite.name}' has no classifier seed {s}: use one of "
                                f"{', '.join(map(str, sorted(known)))}")
    if rerun and not (settings or recipes or generator_seeds or seeds):
        raise SynthaugError("--rerun runs finished cells afresh: choose them with --recipe, --setting, "
                            "--generator-seed and/or --seed")

    def chosen(c: Cell) -> bool:
        return ((not settings or c.setting in settings) and (not recipes or c.recipe in recipes)
                and (not generator_seeds or c.generator_seed in generator_seeds) and (not seeds or c.seed in seeds))

    pending = Pending(out, {c.key for c in suite.cells_})
    cells, changed, done = plan(suite, out, force=force, rerun=rerun, pending=pending.states())
    cells = [c for c in cells if chosen(c)]
    changed = [c for c in changed if chosen(c)]
    loaded = preflight(cells, out, {s.name: s.metric for s in suite.settings})
    # every check passed: the first write
    make_folders(out, "--out")
    write_marker(out / MARKER, "a benchmark folder made by synthaug\n")
    write_marker(out / LOCK, f"{os.getpid()}\n")
    for data in loaded:  # the data caches before any cell's old run folder is cleared
        data.save_cache()
    del loaded
    kept = sum(v == "redone" for v in pending.states().values())
    for cell in changed:
        if pending.get(cell.key) in (None, "redone"):
            pending.set(cell.key, "chosen")
    pending.save()
    env = environment(suite.device)
    start = time.perf_counter()
    total = len(suite.cells_)
    afresh = {c.key for c in changed} | {k for k, v in pending.states().items() if v != "redone"}
    finished = sum(c.key in done and c.key not in afresh for c in suite.cells_)
    echo(f"suite {suite.name}: {total} cells, {finished} finished, {len(cells)} to run -> {out}")
    if kept:
        echo(f"going on with an interrupted --rerun or --force: the {kept} cell(s) it redid are kept (to redo them "
             f"too, remove {pending.path})")
    try:
        for n, cell in enumerate(cells, 1):
            spent = (time.perf_counter() - start) / 60
            if suite.minutes is not None and spent >= suite.minutes:
                echo(f"budget of {suite.minutes:g} min spent after {n - 1} cell(s): run the same command to go on")
                break
            config = with_locations(cell, out)
            t0 = time.perf_counter()
            cell_dir = Path(config.output_dir) / config.run_name()
            fresh = cell in changed and (pending.get(cell.key) != "started" or bool(started_elsewise(cell_dir, config)))
            if fresh:  # its old run folder goes first, then the list says its fresh run is the one to resume
                clear_run_dir(cell_dir, config)
                pending.set(cell.key, "started")
                pending.save()
            run_dir, metrics = train_run(config, progress=progress, force=fresh)
            row = result_row(suite, cell, metrics, run_dir, out, time.perf_counter() - t0, env)
            done[cell.key] = row
            atomic_write_text(out / RESULTS, "".join(json.dumps(r) + "\n" for r in done.values()))
            if pending.get(cell.key) is not None:
                pending.set(cell.key, "redone")
                pending.save()
            echo(f"[{n}/{len(cells)}] {cell.key}: {cell.config.recipe} {row['metric']} "
                 f"{100 * row['metrics'][row['metric']]:.2f} ({row['wall_seconds']:.0f} s)")
    finally:
        (out / LOCK).unlink(missing_ok=True)
        rows = list(done.values())
        if rows:
            write_leaderboard(suite, rows, out)
    return rows


def result_row(suite: Suite, cell: Cell, metrics: dict, run_dir: Path, out: Path, wall: float, env: dict) -> dict:
    test = metrics["test"]
    synthetic = metrics.get("synthetic") or {}
    generator = metrics.get("generator") or {}
    metric = next(s.metric for s in suite.settings if s.name == cell.setting)
    found = {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    alone = ((metrics.get("utilgen") or {}).get("synthetic_only") or {}).get("accuracy")
    if alone is not None:  # UtilGen's classifier trained on its final synthetic set alone
        found["synthetic_only_accuracy"] = alone
    # the generator (by fingerprint) and its training time as it records it: all of it, in every cell that used
    # it (also one that resumed an interrupted training, or found it trained by a cell that then stopped); a
    # cell's own unnamed generator (LDMLR's feature model) is costed by its stage's seconds instead
    trained, name = None, None
    if generator.get("path"):
        name = Path(generator["path"]).name
    elif generator.get("members"):  # an ensemble (generator.ensemble): its members' folders, their training summed
        name = "+".join(Path(m["path"]).name for m in generator["members"])
    if name:
        trained = generator.get("train_seconds") or (metrics["seconds"].get("generator") if generator.get("trained_now") else None)
    return {
        "suite": suite.name, "setting": cell.setting, "recipe": cell.recipe, "recipe_name": cell.config.recipe,
        "generator_seed": cell.generator_seed, "seed": cell.seed, "cell": cell.key, "fingerprint": cell.fingerprint,
        "metric": metric,
        "metrics": found, "memorization": (metrics.get("memorization") or {}).get("median"),
        "per_class": test.get("per_class_accuracy", {}),
        **({"per_group": test["group_accuracy"]} if test.get("group_accuracy") else {}),
        "seconds": metrics.get("seconds", {}), "wall_seconds": wall,
        # a replay control's images are real ones drawn again: none generated, none costed
        "images_generated": 0 if synthetic.get("replay") else synthetic.get("images", 0),
        "images_replayed": synthetic.get("images", 0) if synthetic.get("replay") else synthetic.get("replayed", 0),
        **({"images_unseen": synthetic["unseen"]} if synthetic.get("unseen") else {}),  # synaug.unseen's real images
        "generated_now": synthetic.get("generated_now", 0),
        "generator": name,
        "generator_train_seconds": trained,
        "train_steps": cell.config.train.steps, "run": str(run_dir.relative_to(out)),
        # test accuracy against optimiser steps (eval.curve_every), when the cell recorded it
        **({"curve": metrics["curve"]} if metrics.get("curve") else {}),
        "settings": json.loads(json.dumps(settings_of(cell.config), default=str)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **env,
    }


def environment(device: str = "auto") -> dict:
    import torch

    from .. import __version__
    from ..utils.runtime import bfloat16_native, machine_kind, resolve_device

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=here).stdout.strip() or None
        # the code that runs is the commit only if the package's files are as committed
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here.parent)],
                                 capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()
        commit = f"{commit}+changes" if commit and changed else commit
    except (OSError, subprocess.SubprocessError):
        commit = None
    chosen = resolve_device(device)
    device = torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else chosen.type.upper()
    # what `precision: auto` computes in here: a CPU without native bfloat16 runs float32, about twice as slow
    auto_precision = "bfloat16" if bfloat16_native(chosen) else "float32"
    return {"device": device, "machine": machine_kind(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "auto_precision": auto_precision,
            "commit": commit, "version": __version__}
