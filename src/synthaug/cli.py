"""The `synthaug` command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import SynthaugError
from .verdict import headline

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generative data augmentation for image classification.")
console = Console()

CONFIG_ARG = typer.Argument(None, help="YAML config (see configs/); defaults apply without one")
SET_OPT = typer.Option([], "--set", "-s", help="override a config key: -s train.epochs=5 (repeatable)")
SEED_OPT = typer.Option(None, help="shortcut for -s seed=...")
FORCE_OPT = typer.Option(False, help="delete an existing run folder of the same name first")
QUIET_OPT = typer.Option(False, help="no progress bars")
VALIDATION_MARKER = ".synthaug-validation"  # marks a validate --out folder as synthaug's


@app.command()
def datasets(
    name: str = typer.Argument(None, help="describe this dataset (a name, an ImageFolder path or hf:<dataset>)"),
    image_size: int = typer.Option(None, help="resize to this size"),
):
    """List the built-in datasets, or describe one."""
    from .data import SOURCES, load_dataset

    if name is None:
        table = Table("name", "description")
        for source in SOURCES.values():
            table.add_row(source.name, source.description)
        console.print(table)
        console.print("Also: any ImageFolder path (<folder>/<class>/*.png, optionally train/ and test/), or hf:<folder or hub id>.")
        return
    data = load_dataset(name, image_size=image_size)
    info = data.describe()
    console.print(f"[bold]{info['name']}[/]: {info['description']}")
    table = Table("split", "images", "channels", "size", "classes", "per class (min / max)")
    for part in ("train", "test"):
        d = info[part]
        counts = list(d["class_counts"].values())
        table.add_row(part, str(d["images"]), str(d["channels"]), "x".join(map(str, d["image_size"])),
                      str(d["classes"]), f"{min(counts)} / {max(counts)}")
    console.print(table)
    console.print("classes: " + ", ".join(data.classes))


@app.command()
def recipes():
    """List the recipes (baselines and generative methods)."""
    from .recipes import RECIPES

    table = Table("recipe", "description")
    for r in RECIPES.values():
        table.add_row(r.name, r.description)
    console.print(table)


@app.command()
def config(config_file: Path = CONFIG_ARG, overrides: list[str] = SET_OPT):
    """Print the resolved config (defaults + file + overrides)."""
    from .config import dump_config, load_config

    console.print(dump_config(load_config(config_file, overrides)), end="", markup=False, highlight=False)


@app.command()
def train(
    config_file: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    recipe: str = typer.Option(None, help="shortcut for -s recipe=..."),
    dataset: str = typer.Option(None, help="shortcut for -s data.dataset=..."),
    seed: int = SEED_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
):
    """Train and evaluate one recipe (no baselines, no report); writes a run folder."""
    from .config import load_config
    from .runs import train_run

    shortcuts = [f"{k}={v}" for k, v in (("recipe", recipe), ("data.dataset", dataset), ("seed", seed)) if v is not None]
    cfg = load_config(config_file, [*overrides, *shortcuts])
    run_dir, metrics = train_run(cfg, progress=not quiet, force=force, keep_checkpoint=True)
    print_metrics(metrics)
    console.print(f"run folder: {run_dir}")


@app.command()
def run(
    config_file: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    seed: int = SEED_OPT,
    seeds: str = typer.Option(None, help="several classifier seeds, e.g. 0,1,2: every seed's run, then the paired "
                                         "95% interval against the best classical baseline and a verdict"),
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
):
    """The whole loop: data, split, generator (trained or cached), plan, generate, train,
    evaluate against the baselines, report.html."""
    from .config import load_config
    from .runs import seeds_run, train_run

    if seeds is not None:
        if seed is not None:
            raise SynthaugError("give --seed or --seeds, not both")
        try:
            chosen = [int(part) for part in seeds.split(",") if part.strip()]
        except ValueError:
            raise SynthaugError(f"--seeds {seeds!r}: give comma-separated whole numbers, e.g. --seeds 0,1,2") from None
        cfg = load_config(config_file, overrides)
        summary_dir, summary = seeds_run(cfg, chosen, progress=not quiet, force=force)
        console.print(summary["verdict_line"] or "no classical baseline to compare with")
        console.print(f"summary: {summary_dir / 'summary.md'}")
        if (summary_dir / "report.html").exists():
            console.print(f"report: {summary_dir / 'report.html'}")
        return
    cfg = load_config(config_file, [*overrides, *([f"seed={seed}"] if seed is not None else [])])
    run_dir, metrics = train_run(cfg, progress=not quiet, force=force, compare=True)
    print_metrics(metrics)
    if (run_dir / "report.html").exists():
        console.print(f"report: {run_dir / 'report.html'}")
    console.print(f"run folder: {run_dir}")


@app.command()
def analyse(
    data: str = typer.Argument(..., help="a built-in dataset, an ImageFolder path or hf:<dataset>"),
    config_file: Path = typer.Option(None, "--config", "-c", help="config whose split (and classifier) to use"),
    overrides: list[str] = SET_OPT,
    probe_steps: int = typer.Option(300, help="optimiser steps of the probe training (0: no probe)"),
    json_out: Path = typer.Option(None, "--json", help="also write the analysis to this JSON file (a new file)"),
    quiet: bool = QUIET_OPT,
):
    """Look at the data before generating: class counts and imbalance, the smallest classes,
    exact and near duplicates, image statistics, a short probe training (each class's
    difficulty, the slow-learnable share), and the recipe to try first, with the benchmark
    results behind it."""
    from .analyse import analyse as run_analysis
    from .analyse import summary_lines
    from .config import load_config
    from .utils.io import write_new_json

    cfg = load_config(config_file, [*overrides, f"data.dataset={data}"])
    if probe_steps < 0:
        raise SynthaugError(f"--probe-steps must be >= 0, got {probe_steps}")
    if json_out is not None and (json_out.exists() or json_out.is_symlink() or not json_out.parent.is_dir()):
        raise SynthaugError(f"--json '{json_out}': give a new file in an existing folder (synthaug overwrites nothing)")
    found = run_analysis(cfg, probe_steps=probe_steps, progress=not quiet)
    console.print(f"[bold]{found['dataset']}[/], {found['split']['kind']} split", highlight=False, soft_wrap=True)
    for line in summary_lines(found):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        if not write_new_json(json_out, found):
            raise SynthaugError(f"--json '{json_out}' appeared while the analysis ran: give a new file (synthaug "
                                "overwrites nothing)")
        console.print(f"written: {json_out}")


@app.command()
def bench(
    suite: str = typer.Argument(..., help="a shipped suite (smoke, longtail-small, longtail, fewshot-small, fewshot, "
                                          "targeted-small, full, cifar10-gpu, fewshot-cifar10-gpu) or a suite YAML file"),
    out: Path = typer.Option(None, help="the suite's folder (default: runs/bench-<suite>)"),
    force: bool = typer.Option(False, help="re-run the cells whose config changed since they ran"),
    rerun: bool = typer.Option(False, help="run the chosen finished cells (--recipe, --setting, --generator-seed, --seed) afresh, replacing "
                                           "their rows: for a code change behind a recipe"),
    report_only: bool = typer.Option(False, "--report-only", help="only rewrite the leaderboard from results.jsonl"),
    setting: list[str] = typer.Option([], help="run only this setting's cells (repeatable)"),
    recipe: list[str] = typer.Option([], help="run only this recipe label's cells (repeatable)"),
    generator_seed: list[int] = typer.Option([], help="run only the generative cells of this generator seed "
                                                      "(repeatable)"),
    seed: list[int] = typer.Option([], help="run only the cells of this classifier seed (repeatable): with "
                                           "--recipe, one cell per process, for several processes on one GPU"),
    quiet: bool = QUIET_OPT,
):
    """Run a benchmark suite (every setting x recipe x seed, resumable) and write results.jsonl
    and a leaderboard: mean ± std, the paired 95% interval against the best classical
    baseline and a verdict, cost and per-class plots."""
    from .bench import load_suite, read_results, run_suite, write_leaderboard
    from .bench.runner import check_out

    found = load_suite(suite)
    out = out or Path("runs") / f"bench-{found.name}"
    if report_only:
        check_out(out)
        rows = read_results(out)
        if not rows:
            raise SynthaugError(f"'{out}' has no results.jsonl rows: run the suite first (without --report-only)")
        md, page = write_leaderboard(found, rows, out)
    else:
        run_suite(found, out, force=force, rerun=rerun, progress=not quiet, settings=setting, recipes=recipe,
                  generator_seeds=generator_seed, seeds=seed, echo=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
        md, page = out / "leaderboard.md", out / "leaderboard.html"
    console.print(f"leaderboard: {md}")
    console.print(f"page: {page}")


def validation_folder(output_dir: str, synthetic: Path) -> Path:
    """`validate`'s default out folder: the images' folder name and a hash of its full path, so two
    runs' `synthetic/` stores never share one."""
    import hashlib

    from .utils.paths import check_name

    where = synthetic.resolve()
    return Path(output_dir) / check_name(f"validate-{where.name[:64]}-{hashlib.sha256(str(where).encode()).hexdigest()[:8]}",
                                         "the folder name")


