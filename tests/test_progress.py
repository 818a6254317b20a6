"""Progress when the output is not a terminal (CI, nohup, a log file): plain lines, not silence."""

from __future__ import annotations

from conftest import make_dataset

from synthaug.classify import fit_classifier
from synthaug.classify.train import TrainConfig
from synthaug.utils.runtime import ProgressLines, progress_bar


def test_lines_report_done_total_rate_eta_and_the_end(capsys):
    lines = ProgressLines(every=0)
    task = lines.add_task("train generator", total=800, completed=200, info="")
    lines.update(task, completed=400, info="loss 0.0312")
    lines.advance(task, 400)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("train generator: 400/800 (50%), ") and "/s, ETA " in out[0] and out[0].endswith("loss 0.0312")
    assert out[1].startswith("train generator: 800/800 (100%), ") and "ETA" not in out[1]


def test_lines_are_spaced_in_time_but_the_end_is_always_printed(capsys):
    lines = ProgressLines(every=3600)
    task = lines.add_task("generate", total=10)
    for _ in range(10):
        lines.advance(task)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("generate: 10/10 (100%)")


def test_a_long_stage_prints_lines_when_stdout_is_not_a_terminal(capsys, monkeypatch):
    """`progress=True` with stdout captured (not a TTY): the classifier's epochs appear as lines."""
    monkeypatch.setenv("SYNTHAUG_PROGRESS_SECONDS", "0")
    with progress_bar(True) as bar:
        assert isinstance(bar, ProgressLines)
    fit_classifier(make_dataset((8, 8), size=8), TrainConfig(epochs=3, batch_size=8, augment="none"), progress=True)
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train classifier: ")]
    assert [line.split(" (")[0] for line in out] == [f"train classifier: {k}/3" for k in (1, 2, 3)]
    assert all("loss " in line for line in out)
