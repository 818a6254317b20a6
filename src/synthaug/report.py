"""report.html: one self-contained page per run (plots and image grids inline as PNG), for a
person to read: what the data lacked, what was generated, what it bought against the
baselines, and where the time went."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch

from .data.dataset import ImageDataset
from .utils.io import atomic_write_text
from .verdict import headline

STYLE = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ddd;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left} tr.recipe td{font-weight:bold;background:#eef6ff} td.note,th.note{text-align:left}
.muted{color:#666} img{max-width:100%} .summary{font-size:1.1em;background:#f6f8fa;padding:.8em 1em;border-radius:6px}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.85em}
"""
METRIC_COLUMNS = [("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc"), ("many_shot_accuracy", "many"),
                  ("medium_shot_accuracy", "medium"), ("few_shot_accuracy", "few"),
                  ("worst_class_accuracy", "worst class"), ("worst_group_accuracy", "worst group")]


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def subplots(*grid, figsize, **kwargs):
    """A figure of its own (no pyplot: a notebook's backend and figures are left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kwargs)


def pct(v):
    return "n/a" if v is None else f"{100 * v:.2f}"


def metrics_table(rows: dict[str, dict], recipe: str) -> str:
    present = [(k, label) for k, label in METRIC_COLUMNS if any(r.get(k) is not None for r in rows.values())]
    out = ["<table><tr><th>method</th>" + "".join(f"<th>{label}</th>" for _, label in present) + "</tr>"]
    for name, m in rows.items():
        cls = ' class="recipe"' if name == recipe else ""
        out.append(f"<tr{cls}><td>{html.escape(name)}</td>" + "".join(f"<td>{pct(m.get(k))}</td>" for k, _ in present) + "</tr>")
    return "".join(out) + "</table>"


def counts_plot(classes, real_counts, synthetic_counts, replayed_counts=None) -> str:
    """Training images per class: real, then real added (drawn again, or unseen), then synthetic, stacked."""
    fig, ax = subplots(figsize=(max(6, 0.6 * len(classes)), 3.2))
    x = range(len(classes))
    ax.bar(x, real_counts, label="real", color="#4c72b0")
    bottom = list(real_counts)
    if replayed_counts is not None and any(replayed_counts):
        ax.bar(x, replayed_counts, bottom=bottom, label="real, added", color="#8fb3de")
        bottom = [a + b for a, b in zip(bottom, replayed_counts)]
    ax.bar(x, synthetic_counts, bottom=bottom, label="synthetic", color="#dd8452")
    ax.set_xticks(list(x), classes, rotation=45, ha="right")
    ax.set_ylabel("training images")
    ax.legend()
    return png(fig)


def sample_grid(classes, real: ImageDataset, synthetic: ImageDataset | None, per_side: int = 8) -> str:
    """One row per class: up to `per_side` real images, a gap, up to `per_side` synthetic ones."""
    rows = len(classes)
    fig, axes = subplots(rows, 1, figsize=(2 * per_side * 0.55 + 1, rows * 0.62))
    axes = [axes] if rows == 1 else axes
    for c, ax in enumerate(axes):
        strip = [_tile(real, c, per_side), torch.full((real.channels, real.image_size[0], 4), 255, dtype=torch.uint8)]
        if synthetic is not None and len(synthetic):
            strip.append(_tile(synthetic, c, per_side))
        img = torch.cat(strip, dim=2)
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if real.channels == 1 else None, vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(classes[c], rotation=0, ha="right", va="center", fontsize=8)
        if synthetic is not None and len(synthetic) and not bool((synthetic.labels == c).any()):
            ax.text(1.5 * per_side * real.image_size[1] + 4, real.image_size[0] / 2, "none needed",
                    ha="center", va="center", fontsize=8, color="0.4")
    axes[0].set_title("real  |  synthetic", fontsize=9)
    return png(fig)


def _tile(ds: ImageDataset, c: int, n: int) -> torch.Tensor:
    imgs = ds.images[ds.labels == c][:n]
    h, w = ds.image_size
    out = torch.full((ds.channels, h, n * w), 255, dtype=torch.uint8)
    for i, im in enumerate(imgs):
        out[:, :, i * w : (i + 1) * w] = im
    return out


def per_class_plot(classes, rows: dict[str, dict]) -> str:
    fig, ax = subplots(figsize=(max(6, 0.8 * len(classes)), 3.2))
    width = 0.8 / max(1, len(rows))
    for i, (name, m) in enumerate(rows.items()):
        acc = [100 * m["per_class_accuracy"].get(c, 0) for c in classes]
        ax.bar([j + i * width for j in range(len(classes))], acc, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(classes))], classes, rotation=45, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8, ncol=min(4, len(rows)))
    return png(fig)


def group_table(test: dict) -> str:
    """Each (class, group) cell's test accuracy (%), a row per class; the worst cell in bold."""
    cells = test["group_accuracy"]
    groups = sorted({g for row in cells.values() for g in row}, key=int)
    worst = test.get("worst_group") or {}
    out = ["<table><tr><th>class</th>" + "".join(f"<th>group {g}</th>" for g in groups) + "</tr>"]
    for c, row in cells.items():
        tds = []
        for g in groups:
            v = pct(row.get(g))
            bold = c == worst.get("class") and g == str(worst.get("group"))
            tds.append(f"<td><b>{v}</b></td>" if bold else f"<td>{v}</td>")
        out.append(f"<tr><td>{html.escape(c)}</td>{''.join(tds)}</tr>")
    return "".join(out) + "</table>"


