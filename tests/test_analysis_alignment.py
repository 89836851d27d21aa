"""analyze alignment: the cosine / norm statistics are their definition; the command runs per coefficient."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_error, layer_outputs_by_hand

from unlearnkit.analysis.alignment import layer_alignment, steering_direction
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import encode_qa

ROWS = tofu.task("mini").forget[:3]


def test_layer_alignment_is_its_definition(tiny_model, tokenizer):
    u = steering_direction(tiny_model, seed=0)
    got = layer_alignment(tiny_model, tokenizer, ROWS, 1, u, batch_size=2)
    cos, norm = [], []
    for row in ROWS:
        ids = torch.tensor([encode_qa(tokenizer, row["question"], row["answer"])["input_ids"]])
        h = layer_outputs_by_hand(tiny_model, ids, 2)[1]  # h_1 = output of decoder layer 1
        for vec in h[0].double():
            cos.append(float(vec @ u.double() / vec.norm()))
            norm.append(float(vec.norm()))
    assert got["tokens"] == len(cos)
    assert got["cosine"] == pytest.approx(sum(cos) / len(cos), abs=1e-5)
    assert got["norm"] == pytest.approx(sum(norm) / len(norm), rel=1e-5)


def test_alignment_cli_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setattr(unlearnkit.prepare, "prepare_tofu",
                        lambda *a, **k: {"target": tiny_model_dir, "retain": tiny_model_dir})
    out = tmp_path / "al"
    assert main(["analyze", "alignment", "--layer", "1", "--coefficients", "1,50", "--steps", "2", "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "ALIGNMENT.json").read_text())
    assert [p["c"] for p in doc["points"]] == [1.0, 50.0] and doc["points"][0]["steps"] == 2
    assert doc["points"][1]["c_over_norm"] == pytest.approx(50.0 / doc["target"]["norm"])
    assert doc["target"]["forget_quality"] == pytest.approx(1.0)  # target == retain here
    assert (out / "ALIGNMENT.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, needle", [
    (["--coefficients", "a,b"], "--coefficients: not a list of numbers"),
    (["--coefficients", "0,5"], "--coefficients: give numbers > 0"),
    (["--coefficients", "5", "--steps", "0"], "--steps"),
    (["--coefficients", "5", "--layer", "-1"], "config layer"),
])
def test_alignment_inputs_checked_first(tmp_path, no_model_load, capsys, extra, needle):
    assert needle in cli_error(["analyze", "alignment", "--out", str(tmp_path / "o"), *extra], capsys)
