"""BENCHMARKS.md's method tables, from `synthaug bench` results: each shipped suite's folder
under benchmarks/results/bench/ gets its leaderboard rewritten from its results.jsonl, and each
setting's table is spliced into BENCHMARKS.md between <!-- bench:<suite>:<setting>:start/end -->.

    python benchmarks/tables.py          # make bench-tables

Run a suite into its folder first (it resumes; finished cells are never redone), e.g.
    synthaug bench longtail-small --out benchmarks/results/bench/longtail-small
"""

from __future__ import annotations

from common import HERE, splice

from synthaug.bench import load_suite, read_results, write_leaderboard
from synthaug.bench.leaderboard import setting_tables

SUITES = ["longtail-small", "targeted-small", "fewshot-small", "cifar10-gpu"]


def main():
    for name in SUITES:
        out = HERE / "results" / "bench" / name
        suite, rows = load_suite(name), read_results(out)
        if not rows:
            print(f"{name}: no results in {out}: skipped")
            continue
        write_leaderboard(suite, rows, out)
        for setting, table in setting_tables(suite, rows).items():
            splice(HERE.parent / "BENCHMARKS.md", f"bench:{name}:{setting}", table.strip())
        print(f"{name}: {len(rows)} of {len(suite.cells_)} cells -> {out / 'leaderboard.md'}")


if __name__ == "__main__":
    main()
