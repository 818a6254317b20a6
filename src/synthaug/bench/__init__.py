"""`synthaug bench`: suites of settings x recipes x seeds, run resumably into one folder, and
a leaderboard with the paired verdict against the best classical baseline."""

from .leaderboard import leaderboard_markdown, write_leaderboard
from .runner import read_results, run_suite
from .suite import Cell, Suite, load_suite, shipped

__all__ = ["Cell", "Suite", "leaderboard_markdown", "load_suite", "read_results", "run_suite", "shipped",
           "write_leaderboard"]
