"""Does the agreement filter keep the right images of the coloured generator? The images of a
longtail-suite store, read by the independent judges of `coloured_generator.py` (the digit by an
oracle trained on randomly coloured MNIST-5k, the colour exactly), split by what the filter did.

    python benchmarks/coloured_filter.py --agreement 0.99      # generator seeds 0 and 1, where their rows ran

The filter ("synaug, cells sqrt + agreement filter", `select.method=agreement` at
`select.overgenerate=1`) scores the store of "synaug, generator Min-SNR 5, cells sqrt" in place: a
generated image is kept when the group reader (trained on the real split, each (group, class) cell
drawn equally) reads its intended colour and the scorer (the same, on the digits) gives its
intended digit at least 0.5. Its readers are trained on the split's real images only, so at 0.99,
where 57 of the 90 minority cells have no image, they read minority cells worse than the judges.
Per generator seed and for majority / minority cells: the share kept, and the share with digit
and colour both right among all, kept and dropped images (the filter's precision against the
generator's own rate), and the share of the right images it keeps (its recall).

Run after the filter's bench row (it reads the scores the row wrote into the store). A finished
(setting, seed) is a row of benchmarks/results/coloured_filter.jsonl; the table goes to
benchmarks/results/coloured_filter.md and into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from coloured_generator import OUT, SETTINGS, read_colour
from common import HERE, append_row, environment, read_rows, splice, trained_oracle

from synthaug.bench.suite import load_suite, with_locations
from synthaug.classify import predict_logits
from synthaug.data import load_dataset
from synthaug.store import SyntheticStore
from synthaug.task import make_task

RECIPE = "synaug, cells sqrt + agreement filter"
RESULTS = HERE / "results" / "coloured_filter.jsonl"


def judge(setting: str, seed: int, oracle, classes: list[str], env) -> dict | None:
    cell = next(c for c in load_suite("longtail").cells_
                if c.setting == setting and c.recipe == RECIPE and c.generator_seed == seed)
    config = with_locations(cell, OUT)
    store = SyntheticStore(config.synaug.store_dir, classes)
    if not store.rows() or not all("selected_agreement" in r.get("scores", {}) for r in store.rows()):
        print(f"{setting}, generator seed {seed}: skipped, its store has no filter scores yet (run the bench row "
              f"'{RECIPE}' on this generator seed first)", flush=True)
        return None
    images = store.load()
    rows = images.info["rows"]
    kept = torch.tensor([r["scores"]["selected_agreement"] for r in rows])
    read = torch.tensor([r["scores"].get("group_read", True) for r in rows])
    digit = predict_logits(oracle, images.images).argmax(1).cpu() == images.labels
    both = digit & (read_colour(images.images) == images.groups)
    out = {"setting": setting, "generator_seed": seed, "images": len(rows), **env}
    for name, cells in (("majority", images.groups == images.labels), ("minority", images.groups != images.labels)):
        k, r, b = kept[cells], read[cells], both[cells]
        out[name] = {"images": int(cells.sum()), "kept": k.float().mean().item(), "group_read": r.float().mean().item(),
                     "right_all": b.float().mean().item(), "right_kept": b[k].float().mean().item() if k.any() else None,
                     "right_dropped": b[~k].float().mean().item() if (~k).any() else None,
                     "recall": k[b].float().mean().item() if b.any() else None}
    return out


def table(rows: list[dict]) -> str:
    lines = ["The generated images of the sqrt SYNAuG's store, split by the agreement filter; "
             "'right': digit (oracle) and colour (exact reader) both right. Mean over the generator seeds (n).", "",
             "| setting | cells | n | images | kept | group reader agrees | right, all | right, kept "
             "| right, dropped | right ones kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS.values():
        mine = [r for r in rows if r["setting"] == setting]
        for cells in ("majority", "minority") if mine else ():
            values = {k: [r[cells][k] for r in mine if r[cells][k] is not None] for k in mine[0][cells]}
            m = {k: statistics.fmean(v) if v else float("nan") for k, v in values.items()}
            pct = {k: f"{100 * v:.1f}%" for k, v in m.items()}
            lines.append(f"| {setting.split(', ')[1]} | {cells} | {len(mine)} | {m['images']:.0f} | {pct['kept']} "
                         f"| {pct['group_read']} | {pct['right_all']} | {pct['right_kept']} | {pct['right_dropped']} "
                         f"| {pct['recall']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agreement", default="0.95", choices=list(SETTINGS), help="the coloured setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="generator seeds")
    args = parser.parse_args()
    setting = SETTINGS[args.agreement]
    config = with_locations(next(c for c in load_suite("longtail").cells_ if c.setting == setting and c.recipe == RECIPE), OUT)
    task = make_task(load_dataset(config.data.dataset), config.split)
    oracle = trained_oracle(task.oracle, config.train)
    done = {r["generator_seed"] for r in read_rows(RESULTS) if r["setting"] == setting}
    env = environment()
    for seed in args.seeds:
        if seed not in done:
            if (row := judge(setting, seed, oracle, task.train.classes, env)) is None:
                continue
            append_row(RESULTS, row)
            print(f"{setting}, generator seed {seed}: minority kept {100 * row['minority']['kept']:.1f}%, right among "
                  f"kept {100 * row['minority']['right_kept']:.1f}% (all {100 * row['minority']['right_all']:.1f}%)",
                  flush=True)
    text = table(read_rows(RESULTS))
    (HERE / "results" / "coloured_filter.md").write_text(text)
    splice(HERE.parent / "BENCHMARKS.md", "coloured-filter", text)
    print(text)


if __name__ == "__main__":
    main()
