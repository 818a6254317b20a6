"""Is a difference real? The paired comparison that every claim of a gain needs: over the
same seeds, the mean difference between a recipe and the best classical baseline, its 95%
t-interval, and a plain verdict (gain, no significant difference, loss; no interval from one seed,
or from seeds that gave each method one score)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

# Baselines trained on data the user does not have: reference lines, never the bar to beat.
UPPER_BOUNDS = ("oracle",)
# the verdict where every seed gave each method the same score, and the two differ: one replicate
UNCHANGED_BY_SEEDS = "the seeds change neither score: no interval"


def headline(test: dict) -> tuple[str, str]:
    """The metric a run is judged on and the one that tells its ties apart, from its test
    metrics: worst-group accuracy where the test has groups, else balanced accuracy; then
    accuracy, which tells apart baselines tied on the first (every worst group 0 is common
    at strong spurious correlation)."""
    grouped = test.get("worst_group_accuracy") is not None
    return ("worst_group_accuracy" if grouped else "balanced_accuracy"), "accuracy"


@dataclass
class Verdict:
    recipe: str
    baseline: str  # the best classical baseline: the highest mean over the shared seeds (ties: the tie-break's)
    seeds: list[int]
    recipe_mean: float
    baseline_mean: float
    difference: float  # mean of the paired differences (recipe - baseline)
    low: float  # the 95% interval of that mean (nan with fewer than two seeds, or seeds that change neither score)
    high: float
    verdict: str  # "gain", "no significant difference", "loss", "one seed: no interval" or UNCHANGED_BY_SEEDS

    def line(self, scale: float = 100.0, unit: str = " points") -> str:
        """e.g. 'synaug against balanced-softmax over 5 seeds: +0.30 points (95% interval
        -0.21 to +0.81): no significant difference'."""
        return (f"{self.recipe} against {self.baseline} over {len(self.seeds)} seed{'s' * (len(self.seeds) != 1)}: "
                + self.difference_text(scale, unit))

    def line_with_tie(self, tied: Verdict | None, name: str) -> str:
        """`line()`, and where `tied` (from `compare_tied`) the same pair on the tie-break metric `name`."""
        return self.line() + (f"; tied on every seed, so on {name}: {tied.difference_text()}" if tied else "")

    def difference_text(self, scale: float = 100.0, unit: str = " points") -> str:
        """e.g. '+0.30 points (95% interval -0.21 to +0.81): no significant difference'."""
        interval = "" if math.isnan(self.low) else \
            f" (95% interval {scale * self.low:+.2f} to {scale * self.high:+.2f})"
        return f"{scale * self.difference:+.2f}{unit}{interval}: {self.verdict}"

    @property
    def tied(self) -> bool:
        """The same score as the baseline on every seed (every worst group 0, say): no interval to read."""
        return len(self.seeds) > 1 and self.difference == self.low == self.high == 0

    def to_dict(self) -> dict:
        """Its fields, an absent interval as None (JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The mean of the paired differences a - b and its `level` t-interval (Student's t with
    n - 1 degrees of freedom); the interval is (nan, nan) for fewer than two pairs, and where
    the seeds changed neither score but the two differ: that is one replicate, not a difference
    known exactly. (The same score on every seed for both is a tie, interval (0, 0).)"""
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError("paired_interval needs two lists of the same, non-zero length")
    differences = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(differences)
    if len(differences) < 2 or (mean != 0 and len(set(a)) == 1 and len(set(b)) == 1):
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
    return mean, mean - half, mean + half


def verdict_of(low: float, high: float) -> str:
    if math.isnan(low):
        return "one seed: no interval"
    return "gain" if low > 0 else "loss" if high < 0 else "no significant difference"


def compare(scores: dict[str, dict[int, float]], recipe: str, classical: list[str] | None = None,
            tiebreak: dict[str, dict[int, float]] | None = None) -> Verdict | None:
    """The recipe against the best classical baseline in `scores` (method -> seed -> score),
    paired over the seeds both have; None without a classical baseline. `classical` names the
    baselines (default: every other method but the upper bounds). Baselines tied on `scores`
    (every worst group at 0, say) are told apart by their mean in `tiebreak`, a second metric."""
    baselines = {name: by_seed for name, by_seed in scores.items()
                 if name != recipe and name not in UPPER_BOUNDS and (classical is None or name in classical)}
    mine = scores[recipe]
    shared = {name: sorted(set(mine) & set(by_seed)) for name, by_seed in baselines.items()}
    candidates = [name for name in baselines if shared[name]]
    if not candidates:
        return None

    def rank(name: str) -> tuple[float, float]:
        second = [tiebreak[name][s] for s in shared[name] if s in tiebreak.get(name, {})] if tiebreak else []
        return (statistics.fmean(baselines[name][s] for s in shared[name]),
                statistics.fmean(second) if second else -math.inf)

    best = max(candidates, key=rank)
    seeds = shared[best]
    ours, theirs = [mine[s] for s in seeds], [baselines[best][s] for s in seeds]
    difference, low, high = paired_interval(ours, theirs)
    verdict = verdict_of(low, high) if len(seeds) < 2 or not math.isnan(low) else UNCHANGED_BY_SEEDS
    return Verdict(recipe, best, seeds, statistics.fmean(ours), statistics.fmean(theirs), difference, low, high, verdict)


def compare_tied(found: Verdict | None, tiebreak: dict[str, dict[int, float]]) -> Verdict | None:
    """Where the recipe ties its baseline on every seed (`Verdict.tied`; common for worst-group
    accuracy under strong spurious correlation, where every method's worst group is 0), the
    same pair compared on the tie-break metric (method -> seed -> score); else None."""
    if found is None or not found.tied or found.recipe not in tiebreak or found.baseline not in tiebreak:
        return None
    pair = {name: {s: v for s, v in tiebreak[name].items() if s in found.seeds} for name in (found.recipe, found.baseline)}
    return compare(pair, found.recipe)