@app.command()
def validate(
    synthetic: Path = typer.Argument(..., help="a synthetic store (a run's synthetic/ folder) or a folder of class subfolders"),
    config_file: Path = typer.Option(None, "--config", "-c", help="config whose data and split are the real images"),
    overrides: list[str] = SET_OPT,
    classifier: Path = typer.Option(None, help="compare in this classifier's features (a save_pretrained folder)"),
    out: Path = typer.Option(None, help="where validation.json goes (default: <output_dir>/validate-<folder name>-<hash of its path>/)"),
    quiet: bool = QUIET_OPT,
):
    """Validate a synthetic image set against the real training split: Frechet distance, KID,
    precision/recall, density/coverage, diversity, domain gap, memorisation and the accuracy
    of a classifier trained on the synthetic images alone (CAS)."""
    from .config import load_config
    from .data import load_dataset
    from .data.sources import read_class_folder
    from .select.features import check_features, check_features_fit
    from .select.stage import scorer_for, validation_skip, validation_stage
    from .store import SPLIT, SyntheticStore, is_store
    from .task import make_task
    from .utils.io import marked, write_marker
    from .utils.paths import check_folder, make_folders, remove_created

    cfg = load_config(config_file, [*overrides, *([f"validate.features={classifier}"] if classifier else [])])
    check_features(cfg.validate.features, "--classifier" if classifier else "validate.features")
    if not synthetic.is_dir():
        raise SynthaugError(f"'{synthetic}' is not a folder: give a synthetic store or a folder of class subfolders")
    if synthetic.name == SPLIT and is_store(synthetic.parent):  # a store's image folder: the store
        synthetic = synthetic.parent
    # under synthaug's output folder, never beside the user's images; a folder synthaug did not make is refused
    out = out or validation_folder(cfg.output_dir, synthetic)
    check_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not marked(out, VALIDATION_MARKER):
        raise SynthaugError(f"--out '{out}' holds files synthaug did not make: give a new or empty folder")
    data = load_dataset(cfg.data.dataset, image_size=cfg.data.image_size, channels=cfg.data.channels,
                        cache_dir=cfg.data.cache_dir, defer_cache=True)
    task = make_task(data, cfg.split)
    check_features_fit(cfg.validate.features, "--classifier" if classifier else "validate.features", task.train)
    if is_store(synthetic):
        store = SyntheticStore(synthetic, task.train.classes)
        store.verify()
        images = store.load()
    else:
        images = read_class_folder(synthetic, task.train)
    if images.images.shape[1:] != task.train.images.shape[1:]:
        shape = "x".join(map(str, images.images.shape[1:]))
        raise SynthaugError(f"'{synthetic}' holds {shape} images and the config's data is "
                            f"{'x'.join(map(str, task.train.images.shape[1:]))}: give the config that made them "
                            "(-c <run folder>/config.yaml), or set data.image_size / data.channels / split.kind to match")
    skip = validation_skip(task, images, cfg)
    if skip:  # before anything is written
        raise SynthaugError(f"cannot validate '{synthetic}': {skip}")
    created, was_marked = make_folders(out, "--out"), marked(out, VALIDATION_MARKER)
    try:
        write_marker(out / VALIDATION_MARKER, "a validation folder made by synthaug\n")
        data.save_cache()  # after the folder, which is undone if the cache cannot be written
    except (OSError, SynthaugError) as e:
        if not was_marked:
            (out / VALIDATION_MARKER).unlink(missing_ok=True)
        remove_created(created)
        if isinstance(e, SynthaugError):
            raise
        raise SynthaugError(f"cannot write to --out '{out}' ({e.strerror or e}): choose a folder you can write to") from None
    model = None
    if cfg.validate.features == "classifier":  # no classifier given: one trained on the real split
        model = scorer_for(task.train, cfg, out / "classifier", progress=not quiet)
    result = validation_stage(task, images, cfg, model, workdir=out, progress=not quiet)
    if result.get("skipped"):
        raise SynthaugError(f"cannot validate '{synthetic}': {result['skipped']}")
    table = Table("metric", "value", title=f"{result['synthetic_images']} synthetic vs {result['real_images']} real images")
    for key in ("frechet_distance", "precision", "recall", "density", "coverage", "domain_gap"):
        table.add_row(key, f"{result[key]:.4f}")
    table.add_row("kernel_distance", f"{result['kernel_distance']['mean']:.4f} ± {result['kernel_distance']['std']:.4f}")
    if result["diversity_ratio"]["mean"] is not None:
        table.add_row("diversity_ratio (mean)", f"{result['diversity_ratio']['mean']:.3f}")
    if result["memorization"]["median"] is not None:
        table.add_row("memorization (median)", f"{result['memorization']['median']:.3f}")
    if result.get("cas"):
        table.add_row("CAS balanced accuracy", f"{100 * result['cas']['balanced_accuracy']:.2f}")
        weakest = sorted(result["cas"].get("per_class", {}).items(), key=lambda kv: kv[1])[:3]
        if weakest:
            table.add_row("CAS, weakest classes", ", ".join(f"{escape(name)} {100 * a:.1f}" for name, a in weakest))
    console.print(table)
    console.print(f"written: {out / 'validation.json'}")


