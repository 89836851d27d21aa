"""`unlearnkit eval tofu` end to end on a tiny model, and one short real-model run (generation sanity)."""
from __future__ import annotations

import dataclasses
import json

import pytest

from unlearnkit.cli import main


def test_eval_tofu_cli_with_retain_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["eval", "tofu", "--model", str(tiny_model_dir), "--retain-model", str(tiny_model_dir),
                 "--split", "mini", "--limit", "3", "--max-new-tokens", "3", "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    s = json.loads((out / "SUMMARY.json").read_text())
    ev = json.loads((out / "EVAL.json").read_text())
    assert s["forget_quality"] == pytest.approx(1.0)  # the model is its own retain model: identical truth ratios
    assert s["privleak"] == pytest.approx(0.0) and "privleak_convention" in s
    assert len(ev["sets"]["forget"]["generated_text"]) == 3 and len(ev["sets"]["holdout"]["avg_gt_loss"]) == 3
    assert (out / "retain" / "EVAL.json").is_file()
    printed = capsys.readouterr().out
    assert "model_utility" in printed and "forget_quality" in printed
    # the written EVAL.json re-aggregates to the same numbers, with it as its own retain log
    assert main(["eval", "aggregate", str(out / "EVAL.json"), "--retain-log", str(out / "retain"),
                 "--out", str(tmp_path / "agg")]) == 0
    s2 = json.loads((tmp_path / "agg" / "SUMMARY.json").read_text())
    for k in ("model_utility", "forget_truth_ratio", "forget_rougeL_recall", "retain_prob", "forget_quality"):
        assert s2[k] == pytest.approx(s[k], rel=1e-12), k


def test_eval_tofu_cli_bad_input(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "tofu", "--model", str(tiny_model_dir), "--split", "forget99", "--out", str(tmp_path)]) == 2
    assert "--split" in capsys.readouterr().err
    assert main(["eval", "tofu", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_real_model_generation_and_probabilities(real_model):
    """SmolLM2 answers on topic, cut at EOS, and the fast path still matches the
    per-metric reference on a real model."""
    import numpy as np

    from unlearnkit.data import tofu
    from unlearnkit.eval import evaluate_tofu
    from unlearnkit.eval.reference import evaluate_tofu_reference

    model, tok = real_model
    t = tofu.task("forget01")
    paris = [r for r in t.world_facts if r["answer"] == "Paris"][:1]
    t = dataclasses.replace(t, forget=t.forget[:1], retain_eval=t.retain_eval[:1], real_authors=t.real_authors[:1],
                            world_facts=paris, holdout=[])
    ev = evaluate_tofu(model, tok, t, max_new_tokens=12, progress=False)
    wf = ev["sets"]["world_facts"]
    assert "eiffel" in wf["generated_text"][0].lower() and "<|im" not in wf["generated_text"][0]
    ref = evaluate_tofu_reference(model, tok, t, max_new_tokens=12)
    for name in ref:
        np.testing.assert_allclose(ev["sets"][name]["avg_gt_loss"], ref[name]["avg_gt_loss"], rtol=1e-4, atol=1e-4)
        assert ev["sets"][name]["generated_text"] == ref[name]["generated_text"]
