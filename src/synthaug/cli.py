"""The `synthaug` command."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import SynthaugError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generative data augmentation for image classification.")
console = Console()

CONFIG_ARG = typer.Argument(None, help="YAML config (see configs/); defaults apply without one")
SET_OPT = typer.Option([], "--set", "-s", help="override a config key: -s train.epochs=5 (repeatable)")
SEED_OPT = typer.Option(None, help="shortcut for -s seed=...")
FORCE_OPT = typer.Option(False, help="delete an existing run folder of the same name first")
QUIET_OPT = typer.Option(False, help="no progress bars")


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
    """Train and evaluate a classifier with a baseline recipe; writes a run folder."""
    from .config import load_config
    from .runs import train_run

    shortcuts = [f"{k}={v}" for k, v in (("recipe", recipe), ("data.dataset", dataset), ("seed", seed)) if v is not None]
    cfg = load_config(config_file, [*overrides, *shortcuts])
    run_dir, metrics = train_run(cfg, progress=not quiet, force=force)
    print_metrics(metrics)
    console.print(f"run folder: {run_dir}")


@app.command()
def run(
    config_file: Path = CONFIG_ARG,
    overrides: list[str] = SET_OPT,
    seed: int = SEED_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
):
    """The whole loop: data, split, generator (trained or cached), plan, generate, train,
    evaluate against the baselines, report.html."""
    from .config import load_config
    from .runs import train_run

    cfg = load_config(config_file, [*overrides, *([f"seed={seed}"] if seed is not None else [])])
    run_dir, metrics = train_run(cfg, progress=not quiet, force=force, compare=True)
    print_metrics(metrics)
    if (run_dir / "report.html").exists():
        console.print(f"report: {run_dir / 'report.html'}")
    console.print(f"run folder: {run_dir}")


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
        compare = Table("method", "balanced acc", "few-shot acc", title="against the baselines (same split, same run)")
        for name, m in {metrics["recipe"]: metrics, **metrics["baselines"]}.items():
            few = m["test"].get("few_shot_accuracy")
            compare.add_row(name, f"{100 * m['test']['balanced_accuracy']:.2f}", "n/a" if few is None else f"{100 * few:.2f}")
        console.print(compare)


def main():
    try:
        rc = app(standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer turns Ctrl-C into exit code 130
            if rc == 130:
                Console(stderr=True).print("interrupted: run the same command again to resume")
            sys.exit(rc)
    except SynthaugError as e:
        from rich.markup import escape

        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: run the same command again to resume")
        sys.exit(130)
    except Exception as e:  # the CLI parser's own usage errors (typer vendors click)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
