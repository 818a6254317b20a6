"""The leaderboard of a suite's results: per setting, each recipe's mean ± std over the seeds,
the paired 95% interval of its difference to the best classical baseline and a verdict, its
cost; in Markdown (leaderboard.md) and as a page with accuracy-vs-cost and per-class plots
(leaderboard.html).

Pairing: a recipe with several generator seeds is averaged over them for each classifier
seed, and paired with the baseline's run of that classifier seed; the interval covers the
classifier seeds' spread, the generator seeds' own spread is shown beside it."""

from __future__ import annotations

import html
import math
import statistics
from pathlib import Path

from ..utils.io import atomic_write_text
from ..verdict import compare, compare_tied

LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc", "few_shot_accuracy": "few-shot",
          "many_shot_accuracy": "many-shot", "medium_shot_accuracy": "medium-shot",
          "worst_class_accuracy": "worst class", "worst_group_accuracy": "worst group", "mean_group_accuracy": "mean group",
          "synthetic_only_accuracy": "synthetic only"}
COSTLESS = ("load_data", "generator", "generate")  # counted apart: generator training and generation


def label(metric: str) -> str:
    return LABELS.get(metric, metric.replace("_", " "))


def mean_std(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.2f} ± {scale * spread:.2f}"


def paired_text(found) -> str:
    """A verdict's paired difference and its interval, e.g. '+0.30 (-0.21 to +0.81)'; the
    difference alone where there is no interval (seeds that gave each method one score)."""
    if math.isnan(found.low):
        return f"{100 * found.difference:+.2f}"
    return f"{100 * found.difference:+.2f} ({100 * found.low:+.2f} to {100 * found.high:+.2f})"


def by_seed(rows: list[dict], metric: str) -> dict[int, float]:
    """A recipe's score per classifier seed, averaged over its generator seeds."""
    seeds: dict[int, list[float]] = {}
    for r in rows:
        if r["metrics"].get(metric) is not None:
            seeds.setdefault(r["seed"], []).append(r["metrics"][metric])
    return {s: statistics.fmean(v) for s, v in sorted(seeds.items())}


def generator_training(rows: list[dict]) -> dict[str, float]:
    """Each named generator's training seconds: the longest any row recorded (an older row of the
    cell that trained it holds only that run's part of a resumed training)."""
    trained: dict[str, float] = {}
    for r in rows:
        if r.get("generator") and r.get("generator_train_seconds"):
            trained[r["generator"]] = max(trained.get(r["generator"], 0.0), r["generator_train_seconds"])
    return trained


def costs(rows: list[dict]) -> dict[str, float]:
    """Seconds a recipe costs on its own, per cell: the classifier's stages, its images at the
    measured seconds per image of its generator(s) (else the setting's), and the training of its
    generator(s): a shared generator's once (as the generator records it, in every cell that used it;
    in older rows only in the cell that trained it), a cell's own unnamed one
    (LDMLR's feature model, trained in every cell) in each. Rates are kept per generator: LDMLR's
    features cost a thousandth of an image."""
    made: dict = {}  # generator fingerprint (None: a feature generator) -> [seconds, images]
    for r in rows:
        if r.get("generated_now"):
            rate = made.setdefault(r.get("generator"), [0.0, 0])
            rate[0] += r["seconds"].get("generate", 0.0)
            rate[1] += r["generated_now"]

    def per_image(generators) -> float | None:
        mine = [made[g] for g in generators if g in made] or list(made.values())
        return sum(s for s, _ in mine) / sum(n for _, n in mine) if mine else None

    trained = generator_training(rows)
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe]
        classifier = statistics.fmean(sum(v for k, v in r["seconds"].items() if k not in COSTLESS) for r in mine)
        images = statistics.fmean(r["images_generated"] for r in mine)
        generators = {r.get("generator") for r in mine}
        generator_seconds = [trained[g] for g in generators if g in trained]
        own = [r["seconds"]["generator"] for r in mine if r.get("generator") is None and "generator" in r["seconds"]]
        rate = per_image(generators)
        generation = images * rate if rate and images else 0.0
        out[recipe] = {"classifier": classifier, "generation": generation, "images": images,
                       "generator": (statistics.fmean(generator_seconds) if generator_seconds else 0.0)
                       + (statistics.fmean(own) if own else 0.0)}
        out[recipe]["total"] = classifier + generation + out[recipe]["generator"]
    return out


