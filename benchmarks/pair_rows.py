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
"""

from __future__ import annotations

import argparse
import statistics

from common import HERE, read_rows

from synthaug.verdict import paired_interval

RESULTS = HERE / "results" / "bench" / "longtail" / "results.jsonl"
WORTH = ("real replay", "unseen real, replay share 0.5")


def cells(rows: list[dict], setting: str, spec: str, metric: str = "balanced_accuracy") -> dict[tuple, float]:
    """(generator seed, classifier seed) -> score of the row `spec` names: a label, or `LABEL@g,...`
    for those generator seeds only."""
    label, gens = spec, None
    head, _, tail = spec.rpartition("@")
    if head and tail.replace(",", "").isdigit():
        label, gens = head, {int(g) for g in tail.split(",")}
    found = {(r["generator_seed"], r["seed"]): r["metrics"][metric] for r in rows
             if r["setting"] == setting and r["recipe"] == label and (gens is None or r["generator_seed"] in gens)}
    if not found:
        raise SystemExit(f"no cells of '{label}' in setting '{setting}'" + (f" at generator seeds {sorted(gens)}"
                                                                             if gens else ""))
    return found


def control(rows: list[dict], setting: str, specs: list[str], metric: str = "balanced_accuracy") -> dict[tuple, float]:
    """The cells of several rows merged into one control; a cell two of them cover is refused."""
    out = {}
    for spec in specs:
        part = cells(rows, setting, spec, metric)
        if set(part) & set(out):
            raise SystemExit(f"'{spec}' covers cells another part of the control already does")
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
        by_generator[g] = paired_interval([a[(g, s)] for s in seeds], [b[(g, s)] for s in seeds])

    def mean_over(side, s):
        return statistics.fmean(side[(g, s)] for g in gens) if {g for g, _ in side} - {None} else side[(None, s)]

    def covers(side, s):
        return all((g, s) in side for g in gens) if {g for g, _ in side} - {None} else (None, s) in side

    seeds = sorted(s for s in {s for _, s in a} if covers(a, s) and covers(b, s))
    first, second = [mean_over(a, s) for s in seeds], [mean_over(b, s) for s in seeds]
    return {"generators": gens, "seeds": seeds, "by_generator": by_generator,
            "over": paired_interval(first, second), "means": (statistics.fmean(first), statistics.fmean(second))}


def worth(rows: list[dict], setting: str, row: dict[tuple, float], replay: str, unseen: str) -> float:
    """The row's gain over real replay as a share of unseen real images' gain over it (means)."""
    base = statistics.fmean(cells(rows, setting, replay).values())
    return (statistics.fmean(row.values()) - base) / (statistics.fmean(cells(rows, setting, unseen).values()) - base)


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
    if args.metric == "balanced_accuracy" and args.setting == "MNIST-5k-LT r50":
        print(f"worth {worth(rows, args.setting, a, *args.worth):.0%} of an unseen real image")


if __name__ == "__main__":
    main()
