"""A run: config -> data -> split -> recipe -> run folder with the resolved config,
metrics.json and the trained classifier. Interrupted runs resume from their checkpoint;
finished runs are not redone."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from .config import RunConfig, dump_config
from .data import load_dataset
from .errors import SynthaugError
from .recipes import get_recipe
from .task import make_task
from .utils.io import atomic_write_json, atomic_write_text


def prepare_run_dir(run_dir: Path, config: RunConfig, *, force: bool = False) -> bool:
    """Create `run_dir` with config.yaml. Returns True if the run already finished. A folder
    holding another config is refused rather than overwritten."""
    config_file = run_dir / "config.yaml"
    if run_dir.exists() and force:
        shutil.rmtree(run_dir)
    if config_file.exists():
        if yaml.safe_load(config_file.read_text()) != yaml.safe_load(dump_config(config)):
            raise SynthaugError(
                f"run folder '{run_dir}' holds a run with a different config: set another name (name=...) or pass --force"
            )
        return (run_dir / "metrics.json").exists()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SynthaugError(f"'{run_dir}' exists and is not a synthaug run: set another name (name=...) or remove it")
    atomic_write_text(config_file, dump_config(config))
    return False


def train_run(config: RunConfig, *, progress: bool = True, force: bool = False, compare: bool = False,
              ) -> tuple[Path, dict]:
    """Run one recipe as configured; returns the run folder and the metrics written there.

    With `compare`, the baselines in `config.report.baselines` are trained in the same run on
    the same split (each saved as it finishes, so an interrupted run keeps them), and
    `report.html` is written."""
    import json

    recipe = get_recipe(config.recipe)
    baselines = [get_recipe(b) for b in config.report.baselines] if compare else []
    t0 = time.perf_counter()
    data = load_dataset(config.data.dataset, image_size=config.data.image_size, channels=config.data.channels,
                        cache_dir=config.data.cache_dir)
    task = make_task(data, config.split)
    if recipe.check is not None:
        recipe.check(task, config)
    load_seconds = time.perf_counter() - t0
    # Everything above can fail on bad input; nothing is written before this point.
    run_dir = Path(config.output_dir) / config.run_name()
    if prepare_run_dir(run_dir, config, force=force):
        return run_dir, json.loads((run_dir / "metrics.json").read_text())
    result = recipe.fn(task, config, workdir=run_dir, progress=progress)
    result.model.save_pretrained(run_dir / "classifier")
    validation = None
    if config.validate.enabled and result.synthetic is not None:
        from .select.stage import validation_stage

        validation = validation_stage(task, result.synthetic, config, result.model, workdir=run_dir, progress=progress)
    compared, trained = {}, {}
    for baseline in baselines:
        done_file = run_dir / "baselines" / f"{baseline.name}.json"
        if not done_file.exists():
            b = baseline.fn(task, config, workdir=run_dir / "baselines" / baseline.name, progress=progress, trained=trained)
            atomic_write_json(done_file, {"test": b.metrics, "seconds": b.seconds})
            shutil.rmtree(run_dir / "baselines" / baseline.name, ignore_errors=True)
        compared[baseline.name] = json.loads(done_file.read_text())
    metrics = {
        "recipe": config.recipe,
        "description": recipe.description,
        "dataset": data.name,
        "seed": config.seed,
        "task": task.describe(),
        "test": result.metrics,
        "seconds": {"load_data": load_seconds, **result.seconds},
        "history": result.history,
        **result.extra,
    }
    if validation is not None:
        metrics["validation"] = validation
    if compared:
        metrics["baselines"] = compared
    if compare and config.report.html:
        from .report import write_report

        write_report(run_dir / "report.html", metrics, task.train, result.synthetic, dump_config(config))
    atomic_write_json(run_dir / "metrics.json", metrics)
    for leftover in ("checkpoint", "cas-checkpoint"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    return run_dir, metrics