def setting_summary(rows: list[dict], setting) -> dict:
    """Everything the tables and plots show for one setting's rows."""
    metric = setting.metric if setting else rows[0]["metric"]
    recipes = list(dict.fromkeys([*(setting.recipes if setting else []), *(r["recipe"] for r in rows)]))
    recipes = [r for r in recipes if any(row["recipe"] == r for row in rows)]
    # a control adds only real images (drawn again, or the split's unseen ones); a recipe that also generates
    # (synaug.replay_share) is not one
    controls = [r for r in recipes if any((row.get("images_replayed") or row.get("images_unseen")) and not row["images_generated"]
                                          for row in rows if row["recipe"] == r)]
    classical = setting.classical if setting else [r for r in recipes if not any(
        row["images_generated"] for row in rows if row["recipe"] == r) and r not in (*controls, "oracle")]
    scores = {r: by_seed([row for row in rows if row["recipe"] == r], metric) for r in recipes}
    # ties on the metric (every worst group at 0) go to the next column's mean
    second = next((c for c in (setting.columns if setting else []) if c != metric), None)
    tiebreak = {r: by_seed([row for row in rows if row["recipe"] == r], second) for r in recipes} if second else None
    verdicts = {r: compare(scores, r, classical=classical, tiebreak=tiebreak)
                for r in recipes if r not in classical and r != "oracle"}
    # a recipe tied with its baseline on every seed (every worst group 0) is compared on the next column too
    tied = {r: t for r, v in verdicts.items() if tiebreak and (t := compare_tied(v, tiebreak))}
    return {"metric": metric, "recipes": recipes, "classical": classical, "controls": controls, "scores": scores,
            "verdicts": verdicts, "tied": tied, "costs": costs(rows), "tiebreak": second}


def precision_of(row: dict) -> str | None:
    """The arithmetic a row's classifier trained in, where the row says (its pinned `train.precision`,
    else the `auto_precision` its device chose), and its generator's where that differs."""
    settings = row.get("settings") or {}

    def used(key):
        pinned = settings.get(key)
        return pinned if pinned not in (None, "auto") else row.get("auto_precision")

    train = used("train.precision")
    generator = used("generator.precision") if row.get("images_generated") else None
    return f"{train}, generator {generator}" if generator and train and generator != train else train