def selection_section(sel: dict) -> str:
    shortfall = (f" {sel['shortfall']} planned images found no candidate that passed (the filter kept fewer)."
                 if sel.get("shortfall") else "")
    scores = ""
    if sel.get("kept_score_mean") is not None and sel.get("dropped_score_mean") is not None:
        scores = f" Mean score of the kept images {sel['kept_score_mean']:.3f}, of the dropped {sel['dropped_score_mean']:.3f}."
    return (f"<h2>Selection</h2><p>{sel['candidates']} candidates generated ({sel['overgenerate']:g} x the plan), "
            f"<b>{sel['kept']}</b> kept by <b>{html.escape(sel['method'])}</b> in the feature space "
            f"'{html.escape(sel['features'])}'.{scores}{shortfall} Every candidate's score and whether it was kept are in "
            f"the store's metadata.jsonl (<code>select_{html.escape(sel['method'])}</code>, "
            f"<code>selected_{html.escape(sel['method'])}</code>).</p>")


VALIDATION_ROWS = (  # key, name, what it says
    ("frechet_distance", "Frechet distance", "distance between Gaussian fits of the two sets' features (0: same)"),
    ("kernel_distance", "kernel distance (KID)", "unbiased MMD, cubic kernel (about 0: same distribution)"),
    ("precision", "precision", "share of synthetic images inside the real k-NN manifold (fidelity)"),
    ("recall", "recall", "share of real images inside the synthetic manifold (variety)"),
    ("density", "density", "real neighbourhoods holding each synthetic image, / k (about 1: like real)"),
    ("coverage", "coverage", "share of real images with a synthetic image in their neighbourhood"),
    ("domain_gap", "domain classifier accuracy", "real vs synthetic told apart by a logistic regression (0.5: not at all)"),
)


