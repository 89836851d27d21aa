"""`unlearnkit eval tofu` end to end on a tiny model, and one short real-model run (generation sanity)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from helpers import cli_error
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
    assert re.search(r"model evaluation: teacher-forced \d+\.\d s, generation \d+\.\d s", printed)
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


# ---- up-front checks: nothing is loaded, nothing written ----------------------------------------------------------

def _fake_model(folder):
    """A model folder as far as the cheap checks go (config + a weights file); loading it would fail."""
    folder.mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    (folder / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))  # a whole file, just not a model
    return folder


def _tofu(model, out, *extra):
    return ["eval", "tofu", "--model", str(model), "--limit", "1", "--max-new-tokens", "2", "--quiet",
            "--device", "cpu", "--out", str(out), *extra]


def test_eval_tofu_out_folder_refused_before_loading(tmp_path, capsys, no_model_load):
    model = _fake_model(tmp_path / "model")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert "not empty" in cli_error(_tofu(model, foreign), capsys)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    assert "is the input" in cli_error(_tofu(model, model), capsys)
    assert "inside the input" in cli_error(_tofu(model, model / "eval"), capsys)
    assert "contains the input" in cli_error(_tofu(model, tmp_path), capsys)
    retain = _fake_model(tmp_path / "retain_model")
    assert "retain_model" in cli_error(_tofu(model, retain / "eval", "--retain-model", str(retain)), capsys)
    log = tmp_path / "logs" / "EVAL.json"
    log.parent.mkdir()
    log.write_text("{}")
    assert "contains the input" in cli_error(_tofu(model, tmp_path / "logs", "--retain-log", str(log)), capsys)
    holdout = tmp_path / "h" / "holdout.json"
    holdout.parent.mkdir()
    holdout.write_text("[]")
    assert "contains the input" in cli_error(_tofu(model, holdout.parent, "--holdout", str(holdout)), capsys)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    # a folder written by another command
    agg = tmp_path / "agg"
    agg.mkdir()
    (agg / ".unlearnkit.json").write_text(json.dumps({"kind": "eval aggregate", "files": ["SUMMARY.json"]}))
    (agg / "SUMMARY.json").write_text("{}")
    assert "`eval aggregate`" in cli_error(_tofu(model, agg), capsys)


def test_eval_tofu_rerun_into_own_folder_and_marker_lists_retain(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _tofu(tiny_model_dir, out, "--retain-model", str(tiny_model_dir), "--no-generate")
    assert main(args) == 0
    marker = json.loads((out / ".unlearnkit.json").read_text())
    assert marker["kind"] == "eval tofu" and marker["files"] == ["EVAL.json", "SUMMARY.json", "retain"]
    first = json.loads((out / "SUMMARY.json").read_text())
    assert main(args) == 0  # a previous output of the same command is replaced
    assert json.loads((out / "SUMMARY.json").read_text())["forget_prob"] == first["forget_prob"]
    assert sorted(p.name for p in out.iterdir()) == [".unlearnkit.json", "EVAL.json", "SUMMARY.json", "retain"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unlearnkit-tmp")]  # no leftovers
    # without --retain-model the folder holds no stale retain/ from the earlier run
    assert main(_tofu(tiny_model_dir, out, "--no-generate")) == 0
    assert sorted(p.name for p in out.iterdir()) == [".unlearnkit.json", "EVAL.json", "SUMMARY.json"]
    capsys.readouterr()


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--max-length", "0"], "--max-length"),
    (["--max-new-tokens", "100000000"], "context of 512 tokens"),  # the tiny model's max_position_embeddings
    (["--max-new-tokens", "500"], "context of 512 tokens"),
    (["--max-length", "20"], "--max-length 20"),
    (["--gen-batch-size", "0"], "--gen-batch-size"), (["--gen-memory-gb", "0"], "--gen-memory-gb"),
    (["--gen-memory-gb", "nan"], "--gen-memory-gb"),
])
def test_eval_tofu_bad_numbers_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_model_load, extra,
                                                      needle):
    args = _tofu(tiny_model_dir, tmp_path / "o")
    args[args.index("--limit"):args.index("--limit") + 4] = []  # drop the defaults given by _tofu
    err = cli_error(args + extra, capsys)
    assert needle in err
    assert not (tmp_path / "o").exists()


def test_eval_tofu_length_errors_name_set_and_row(tiny_model_dir, tmp_path, capsys, no_model_load):
    err = cli_error(_tofu(tiny_model_dir, tmp_path / "o", "--max-length", "30"), capsys)
    assert "TOFU forget set row" in err and "tokens, more than --max-length 30" in err
    err = cli_error(_tofu(tiny_model_dir, tmp_path / "o", "--max-new-tokens", "505"), capsys)
    assert "TOFU" in err and "set row" in err and "at most" in err
    # the retain model is checked too, and named
    err = cli_error(_tofu(tiny_model_dir, tmp_path / "o", "--retain-model", str(tiny_model_dir), "--max-length", "30"),
               capsys)
    assert err.startswith("unlearnkit: error: --retain-model")


def test_max_length_and_context_in_the_api(tiny_model, tokenizer):
    from unlearnkit.errors import UserError
    from unlearnkit.eval import evaluate_tofu

    with pytest.raises(UserError, match="more than --max-length 25"):
        evaluate_tofu(tiny_model, tokenizer, "mini", max_length=25, progress=False)
    with pytest.raises(UserError, match="context of 512 tokens"):
        evaluate_tofu(tiny_model, tokenizer, "mini", max_new_tokens=10**8, progress=False)
    with pytest.raises(UserError, match="batch_size"):
        evaluate_tofu(tiny_model, tokenizer, "mini", batch_size=0, progress=False)
    with pytest.raises(UserError, match="es-convention"):
        evaluate_tofu(tiny_model, tokenizer, "mini", es_convention="other", progress=False)


def test_bench_eval_rejects_negative_n(capsys, no_model_load):
    assert "--n" in cli_error(["bench", "eval", "--n", "-5", "--device", "cpu"], capsys)
    assert "--batch-size" in cli_error(["bench", "eval", "--batch-size", "0", "--device", "cpu"], capsys)


# ---- extraction strength conventions through the evaluator --------------------------------------------------------

def test_evaluate_tofu_es_conventions_against_naive(tiny_model, tokenizer):
    """Per-sample ES under both conventions equals the definition applied to the teacher-forced argmax hits of an
    independent forward (reference path), and the convention is recorded in EVAL and SUMMARY."""
    from unlearnkit.data import tofu
    from unlearnkit.eval import evaluate_tofu
    from unlearnkit.eval.reference import _token_logprobs
    from unlearnkit.data.format import PromptFormat

    t = tofu.task("mini")
    t = dataclasses.replace(t, forget=t.forget[:4], retain_eval=t.retain_eval[:2], real_authors=t.real_authors[:2],
                            world_facts=t.world_facts[:2], holdout=[])
    hits = _token_logprobs(tiny_model, tokenizer, [(r["question"], r["answer"]) for r in t.forget], PromptFormat(), 4)
    assert any(not m[-1] for _, m, _ in hits)  # a missed last token: the case where the conventions differ
    for convention in ("unlearnkit", "open-unlearning"):
        ev = evaluate_tofu(tiny_model, tokenizer, t, generate=False, es_convention=convention, progress=False)
        naive = []
        for _, m, _ in hits:
            n = len(m)
            k = min(k for k in range(n + 1) if all(m[k:]))
            naive.append(1 - (min(k, n - 1) if convention == "open-unlearning" else k) / n)
        assert ev["sets"]["forget"]["es"] == pytest.approx(naive)
        assert ev["settings"]["es_convention"] == ev["summary"]["es_convention"] == convention
        assert ev["summary"]["forget_es"] == pytest.approx(sum(naive) / len(naive))