def markdown_setting(name: str, rows: list[dict], summary: dict, columns: list[str]) -> str:
    metric = summary["metric"]
    columns = [metric, *[c for c in columns if c != metric and any(r["metrics"].get(c) is not None for r in rows)]]
    seeds = sorted({r["seed"] for r in rows})
    gseeds = sorted({r["generator_seed"] for r in rows if r["generator_seed"] is not None})
    # the device, and where recorded the classifier's arithmetic: train.precision where the row pins it, else what
    # `precision: auto` computed on that device (a CPU without native bfloat16: float32)
    devices = sorted({r.get("device", "CPU") + (f" ({arithmetic})" if (arithmetic := precision_of(r)) else "")
                      for r in rows})
    devices = ", ".join(devices) + (" (costs mix the devices)" if len(devices) > 1 else "")
    commits = ", ".join(sorted({str(r.get("commit")) for r in rows}))
    head = (f"**{name}**: classifier seeds {seeds}" + (f", generator seeds {gseeds}" if gseeds else "")
            + f"; on {devices}; commit {commits}")
    memo = any(r.get("memorization") is not None for r in rows)
    lines = [head, "", "| recipe | " + " | ".join(f"{label(c)} (%)" for c in columns)
             + " | vs best classical, paired (points, 95% interval) | verdict | images generated"
             + (" | memorisation ratio" if memo else "") + " | cost (min) |",
             "|---" * (len(columns) + 5 + memo) + "|"]
    best = None
    for recipe in summary["recipes"]:
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = [mean_std([r["metrics"][c] for r in mine if r["metrics"].get(c) is not None]) for c in columns]
        found = summary["verdicts"].get(recipe)
        best = best or (found and found.baseline)
        paired = paired_text(found) if found and len(found.seeds) > 1 else "-"
        verdict = found.verdict if found else ("classical baseline" if recipe in summary["classical"] else "reference")
        second = summary.get("tied", {}).get(recipe)
        if second:  # the metric equal on every seed: its interval says nothing, the next column's does
            paired = f"tied on every seed; {label(summary['tiebreak'])} {paired_text(second)}"
            verdict = f"tie; {label(summary['tiebreak'])}: {second.verdict}"
        control = recipe in summary["controls"]  # real images added: what a gain of a recipe is measured against
        if control and found:
            verdict = f"{verdict} (control)"
        cost = summary["costs"][recipe]
        mark = f"**{recipe}**" if found and found.verdict == "gain" and not control else recipe
        minutes = cost["total"] / 60
        minutes = f"{minutes:.1f}" if minutes >= 0.95 else f"{minutes:.2f}"
        ratios = [r["memorization"] for r in mine if r.get("memorization") is not None]
        ratio = (f" | {statistics.fmean(ratios):.2f}" if ratios else " | -") if memo else ""
        lines.append(f"| {mark} | " + " | ".join(cells) + f" | {paired} | {verdict} | {cost['images']:.0f}{ratio} "
                     f"| {minutes} |")
    if best:
        scores, mean = summary["scores"], lambda name: statistics.fmean(summary["scores"][name].values())
        tied = [c for c in summary["classical"] if c != best and scores.get(c) and scores.get(best)
                and mean(c) == mean(best)]
        tie = f", ties broken by highest mean {label(summary['tiebreak'])}" if tied and summary.get("tiebreak") else ""
        lines.append(f"\nBest classical baseline: {best} (highest mean {label(metric)}{tie}); each difference is paired by "
                     "classifier seed. Cost: the recipe run alone (classifier training, its images at the measured "
                     "seconds per image, its generator's training)." + _gap(summary, best))
    curves = curve_table(rows, summary["recipes"])
    return "\n".join(lines) + "\n" + (f"\n{curves}" if curves else "")