def validation_section(v: dict, classes: list[str]) -> str:
    if v.get("skipped"):
        return f"<h2>Synthetic set validation</h2><p class='muted'>Skipped: {html.escape(v['skipped'])}.</p>"
    rows = []
    for key, name, meaning in VALIDATION_ROWS:
        value = v.get(key)
        if isinstance(value, dict):
            value = f"{value['mean']:.4f} ± {value['std']:.4f}"
        elif value is not None:
            value = f"{value:.3f}"
        rows.append(f"<tr><td>{name}</td><td>{value}</td><td class='muted note'>{meaning}</td></tr>")
    if v.get("cas"):
        rows.append(f"<tr><td>train on synthetic, test on real (CAS)</td><td>{pct(v['cas']['balanced_accuracy'])}%</td>"
                    f"<td class='muted note'>balanced test accuracy over the {v['cas']['classes']} classes the synthetic set "
                    "has, of a classifier trained on the synthetic images alone</td></tr>")
    diversity = v.get("diversity_ratio", {}).get("per_class", {})
    heads = "".join(f"<th>{html.escape(classes[int(c)])}</th>" for c in diversity)
    cells = "".join(f"<td>{r:.2f}</td>" for r in diversity.values())
    cas = v.get("cas", {}).get("per_class", {})  # by class name; the weakest first
    weakest = sorted(cas.items(), key=lambda kv: kv[1])
    return (f"<h2>Synthetic set validation</h2><p class='muted'>{v['synthetic_images']} synthetic against "
            f"{v['real_images']} real training images (the same count per class), in the feature space "
            f"'{html.escape(v['features'])}'.</p>"
            f"<table><tr><th>metric</th><th>value</th><th class='note'>what it says</th></tr>{''.join(rows)}</table>"
            + (f"<p class='muted'>Diversity per class: mean pairwise feature distance, synthetic over real "
               f"(below 1: less varied than the real images).</p><table><tr><th>class</th>{heads}</tr>"
               f"<tr><td>ratio</td>{cells}</tr></table>" if diversity else "")
            + (f"<p class='muted'>CAS per class, the weakest first: the share of a class's real test images that "
               f"the classifier trained on the synthetic images alone gets right (low: that class's images do not "
               f"show it).</p><table><tr><th>class</th>{''.join(f'<th>{html.escape(c)}</th>' for c, _ in weakest)}"
               f"</tr><tr><td>CAS</td>{''.join(f'<td>{pct(a)}%</td>' for _, a in weakest)}</tr></table>"
               if cas else ""))


def show(ax, image: torch.Tensor):
    ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255)


def image_row(images: torch.Tensor, per_row: int) -> str:
    rows = (len(images) + per_row - 1) // per_row
    fig, axes = subplots(rows, per_row, figsize=(per_row * 0.6, rows * 0.6))
    for k, ax in enumerate(axes.flatten() if hasattr(axes, "flatten") else [axes]):
        ax.axis("off")
        if k < len(images):
            show(ax, images[k])
    return png(fig)


