"""analyze confidence: token confidence equals a direct computation from full logits; the command checks its inputs
first and writes CONFIDENCE.json / CONFIDENCE.png."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_error

from unlearnkit.analysis.confidence import token_confidence
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import encode_qa

ROWS = tofu.task("mini").forget[:3]


def test_token_confidence_is_its_definition(tiny_model, tokenizer):
    got = token_confidence(tiny_model, tokenizer, ROWS, batch_size=2)
    maxp, ent, n = [], [], 0
    with torch.no_grad():
        for row in ROWS:
            ex = encode_qa(tokenizer, row["question"], row["answer"])
            probs = torch.softmax(tiny_model(torch.tensor([ex["input_ids"]])).logits[0].double(), -1)
            for t, label in enumerate(ex["labels"]):
                if label != -100:  # token t is predicted at position t - 1
                    p = probs[t - 1]
                    maxp.append(float(p.max()))
                    ent.append(float(-(p * p.log()).sum()))
    assert got["tokens"] == len(maxp) and got["rows"] == 3
    assert got["max_prob"] == pytest.approx(sum(maxp) / len(maxp), abs=1e-6)
    assert got["entropy"] == pytest.approx(sum(ent) / len(ent), abs=1e-5)


def test_confidence_cli(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "conf"
    assert main(["analyze", "confidence", "--model", f"a={tiny_model_dir}", "--model", f"b={tiny_model_dir}",
                 "--controls", "none", "--limit", "2", "--quiet", "--out", str(out)]) == 0
    doc = json.loads((out / "CONFIDENCE.json").read_text())
    assert list(doc["summary"]) == ["a", "b"] and doc["summary"]["a"] == doc["summary"]["b"]
    assert set(doc["summary"]["a"]) == {"forget", "retain", "general"} and doc["sets"]["general"] == 4
    assert (out / "CONFIDENCE.png").stat().st_size > 1000


@pytest.mark.parametrize("extra, needle", [
    ([], "nothing to measure"),
    (["--model", "/no/such/dir"], "--model"),
    (["--controls", "bogus"], "--controls: unknown value"),
    (["--controls", "none", "--limit", "0"], "--limit"),
])
def test_confidence_inputs_checked_first(tmp_path, no_model_load, capsys, extra, needle):
    argv = ["analyze", "confidence", "--out", str(tmp_path / "o")] + (["--controls", "none"] if not extra else [])
    assert needle in cli_error(argv + extra, capsys)
