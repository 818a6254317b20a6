"""Plan rows say what kind they are; the generators dispatch on it, never on which keys a row
happens to hold."""

import pytest
import torch
from conftest import make_dataset

from synthaug.errors import SynthaugError
from synthaug.generate.base import generate_arguments
from synthaug.plan import (
    balance_plan,
    conditioned_plan,
    row_kind,
    split_by_kind,
    targeted_plan,
    utility_plan,
)


def test_every_planner_names_its_rows_kind():
    data = make_dataset((6, 3), size=8)
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[:2] = True
    plans = {
        "plain": balance_plan(data),
        "guided": targeted_plan(data, mask, variants=2),
        "conditioned": conditioned_plan(data, target_per_class=8, mode="mixup"),
        "noised": utility_plan(data, per_class=2, round_name="r2", noise_from={0: ["a"], 1: ["b"]}, noise_mix=0.5),
        "renoised": utility_plan(data, per_class=2, round_name="r2", noise_from={0: ["a"], 1: ["b"]},
                                 renoise_strength=0.6),
    }
    for kind, rows in plans.items():
        assert rows and {r["kind"] for r in rows} == {kind} and {row_kind(r) for r in rows} == {kind}
    assert row_kind({"id": "x", "source": 3}) == "guided"  # a row made by hand, without a kind


def test_rows_split_by_kind_and_utilgen_rows_are_not_for_generate_rows():
    rows = [{"id": "a", "kind": "plain"}, {"id": "b", "kind": "guided"}, {"id": "c", "kind": "plain"}]
    made = split_by_kind(rows, lambda part: torch.tensor([[ord(r["kind"][0])] for r in part]))
    assert made.flatten().tolist() == [ord("p"), ord("g"), ord("p")]
    with pytest.raises(SynthaugError, match="kind 'noised'"):
        generate_arguments([{"id": "a", "kind": "noised", "label": 0, "seed": 1}], None, None)
