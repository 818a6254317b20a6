"""Pair a longtail row with another, generator by generator and over the generators (issue 21).

    python benchmarks/pair_rows.py "synaug, replay share 0.5, generator CBDM 0.1, novel filter" \
        "synaug, replay share 0.5, generator CBDM 0.1"
    python benchmarks/pair_rows.py "synaug, replay share 0.5, generator CBDM 0.1" \
        "synaug, Min-SNR float32, replay share 0.5@0,1" "synaug, replay share 0.5, generator seeds 2 and 3@2,3"

The readings in BENCHMARKS.md that pair rows over several generator seeds come from here. The
baseline is one row, or a control made of several rows on the generator seeds each covers:
`LABEL@0,1` takes that row's generator seeds 0 and 1 (the row itself, too, can be made of several:
`--also LABEL@2,3`). For each generator seed the script gives the
paired 95% interval over the classifier seeds. Over the generators, it pairs the per-classifier-seed
means over the generator seeds both rows have. A row without a generator (a classical baseline)
pairs by classifier seed with the other row's mean over its generators.

The worth is the row's gain over the real-replay control, as a share of what unseen real images
gain over it (`--worth REPLAY UNSEEN`; default MNIST-5k-LT's "real replay" and "unseen real, replay
share 0.5"). The script prints and writes nothing.

The intervals vary the classifier seeds with the generators held fixed: they speak for these trained
generators, and the spread between generators is shown per generator seed, not folded in.
"""

from __future__ import annotations

import argparse
import statistics

from common import HERE, read_rows

from synthaug.verdict import paired_interval

RESULTS = HERE / "results" / "bench" / "longtail" / "results.jsonl"
WORTH = ("real replay", "unseen real, replay share 0.5")


def cells(rows: list[dict], setting: str, spec: str, metric: str = "balanced_accuracy") -> dict[tuple, float]:
    """(generator seed, classifier seed) -> score of the row `spec` names: a label; `LABEL@g,...` for
    those generator seeds only; or `LABEL@-` for a row that uses no generator though its cells carry a
    generator seed (real replay, the unseen control), read as generator-free."""
    labels = {r["recipe"] for r in rows if r["setting"] == setting}
    label, gens, free = spec, None, False
    head, _, tail = spec.rpartition("@")
    if spec not in labels and head:
        label = head
        if tail == "-":
            free = True
        elif all(part.isdigit() for part in tail.split(",")):
            gens = {int(part) for part in tail.split(",")}
        else:
            raise SystemExit(f"'{spec}': after '@', generator seeds (0,1) or '-' (no generator)")
    found = {}
    for r in rows:
        if r["setting"] == setting and r["recipe"] == label and (gens is None or r["generator_seed"] in gens):
            cell = (None if free else r["generator_seed"], r["seed"])
            if cell in found:
                raise SystemExit(f"'{label}' has two cells at generator seed {cell[0]}, classifier seed {cell[1]}")
            found[cell] = r["metrics"][metric]
    if not found:
        raise SystemExit(f"no cells of '{label}' in setting '{setting}'")
    missing = sorted(gens - {g for g, _ in found}) if gens else []
    if missing:
        raise SystemExit(f"'{label}' has no cells at generator seeds {missing}")
    return found


def control(rows: list[dict], setting: str, specs: list[str], metric: str = "balanced_accuracy") -> dict[tuple, float]:
    """The cells of several rows merged into one control; a cell two of them cover is refused."""
    out = {}
    for spec in specs:
        part = cells(rows, setting, spec, metric)
        if set(part) & set(out):
            raise SystemExit(f"'{spec}' covers cells another part of the control already does")
        if out and ({g is None for g, _ in part} != {g is None for g, _ in out}):
            raise SystemExit(f"'{spec}': a control cannot mix rows with and without a generator")
        out.update(part)
    return out


def pair(a: dict[tuple, float], b: dict[tuple, float]) -> dict:
    """Row `a` against `b`: per generator seed both have, and over the generators (per classifier seed,
    the mean over the generator seeds; a side without a generator is its own mean)."""
    gens_a, gens_b = {g for g, _ in a} - {None}, {g for g, _ in b} - {None}
    gens = sorted(gens_a & gens_b) if gens_a and gens_b else sorted(gens_a | gens_b)
    if gens_a and gens_b and not gens:
        raise SystemExit(f"the two rows share no generator seed ({sorted(gens_a)} against {sorted(gens_b)})")
    by_generator = {}
    for g in sorted(gens_a & gens_b):
        seeds = sorted(s for gg, s in a if gg == g and (g, s) in b)
        if seeds:
            by_generator[g] = paired_interval([a[(g, s)] for s in seeds], [b[(g, s)] for s in seeds])

    def per_seed(side, generated):  # classifier seed -> its score, averaged over `gens` where the side has them
        if not generated:
            return {s: v for (_, s), v in side.items()}
        return {s: statistics.fmean(side[(g, s)] for g in gens) for s in {s for _, s in side}
                if all((g, s) in side for g in gens)}

    mine, theirs = per_seed(a, gens_a), per_seed(b, gens_b)
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        raise SystemExit("the two rows share no classifier seed with every generator seed's cell")
    first, second = [mine[s] for s in seeds], [theirs[s] for s in seeds]
    return {"generators": gens, "seeds": seeds, "by_generator": by_generator,
            "over": paired_interval(first, second), "means": (statistics.fmean(first), statistics.fmean(second))}


def worth(rows: list[dict], setting: str, row: dict[tuple, float], replay: str, unseen: str) -> float | None:
    """The row's gain over real replay as a share of unseen real images' gain over it (means); None
    where unseen images gain nothing over replay (no share to speak of)."""
    base = statistics.fmean(cells(rows, setting, replay).values())
    scale = statistics.fmean(cells(rows, setting, unseen).values()) - base
    return (statistics.fmean(row.values()) - base) / scale if scale > 0 else None


def interval_text(m: float, low: float, high: float) -> str:
    return f"{100 * m:+.2f} ({100 * low:+.2f} to {100 * high:+.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("row", help="the row's label (or LABEL@generator seeds)")
    parser.add_argument("--also", action="append", default=[], help="another row making up the row, as LABEL@seeds")
    parser.add_argument("baseline", nargs="+", help="the row it is paired with, or the rows of a merged control")
    parser.add_argument("--setting", default="MNIST-5k-LT r50")
    parser.add_argument("--metric", default="balanced_accuracy", help="balanced_accuracy, few_shot_accuracy, ...")
    parser.add_argument("--worth", nargs=2, metavar=("REPLAY", "UNSEEN"), default=WORTH)
    args = parser.parse_args()
    rows = read_rows(RESULTS)
    a = control(rows, args.setting, [args.row, *args.also], args.metric)
    b = control(rows, args.setting, args.baseline, args.metric)
    result = pair(a, b)
    for g, interval in result["by_generator"].items():
        print(f"generator seed {g}: {interval_text(*interval)}")
    print(f"over generator seeds {result['generators']} x classifier seeds {result['seeds']}: "
          f"{100 * result['means'][0]:.2f} against {100 * result['means'][1]:.2f}, {interval_text(*result['over'])}")
    for name, side in (("row", a), ("baseline", b)):
        left = sorted({g for g, _ in side} - {None} - set(result["generators"]))
        if left:
            print(f"note: the {name}'s generator seeds {left} have no partner and are left out")
    if args.metric == "balanced_accuracy":
        share = worth(rows, args.setting, a, *args.worth)
        print(f"worth {share:.0%} of an unseen real image" if share is not None
              else "worth: unseen real images gain nothing over real replay here")


if __name__ == "__main__":
    main()
