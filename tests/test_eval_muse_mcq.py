"""MUSE loaders/metrics on the fixture layout, multiple choice against a naive per-candidate computation, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from helpers import cli_error
from unlearnkit.cli import main
from unlearnkit.errors import UserError
from unlearnkit.eval.generate import greedy_generate
from unlearnkit.eval.mcq import _letter_logprobs, evaluate_mcq, load_mcq, mcq_prompt
from unlearnkit.eval.muse import evaluate_muse, knowmem_prompt, load_muse

FIX = Path(__file__).parent / "fixtures"


def test_load_muse_layout():
    d = load_muse(FIX / "muse")
    assert len(d["verbmem"]) == 3 and set(d["verbmem"][0]) == {"prompt", "gt"}
    assert len(d["knowmem_forget"]) == 3 and len(d["knowmem_retain"]) == 2 and len(d["knowmem_forget_icl"]) == 2
    assert len(d["privleak_forget"]) == 4 and isinstance(d["privleak_holdout"][0], str)  # both text layouts
    assert len(load_muse(FIX / "muse", limit=1)["verbmem"]) == 1
    assert knowmem_prompt(d["knowmem_forget_icl"][:1], "Q?") == \
        "Question: Who opened the new library?\nAnswer: The mayor\n\nQuestion: Q?\nAnswer:"


def test_evaluate_muse_matches_direct_scores(tiny_model, tokenizer):
    d = load_muse(FIX / "muse")
    ev = evaluate_muse(tiny_model, tokenizer, d, batch_size=2, verbmem_tokens=6, knowmem_tokens=5, progress=False)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    v = ev["sets"]["verbmem"]
    for row, out in zip(d["verbmem"], v["generated_text"]):
        ids = tokenizer(row["prompt"])["input_ids"]
        assert out == greedy_generate(tiny_model, tokenizer, [ids], max_new_tokens=6)[0]
    direct = np.mean([scorer.score(r["gt"], o)["rougeL"].fmeasure for r, o in zip(d["verbmem"], v["generated_text"])])
    assert ev["summary"]["verbmem_rougeL_f1"] == pytest.approx(direct)
    k = ev["sets"]["knowmem_forget"]
    assert all("\n\n" not in o and "\nQuestion" not in o for o in k["generated_text"])
    direct = np.mean([scorer.score(r["answer"], o)["rougeL"].fmeasure
                      for r, o in zip(d["knowmem_forget"], k["generated_text"])])
    assert ev["summary"]["knowmem_forget_rougeL_f1"] == pytest.approx(direct)
    assert 0 <= ev["summary"]["mia_auc_mink"] <= 1 and ev["summary"]["privleak"] is None
    ev2 = evaluate_muse(tiny_model, tokenizer, {k: d[k] for k in ("privleak_forget", "privleak_holdout", "verbmem")},
                        verbmem_tokens=2, retain_reference={"summary": {"mia_auc_mink": 0.5}}, progress=False)
    assert ev2["summary"]["privleak"] == pytest.approx((ev2["summary"]["mia_auc_mink"] - 0.5) / 0.5 * 100)
    assert ev2["summary"]["knowmem_forget_rougeL_f1"] is None and ev2["summary"]["null_reasons"]


def test_muse_bad_input(tmp_path):
    (tmp_path / "knowmem").mkdir()
    (tmp_path / "knowmem" / "forget_qa.json").write_text(json.dumps([{"question": "q?"}]))
    with pytest.raises(UserError, match="forget_qa.json: row 0: field 'answer'"):
        load_muse(tmp_path)
    with pytest.raises(UserError, match="no MUSE files"):
        load_muse(tmp_path / "knowmem")


def test_load_mcq_schemas(tmp_path):
    bio = load_mcq(FIX / "mcq" / "biology.jsonl")
    assert [r["answer"] for r in bio] == [1, 0, 2] and bio[0]["subject"] == "biology"
    phys = load_mcq(FIX / "mcq" / "high_school_physics_test.csv")
    assert [r["answer"] for r in phys] == [1, 0] and phys[0]["subject"] == "high school physics"
    assert len(phys[0]["choices"]) == 4
    p = mcq_prompt("biology", "Q?", ["a", "b", "c", "d"])
    assert p == ("The following are multiple choice questions (with answers) about biology.\n\nQ?\n"
                 "A. a\nB. b\nC. c\nD. d\nAnswer:")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": 5}]))
    with pytest.raises(UserError, match="bad.json: row 0: field 'answer'"):
        load_mcq(bad)


def test_mcq_equals_naive_per_candidate(tiny_model, tokenizer):
    items = load_mcq(FIX / "mcq" / "biology.jsonl") + load_mcq(FIX / "mcq" / "high_school_physics_test.csv")
    ev = evaluate_mcq(tiny_model, tokenizer, items, batch_size=2, progress=False)
    naive = []
    for it in items:
        prompt = mcq_prompt(it["subject"], it["question"], it["choices"])
        scores = []
        for j in range(len(it["choices"])):
            ids = tokenizer(prompt + f" {'ABCD'[j]}")["input_ids"]  # whole text, one candidate at a time
            n_prompt = len(tokenizer(prompt)["input_ids"])
            with torch.no_grad():
                lsm = torch.log_softmax(tiny_model(torch.tensor([ids])).logits[0].double(), -1)
            scores.append(sum(lsm[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))))
        naive.append(scores)
    np.testing.assert_allclose(ev["sets"]["mcq"]["letter_logprobs"], naive, atol=2e-5)
    assert ev["sets"]["mcq"]["prediction"] == [int(np.argmax(s)) for s in naive]
    acc = np.mean([int(np.argmax(s)) == it["answer"] for s, it in zip(naive, items)])
    assert ev["summary"]["accuracy"] == pytest.approx(acc)
    slow = _letter_logprobs(tiny_model, tokenizer, [mcq_prompt(i["subject"], i["question"], i["choices"])
                                                    for i in items], [4] * len(items), 3, None, continuation=True)
    np.testing.assert_allclose(slow, naive, atol=2e-5)


def test_cli_mcq_and_muse(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", "mcq", "--model", str(tiny_model_dir), "--data", str(FIX / "mcq" / "biology.jsonl"),
                 str(FIX / "mcq" / "high_school_physics_test.csv"), "--out", str(tmp_path / "mcq"),
                 "--no-progress", "--device", "cpu"]) == 0
    s = json.loads((tmp_path / "mcq" / "SUMMARY.json").read_text())
    assert s["n"] == 5 and "accuracy/biology" in s and "accuracy/high school physics" in s
    assert main(["eval", "muse", "--model", str(tiny_model_dir), "--data", str(FIX / "muse"), "--out",
                 str(tmp_path / "muse"), "--max-new-tokens-verbmem", "3", "--max-new-tokens-knowmem", "3",
                 "--no-progress", "--device", "cpu"]) == 0
    ev = json.loads((tmp_path / "muse" / "EVAL.json").read_text())
    assert len(ev["sets"]["verbmem"]["generated_text"]) == 3
    assert main(["eval", "mcq", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none.json"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


# ---- one evaluator signature; retain references; up-front checks ---------------------------------------------------

def test_evaluators_share_one_signature():
    import inspect

    from unlearnkit.eval import evaluate_tofu

    for fn in (evaluate_tofu, evaluate_muse, evaluate_mcq):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "tokenizer", "data"], fn.__name__
        for name, default in (("guard", None), ("retain_reference", None), ("batch_size", 32), ("progress", True)):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, \
                (fn.__name__, name)


def test_mcq_retain_reference_used_or_refused(tiny_model, tokenizer, make_tiny_model, tmp_path):
    from unlearnkit.eval import write_eval

    items = load_mcq(FIX / "mcq" / "biology.jsonl")
    retain = evaluate_mcq(make_tiny_model(seed=3), tokenizer, items, progress=False)
    write_eval(tmp_path / "retain", retain)
    for ref in (retain, tmp_path / "retain", tmp_path / "retain" / "EVAL.json"):
        ev = evaluate_mcq(tiny_model, tokenizer, items, retain_reference=ref, progress=False)
        s = ev["summary"]
        assert s["retain_accuracy"] == retain["summary"]["accuracy"]
        assert s["accuracy_minus_retain"] == pytest.approx(s["accuracy"] - retain["summary"]["accuracy"])
    tofu_like = {"split": "mini", "sets": {"forget": {}}, "summary": {"forget_prob": 0.5}}
    with pytest.raises(UserError, match="not usable for multiple choice.*no 'accuracy'"):
        evaluate_mcq(tiny_model, tokenizer, items, retain_reference=tofu_like, progress=False)
    with pytest.raises(UserError, match="not usable for multiple choice.*questions"):
        evaluate_mcq(tiny_model, tokenizer, items[:2], retain_reference=retain, progress=False)


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens-verbmem", "0"], "--max-new-tokens-verbmem"),
    (["--max-new-tokens-knowmem", "-2"], "--max-new-tokens-knowmem"),
    (["--verbmem-prompt-tokens", "0"], "--verbmem-prompt-tokens"),
    (["--max-new-tokens-verbmem", "100000000"], "context of 512 tokens"),
    (["--max-new-tokens-knowmem", "600"], "knowmem/"),
])
def test_muse_bad_numbers_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_model_load, extra, needle):
    args = ["eval", "muse", "--model", str(tiny_model_dir), "--data", str(FIX / "muse"), "--device", "cpu",
            "--out", str(tmp_path / "o"), *extra]
    assert needle in cli_error(args, capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--batch-size", "0"], "--batch-size")])
def test_mcq_bad_numbers_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_model_load, extra, needle):
    args = ["eval", "mcq", "--model", str(tiny_model_dir), "--data", str(FIX / "mcq" / "biology.jsonl"),
            "--device", "cpu", "--out", str(tmp_path / "o"), *extra]
    assert needle in cli_error(args, capsys)
    assert not (tmp_path / "o").exists()


def test_muse_mcq_out_folder_rules(tiny_model_dir, tmp_path, capsys, no_model_load):
    data = tmp_path / "data"
    data.mkdir()
    (data / "biology.jsonl").write_text((FIX / "mcq" / "biology.jsonl").read_text())
    mcq = ["eval", "mcq", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(data / "biology.jsonl")]
    assert "contains the input" in cli_error(mcq + ["--out", str(data)], capsys)
    assert "inside the input" in cli_error(mcq + ["--out", str(tiny_model_dir / "mcq")], capsys)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    assert "not empty" in cli_error(mcq + ["--out", str(foreign)], capsys)
    muse = ["eval", "muse", "--model", str(tiny_model_dir), "--device", "cpu", "--data", str(FIX / "muse")]
    assert "inside the input" in cli_error(muse + ["--out", str(FIX / "muse" / "out")], capsys)
    assert "not empty" in cli_error(muse + ["--out", str(foreign)], capsys)
    assert not (tiny_model_dir / "mcq").exists() and not (FIX / "muse" / "out").exists()
    # an unusable retain log is refused before loading, saying why
    (tmp_path / "ref.json").write_text(json.dumps({"summary": {"forget_prob": 0.3}}))
    assert "not usable for multiple choice" in cli_error(mcq + ["--retain-log", str(tmp_path / "ref.json"), "--out",
                                                           str(tmp_path / "o")], capsys)


def test_cli_mcq_rerun_quiet_and_marker(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mcq"
    args = ["eval", "mcq", "--model", str(tiny_model_dir), "--data", str(FIX / "mcq" / "biology.jsonl"),
            "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(args) == 0 and main(args) == 0  # the second run replaces our own earlier output
    marker = json.loads((out / ".unlearnkit.json").read_text())
    assert marker["kind"] == "eval mcq" and marker["files"] == ["EVAL.json", "SUMMARY.json"]
    assert "eval mcq" not in capsys.readouterr().err  # --quiet: no progress bar
    muse_out = tmp_path / "muse"
    assert main(["eval", "muse", "--model", str(tiny_model_dir), "--data", str(FIX / "muse"), "--out", str(muse_out),
                 "--max-new-tokens-verbmem", "2", "--max-new-tokens-knowmem", "2", "--device", "cpu", "--quiet"]) == 0
    assert json.loads((muse_out / ".unlearnkit.json").read_text())["kind"] == "eval muse"
    # an mcq folder is not a muse folder
    assert "`eval mcq`" in cli_error(["eval", "muse", "--model", str(tiny_model_dir), "--data", str(FIX / "muse"),
                                 "--out", str(out), "--device", "cpu"], capsys)