def curve_table(rows: list[dict], recipes: list[str]) -> str:
    """Test accuracy against optimiser steps (cells run with eval.curve_every), mean over the
    seeds: what a smaller step budget would have cost each recipe. '' when no cell has a curve."""
    points: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        for p in r.get("curve") or []:
            points.setdefault(r["recipe"], {}).setdefault(p["step"], []).append(p["accuracy"])
    if not points:
        return ""
    steps = sorted({s for by_step in points.values() for s in by_step})
    lines = ["Test accuracy (%) against optimiser steps, mean over the seeds (recorded only, nothing chosen by it):", "",
             "| recipe | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    for recipe in [r for r in recipes if r in points]:
        cells = [f"{100 * statistics.fmean(points[recipe][s]):.2f}" if s in points[recipe] else "-" for s in steps]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def setting_tables(suite, rows: list[dict]) -> dict[str, str]:
    """Each setting's table in Markdown, by setting name (BENCHMARKS.md splices them one by one)."""
    return {name: markdown_setting(name, mine, setting_summary(mine, setting), setting.columns if setting else [])
            for name, mine, setting in _settings(suite, rows)}


def _gap(summary: dict, best: str) -> str:
    """' Oracle 98.83: synaug closes 14% of the gap.' (the best generative recipe; a real-replay
    control is not one), or ''."""
    oracle = summary["scores"].get("oracle")
    found = [v for v in summary["verdicts"].values() if v is not None and v.recipe not in summary["controls"]]
    if not oracle or not found:
        return ""
    top = max(found, key=lambda v: v.recipe_mean)
    bar = statistics.fmean(summary["scores"][best].values())
    ceiling = statistics.fmean(oracle.values())
    if ceiling <= bar:
        return ""
    if top.recipe_mean <= bar:
        return (f" Oracle {100 * ceiling:.2f}: no generative recipe reaches the best classical baseline (the best, "
                f"{top.recipe}, {100 * (top.recipe_mean - top.baseline_mean):+.2f} points).")
    return (f" Oracle {100 * ceiling:.2f}: the best generative recipe, {top.recipe}, closes "
            f"{100 * (top.recipe_mean - bar) / (ceiling - bar):.0f}% of the gap to it.")


def leaderboard_markdown(suite, rows: list[dict]) -> str:
    out = [f"# Leaderboard: {suite.name}", "", suite.description.strip(), ""] if suite else []
    return "\n".join([*out, *setting_tables(suite, rows).values()])


def _settings(suite, rows):
    known = {s.name: s for s in (suite.settings if suite else [])}
    for name in dict.fromkeys([*known, *(r["setting"] for r in rows)]):
        mine = [r for r in rows if r["setting"] == name]
        if mine:
            yield name, mine, known.get(name)


def cost_plot(summary: dict) -> str:
    from ..report import png, subplots

    fig, ax = subplots(figsize=(6.5, 3.6))
    for recipe in summary["recipes"]:
        values = list(summary["scores"][recipe].values())
        if not values:
            continue
        x = summary["costs"][recipe]["total"] / 60
        spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
        marker = "s" if recipe in summary["classical"] else "o"
        ax.errorbar([x], [100 * statistics.fmean(values)], yerr=[spread], fmt=marker, capsize=3, label=recipe)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # no math text: the plots take text literally
    ax.set_xlabel("cost per run (minutes, log scale)")
    ax.set_ylabel(f"{label(summary['metric'])} (%)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return png(fig)


def per_class(rows: list[dict], recipes: list[str]) -> str:
    from ..report import per_class_plot

    classes = list(dict.fromkeys(c for r in rows for c in r.get("per_class", {})))
    if not classes:
        return ""
    means = {}
    for recipe in recipes:
        mine = [r["per_class"] for r in rows if r["recipe"] == recipe and r.get("per_class")]
        if mine:
            means[recipe] = {"per_class_accuracy": {c: statistics.fmean(m.get(c, 0.0) for m in mine) for c in classes}}
    return per_class_plot(classes, means)


def write_leaderboard(suite, rows: list[dict], out: str | Path) -> tuple[Path, Path]:
    from ..report import literal_text, write_page

    out = Path(out)
    text = leaderboard_markdown(suite, rows)
    atomic_write_text(out / "leaderboard.md", text)
    parts = [f"<h1>synthaug bench: {html.escape(suite.name)}</h1><p class='muted'>{html.escape(suite.description)}</p>",
             "<p class='muted'>Verdict: the paired 95% t-interval of the recipe's difference to the best classical "
             "baseline (the highest mean; never the oracle) over the classifier seeds: <b>gain</b> when it lies above 0, "
             "<b>loss</b> below, <b>no significant difference</b> when it holds 0; no interval where every seed gave "
             "each the same score.</p>"]
    with literal_text():
        for name, mine, setting in _settings(suite, rows):
            summary = setting_summary(mine, setting)
            second = label(summary["tiebreak"]) if summary["tiebreak"] else ""
            lines = [v.line_with_tie(summary["tied"].get(r), second)
                     for r, v in summary["verdicts"].items() if v is not None]
            # green for a gain of a recipe, not of a control (real images added: replay, or the split's unseen ones)
            colour = "#d9f2d9" if any(v and v.verdict == "gain" and r not in summary["controls"]
                                      for r, v in summary["verdicts"].items()) else "#f6f8fa"
            table = markdown_setting(name, mine, summary, setting.columns if setting else [])
            parts.append(f"<h2>{html.escape(name)}</h2><div class='summary' style='background:{colour}'>"
                         + "<br>".join(html.escape(line) for line in lines) + "</div>" + _table_html(table)
                         + "<h3>Accuracy against cost</h3>" + cost_plot(summary)
                         + "<h3>Per-class test accuracy, mean over the runs</h3>" + per_class(mine, summary["recipes"]))
    page = write_page(out / "leaderboard.html", f"synthaug bench: {suite.name}", "".join(parts))
    return out / "leaderboard.md", page


def _table_html(markdown: str) -> str:
    """A Markdown table (and the lines around it) as HTML."""
    out, rows = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            tag = "th" if not rows else "td"
            rows.append("<tr>" + "".join(f"<{tag}>{html.escape(c.strip('*'))}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            out.append(f"<p class='muted'>{html.escape(line.replace('**', ''))}</p>")
    return "".join(out[:1]) + "<table>" + "".join(rows) + "</table>" + "".join(out[1:])
