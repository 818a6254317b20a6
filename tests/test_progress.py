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


def test_utilgen_s_generator_stages_show_progress(capsys, monkeypatch):
    """DPO, the class embeddings and DDIM inversion run for minutes between UtilGen's bars:
    each shows its own, step by step, in a log too."""
    import torch

    from synthaug.generate import DiffusionGenerator, GeneratorConfig

    monkeypatch.setenv("SYNTHAUG_PROGRESS_SECONDS", "0")
    ds = make_dataset((4, 4), size=8)
    gen = DiffusionGenerator(GeneratorConfig(image_size=8, channels=1, classes=ds.classes, preset="tiny"))
    gen.finetune_dpo(ds.images[:2], ds.images[2:4], ds.labels[:2], steps=3, lr=1e-5, beta=1.0, seed=0, progress=True)
    gen.optimise_policy_embeddings(ds.images[:2], ds.labels[:2], steps=2, lr=1e-3, proximity=1.0, anchor=None, seed=0,
                                   progress=True)
    gen.invert_noise(ds.images[:3], torch.tensor([0, 0, 1]), steps=2, guidance_scale=1.0, batch_size=2, progress=True)
    out = [line.split(" (")[0] for line in capsys.readouterr().out.splitlines()]
    assert out == ["DPO: 1/3", "DPO: 2/3", "DPO: 3/3", "class embeddings: 1/2", "class embeddings: 2/2",
                   "DDIM inversion, batches: 1/2", "DDIM inversion, batches: 2/2"]