def curve_plot(history: list[dict], x: str, y: str, xlabel: str, ylabel: str) -> str:
    fig, ax = subplots(figsize=(6, 2.8))
    ax.plot([h[x] for h in history], [h[y] for h in history], marker="o" if len(history) < 20 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return png(fig)


def literal_text():
    """A matplotlib context in which plot text is literal: a class named `$x$` is not math."""
    import matplotlib

    return matplotlib.rc_context({"text.parse_math": False})


def write_report(path: str | Path, metrics: dict, real: ImageDataset, synthetic: ImageDataset | None,
                 config_yaml: str, recipe_sections=None, *, replayed: ImageDataset | None = None) -> Path:
    """Write the run's report.html; `recipe_sections()`: the recipe's own sections (HTML, its
    `report`), placed after the shared ones; `replayed`: real images added (drawn again or unseen) and trained on
    (shown in the counts, never as samples of the generator)."""
    with literal_text():
        sections = [recipe_sections()] if recipe_sections is not None else []
        return _write_report(path, metrics, real, synthetic, config_yaml, sections, replayed)


def _write_report(path, metrics, real, synthetic, config_yaml, sections, replayed=None) -> Path:
    recipe = metrics["recipe"]
    rows = {recipe: metrics["test"], **{k: v["test"] for k, v in metrics.get("baselines", {}).items() if k != recipe}}
    classes = real.classes
    parts = [f"<h1>synthaug run: {html.escape(recipe)} on {html.escape(str(metrics['dataset']))}</h1>",
             f"<p class='muted'>{html.escape(metrics.get('description', ''))} · seed {metrics['seed']}</p>"]
    parts.append(f"<div class='summary'>{_summary(metrics, rows)}</div>")
    grouped = metrics["test"].get("worst_group_accuracy") is not None
    parts.append(f"<h2>Test metrics (%), {'every (class, group) cell of the test set' if grouped else 'balanced test set'}"
                 "</h2>" + metrics_table(rows, recipe))
    synthetic_counts = [0] * len(classes)
    if synthetic is not None and len(synthetic):
        synthetic_counts = synthetic.class_counts().tolist()
    replayed_counts = replayed.class_counts().tolist() if replayed is not None and len(replayed) else None
    parts.append("<h2>Training images per class, before and after</h2>"
                 + counts_plot(classes, real.class_counts().tolist(), synthetic_counts, replayed_counts))
    parts.append("<h2>Real and synthetic samples</h2>" + sample_grid(classes, real, synthetic))
    memo = metrics.get("memorization")
    if memo and memo.get("per_class"):
        cells = "".join(f"<td>{v:.2f}</td>" for v in memo["per_class"].values())
        heads = "".join(f"<th>{html.escape(k)}</th>" for k in memo["per_class"])
        parts.append("<h2>Memorisation check</h2><p class='muted'>Median distance of synthetic images to the nearest "
                     "real training image of their class, over the same for held-out real images: about 1 means new "
                     "images, well below 1 means copies.</p>"
                     f"<table><tr><th>class</th>{heads}</tr><tr><td>ratio</td>{cells}</tr></table>")
    if (metrics.get("synthetic") or {}).get("selection"):
        parts.append(selection_section(metrics["synthetic"]["selection"]))
    if metrics.get("validation"):
        parts.append(validation_section(metrics["validation"], classes))
    parts.extend(sections)  # the recipe's own (its `report`)
    parts.append("<h2>Per-class test accuracy</h2>" + per_class_plot(classes, rows))
    if metrics["test"].get("group_accuracy"):
        parts.append("<h2>Test accuracy per (class, group) cell</h2>"
                     f"<p class='muted'>{html.escape(recipe)}; the worst cell in bold.</p>" + group_table(metrics["test"]))
    generator = metrics.get("generator")
    if generator and generator.get("kind") == "stable-diffusion" and not generator.get("history"):
        parts.append(f"<h2>Generator</h2><p>Stable Diffusion through diffusers, {html.escape(generator.get('source', ''))}: "
                     f"{html.escape(str(generator.get('path', '')))} (fingerprint {html.escape(str(generator.get('fingerprint')))})"
                     "; not fine-tuned on this data.</p>")
    if generator and generator.get("history"):
        members = generator.get("members")  # an ensemble: its first member's curve (the others' run alike)
        where = ", ".join(str(m.get("path", "")) for m in members) if members else generator.get("path", "")
        history = [h for h in generator["history"] if h.get("member", 0) == 0]
        parts.append(f"<h2>Generator training</h2><p class='muted'>{html.escape(generator.get('source', ''))}: "
                     f"{html.escape(where)}{f'; the first of {len(members)} generators' if members else ''}</p>"
                     + curve_plot(history, "step", "loss", "step", "denoising loss"))
    if metrics.get("history"):
        parts.append("<h2>Classifier training</h2>" + curve_plot(metrics["history"], "epoch", "loss", "epoch", "training loss"))
    stage_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in metrics["seconds"].items())
    parts.append(f"<h2>Time per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>{stage_rows}</table>")
    parts.append(f"<h2>Config</h2><details><summary>resolved config</summary><pre>{html.escape(config_yaml)}</pre></details>")
    return write_page(path, f"synthaug: {recipe}", "".join(parts))


def write_page(path: str | Path, title: str, body: str) -> Path:
    """A self-contained HTML page with the report's style, renamed into place in one step."""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")
    path = Path(path)
    atomic_write_text(path, page)
    return path


