"""Extending synthaug from outside the library: a toy generator and a toy recipe with its own
config section, written and registered in this file alone, run end to end through
`synthaug run` (and the generator reloads from its folder through `generator.path`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from synthaug.config import SECTIONS, register_section
from synthaug.data import concat
from synthaug.errors import SynthaugError
from synthaug.generate import Generator
from synthaug.generate.cache import GENERATORS, register_generator
from synthaug.generate.stage import generate_stage, generator_stage
from synthaug.plan import balance_plan
from synthaug.recipes import RECIPES, RecipeResult, register_recipe
from synthaug.recipes.registry import train_and_evaluate


class ToyGenerator:
    """Each class a flat grey level of its own, plus noise drawn from each image's seed."""

    kind = "toy"
    image_embed_dim = 0

    def __init__(self, classes: list[str], channels: int, size: int):
        self.classes, self.channels, self.size = list(classes), channels, size
        self.history, self.train_seconds = [], 0.0

    @property
    def noise_shape(self):
        return (self.channels, self.size, self.size)

    def check_compatible(self, data):
        if data.classes != self.classes or (data.channels, *data.image_size) != self.noise_shape:
            raise SynthaugError("the toy generator was made for other data")

    def fingerprint(self):
        return hashlib.sha256(json.dumps([self.classes, self.channels, self.size]).encode()).hexdigest()[:16]

    def generate(self, labels, seeds, groups=None, sampler=None, *, init_images=None, strength=1.0, image_embeds=None,
                 noise=None):
        out = []
        for label, seed in zip(labels, seeds):
            jitter = torch.randint(0, 20, self.noise_shape, generator=torch.Generator().manual_seed(int(seed)))
            out.append((20 * int(label) + jitter).clamp(0, 255).to(torch.uint8))
        return torch.stack(out)

    def generate_rows(self, rows, sampler=None, sources=None):
        return self.generate([r["label"] for r in rows], [r["seed"] for r in rows])

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "generator.json").write_text(json.dumps(
            {"kind": self.kind, "config": {"classes": self.classes, "channels": self.channels, "size": self.size}}))

    @classmethod
    def from_pretrained(cls, folder, device="auto"):
        return cls(**json.loads((Path(folder) / "generator.json").read_text())["config"])

    def policy_embeddings(self):
        return torch.eye(len(self.classes))

    def optimise_policy_embeddings(self, images, labels, **options):
        return {}

    def invert_noise(self, images, labels, **options):
        return torch.zeros(len(images), *self.noise_shape)

    def finetune_dpo(self, preferred, rejected, labels, **options):
        return []


def make_toy(data, section, **_):
    return ToyGenerator(data.classes, data.channels, data.image_size[0]), {"source": "toy"}


@dataclass
class ToyOptions:
    """The toy recipe's own config section (`toyfill.*`)."""

    multiple: int = 1  # fill every class to this many times the largest


def toy_fill(task, config, *, workdir=None, progress=False, trained=None):
    """Fill every class up to `toyfill.multiple` x the largest with the generator's images."""
    generator, info = generator_stage(task.train, config, progress=progress)
    target = config.toyfill.multiple * int(task.train.class_counts().max())
    plan = balance_plan(task.train, target_per_class=target, seed=config.generator.plan_seed, recipe="toy-fill")
    synthetic, made = generate_stage(plan, generator, config, Path(workdir) / "synthetic", task.train, progress=progress)
    result, metrics, seconds = train_and_evaluate(concat(task.train, synthetic), task, config, workdir=workdir,
                                                  progress=progress)
    return RecipeResult(metrics=metrics, model=result.model, history=result.history, seconds=seconds,
                        extra={"generator": info, "synthetic": made}, synthetic=synthetic)


@pytest.fixture
def registered():
    register_generator("toy", load=ToyGenerator.from_pretrained)(make_toy)
    register_recipe("toy-fill", "fill every class with the toy generator's images")(toy_fill)
    register_section("toyfill")(ToyOptions)
    yield
    del GENERATORS["toy"], RECIPES["toy-fill"], SECTIONS["toyfill"]


def test_a_toy_generator_and_recipe_run_through_synthaug_run(registered, tmp_path, capsys, monkeypatch):
    assert isinstance(ToyGenerator(["a", "b"], 1, 8), Generator)
    args = ["run", "-s", "recipe=toy-fill", "-s", "generator.kind=toy", "-s", "data.dataset=digits", "-s",
            "split.ratio=5", "-s", "train.epochs=1", "-s", "train.augment=none", "-s", "report.baselines=ce", "-s",
            f"output_dir={tmp_path}", "--quiet"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    run = tmp_path / "digits-lt5-toy-fill-s0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["synthetic"]["images"] == metrics["synthetic"]["planned"] > 0 and "ce" in metrics["baselines"]
    rows = [json.loads(line) for line in (run / "synthetic" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert {r["generator"] for r in rows} == {ToyGenerator([str(c) for c in range(10)], 1, 8).fingerprint()}
    assert (run / "report.html").exists()

    code, _, err = run_cli([*args, "-s", "name=doubled", "-s", "toyfill.multiple=2"], capsys, monkeypatch)
    doubled = json.loads((tmp_path / "doubled" / "metrics.json").read_text())
    assert code == 0 and doubled["synthetic"]["planned"] > metrics["synthetic"]["planned"]
    assert "multiple: 2" in (tmp_path / "doubled" / "config.yaml").read_text()

    ToyGenerator([str(c) for c in range(10)], 1, 8).save_pretrained(tmp_path / "toy")
    code, _, err = run_cli([*args, "-s", "name=again", "-s", "generator.kind=auto", "-s", f"generator.path={tmp_path / 'toy'}"],
                           capsys, monkeypatch)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["generator"]["source"] == "pretrained" and again["test"] == metrics["test"]


def test_an_unknown_generator_kind_is_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["run", "-s", "generator.kind=toyy", "-s", "data.dataset=digits", "-s",
                            f"output_dir={tmp_path}"], capsys, monkeypatch)
    assert code == 2 and "unknown generator 'toyy'" in err and not list(tmp_path.iterdir())