def print_metrics(metrics: dict):
    test = metrics["test"]
    table = Table("metric", "value", title=f"{metrics['recipe']} on {metrics['dataset']} (seed {metrics['seed']})")
    for key in ("accuracy", "balanced_accuracy", "many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy",
                "worst_class_accuracy", "worst_group_accuracy"):
        if test.get(key) is not None:
            table.add_row(key, f"{100 * test[key]:.2f}")
    table.add_row("seconds", f"{sum(v for k, v in metrics['seconds'].items() if k != 'load_data'):.1f}")
    console.print(table)
    if metrics.get("baselines"):
        keys = headline(test)
        if test.get("worst_group_accuracy") is None and test.get("few_shot_accuracy") is not None:
            keys += ("few_shot_accuracy",)
        compare = Table("method", *("accuracy" if k == "accuracy" else k.removesuffix("_accuracy").replace("_", " ") + " acc"
                                    for k in keys),
                        title="against the baselines (same split, same run)")
        others = {k: v for k, v in metrics["baselines"].items() if k != metrics["recipe"]}  # older runs held it
        for name, m in {metrics["recipe"]: metrics, **others}.items():
            compare.add_row(name, *("n/a" if m["test"].get(k) is None else f"{100 * m['test'][k]:.2f}" for k in keys))
        console.print(compare)


def main():
    try:
        rc = app(standalone_mode=False, prog_name="synthaug")
        if isinstance(rc, int) and rc:  # typer turns Ctrl-C into exit code 130
            if rc == 130:
                Console(stderr=True).print("interrupted: run the same command again to resume")
            sys.exit(rc)
    except SynthaugError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # the CLI parser's own usage errors (typer vendors click): one line, like ours
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            command = getattr(getattr(e, "ctx", None), "command_path", None) or "synthaug"
            Console(stderr=True).print(f"[bold red]error:[/] {escape(e.format_message().rstrip('.'))} (see '{command} --help')",
                                       highlight=False, soft_wrap=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU: the batch sizes are the user's to lower
            Console(stderr=True).print("[bold red]error:[/] out of GPU memory: lower train.batch_size, generator.batch_size "
                                       "or generator.sampling_batch_size, then run the same command again to resume",
                                       highlight=False, soft_wrap=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
