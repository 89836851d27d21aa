"""analyze difficulty: the subsets are cut as stated and scored against the retain model on the same rows."""
from __future__ import annotations

import json
import math

import pytest
from helpers import cli_error

from unlearnkit.analysis.difficulty import split_rows, subset, subset_summaries
from unlearnkit.attacks.score import summarize_forget
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import encode_answer

ROWS = tofu.task("mini").forget[:6]


def _cols(nll):
    return {"question": [r["question"] for r in ROWS], "answer": [r["answer"] for r in ROWS], "avg_gt_loss": nll,
            "avg_paraphrased_loss": [1.0 + 0.1 * i for i in range(6)],
            "average_perturb_loss": [[1.5 - 0.05 * i] * 5 for i in range(6)]}


def test_subsets_and_their_summaries(tokenizer):
    target = _cols([0.1, 2.0, 0.3, 1.5, 0.05, 3.0])
    s = split_rows(target, ROWS, tokenizer)
    assert s["strong"] == [0, 2, 4] and s["weak"] == [1, 3, 5]  # p above / at or below the median
    lengths = [len(encode_answer(tokenizer, r["answer"])) for r in ROWS]
    assert all(lengths[i] <= s["thresholds"]["answer_tokens_median"] for i in s["short"])
    assert all(lengths[i] > s["thresholds"]["answer_tokens_median"] for i in s["long"])
    assert sorted(s["short"] + s["long"]) == list(range(6))
    probs = sorted(math.exp(-x) for x in target["avg_gt_loss"])
    assert s["thresholds"]["target_prob_median"] == pytest.approx((probs[2] + probs[3]) / 2)
    retain = _cols([2.0] * 6)
    out = subset_summaries(target, retain, s)
    assert out["strong"] == summarize_forget(subset(target, [0, 2, 4]), subset(retain, [0, 2, 4]))
    assert out["all"]["n"] == 6 and out["weak"]["n"] == 3


def test_difficulty_cli_on_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import unlearnkit.prepare

    monkeypatch.setattr(unlearnkit.prepare, "prepare_tofu",
                        lambda *a, **k: {"target": tiny_model_dir, "retain": tiny_model_dir})
    out = tmp_path / "diff"
    assert main(["analyze", "difficulty", "--set", "max_steps=1", "--set", "batch_size=8", "--quiet",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "DIFFICULTY.json").read_text())
    assert list(doc["summary"]) == ["target", "npo", "simnpo"] and doc["runs"]["npo"]["steps"] == 1
    for per in doc["summary"].values():
        assert set(per) == {"all", "strong", "weak", "short", "long"}
    assert doc["summary"]["target"]["all"]["forget_quality"] == pytest.approx(1.0)  # target == retain here
    assert (out / "DIFFICULTY.png").stat().st_size > 1000


def test_difficulty_inputs_checked_first(tmp_path, no_model_load, capsys):
    base = ["analyze", "difficulty", "--out", str(tmp_path / "o")]
    assert "unknown key 'nope'" in cli_error(base + ["--set", "nope=1"], capsys)
    assert "--batch-size" in cli_error(base + ["--batch-size", "0"], capsys)