def _summary(metrics: dict, rows: dict[str, dict]) -> str:
    recipe = metrics["recipe"]
    key, second = headline(rows[recipe])
    label = key.replace("_", " ").replace("worst group", "worst-group")
    ours = rows[recipe][key]
    text = f"<b>{html.escape(recipe)}</b>: {label} {pct(ours)}%."
    baselines = {k: v for k, v in rows.items() if k not in (recipe, "oracle") and v.get(key) is not None}
    if baselines:
        best = max(baselines, key=lambda k: (baselines[k][key], baselines[k][second]))
        delta = 100 * (ours - baselines[best][key])
        text += f" Best baseline: {html.escape(best)} at {pct(baselines[best][key])}% ({delta:+.2f} points)."
        if metrics.get("baseline_steps"):
            text += (f" The baselines trained for the recipe's {metrics['baseline_steps']:,} optimiser steps (to the "
                     "end of that epoch), so a gain over them is not more steps.")
        if rows.get("oracle", {}).get(key) is not None:
            gap = rows["oracle"][key] - baselines[best][key]
            if gap > 0:
                text += f" Oracle {pct(rows['oracle'][key])}%: {100 * (ours - baselines[best][key]) / gap:.0f}% of the gap closed."
    syn = metrics.get("synthetic")
    if syn and syn.get("replay"):
        text += f" {syn['images']} real images drawn again (the replay control), none generated."
    elif syn:
        text += f" {syn['images']} synthetic images" + (
            f" and {syn['replayed']} real images drawn again (synaug.replay_share)" if syn.get("replayed") else "") + (
            f" and {syn['unseen']} real images the split left out (synaug.unseen, the perfect-generator control)."
            if syn.get("unseen") else ".")
    if metrics.get("auto"):
        text += f"<br>Chosen by <code>recipe: auto</code>: {html.escape(metrics['auto']['why'])}."
    return text


def write_seeds_report(path: str | Path, summary: dict, table_markdown: str) -> Path:
    """The page of a multi-seed run: the verdict at the top, then each method's mean ± std
    and links to every seed's own report."""
    import os
    import statistics

    from .runs import METRIC_NAMES

    verdict = summary.get("verdict")
    grouped = summary.get("metric") == "worst_group_accuracy"
    metric = METRIC_NAMES[summary.get("metric", "balanced_accuracy")]
    headline = html.escape(summary["verdict_line"] or "no classical baseline to compare with")
    colour = {"gain": "#d9f2d9", "loss": "#f8d7d7"}.get((verdict or {}).get("verdict"), "#eeeeee")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{100 * statistics.fmean(v.values()):.2f}</td>"
        f"<td>{100 * (statistics.stdev(v.values()) if len(v) > 1 else 0.0):.2f}</td>"
        f"<td>{' '.join(f'{100 * x:.2f}' for x in v.values())}</td></tr>"
        for name, v in summary["scores"].items())
    links = " · ".join(
        f"<a href='{html.escape(os.path.relpath(Path(d) / 'report.html', Path(path).parent))}'>seed {s}</a>"
        for s, d in summary["runs"].items())
    body = (f"<h1>synthaug: {html.escape(summary['recipe'])} on {html.escape(str(summary['dataset']))}, "
            f"seeds {', '.join(map(str, summary['seeds']))}</h1>"
            f"<div class='summary' style='background:{colour}'><b>Verdict</b>: {headline}. The interval is the paired "
            f"95% t-interval of the difference in {metric} over the seeds (none where every seed gave each the "
            "same score); the best classical baseline is the "
            "one with the highest mean (the oracle is a reference, not a baseline)"
            + "; baselines tied on it are told apart by their accuracy.</div>"
            f"<h2>{metric.capitalize()} (%), {'every (class, group) cell' if grouped else 'balanced test set'}</h2>"
            "<table><tr><th>method</th><th>mean</th><th>std</th>"
            f"<th>per seed</th></tr>{rows}</table><h2>Each seed's report</h2><p>{links}</p>"
            f"<details><summary>as Markdown</summary><pre>{html.escape(table_markdown)}</pre></details>")
    return write_page(path, f"synthaug: {summary['recipe']}, {len(summary['seeds'])} seeds", body)
