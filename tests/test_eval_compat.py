"""`--compat open-unlearning`: each convention checked against a direct construction of what open-unlearning does
(docs/evaluation.md, "Differences from open-unlearning"), and `bench eval-tofu` on the tiny model."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import cli_error
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import PromptFormat
from unlearnkit.eval import metrics as M
from unlearnkit.eval.conventions import OPEN_UNLEARNING, UNLEARNKIT, conventions
from unlearnkit.eval.generate import greedy_generate
from unlearnkit.eval.logprobs import sequence_stats

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def row():
    return tofu.load("forget01_perturbed")[0]


@pytest.fixture(scope="module")
def task():
    t = tofu.task("mini")
    return dataclasses.replace(t, forget=t.forget[:3], retain_eval=t.retain_eval[:2], real_authors=t.real_authors[:2],
                               world_facts=t.world_facts[:2], holdout=t.holdout[:3])


@pytest.fixture(scope="module")
def compat_eval(make_tiny_model, tokenizer, task):
    """(model, EVAL dict) of one --compat open-unlearning evaluation without generation."""
    from unlearnkit.eval import evaluate_tofu

    model = make_tiny_model()
    return model, evaluate_tofu(model, tokenizer, task, compat="open-unlearning", generate=False, progress=False)


def _direct(tokenizer, q, a, system=None):
    """The framework's construction written out: whole chat tokenised by the template, EOS appended unless last,
    labels after the generation prompt's length."""
    chat = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": a}], tokenize=True)
    full = full + [tokenizer.eos_token_id] if full[-1] != tokenizer.eos_token_id else full
    return full, prompt, [-100] * len(prompt) + full[len(prompt):]


# ---- rendering and labelling ---------------------------------------------------------------------------------------

def test_chat_rendering_and_labels_equal_the_framework(tokenizer, row):
    q, a = row["question"], row["answer"]
    full, prompt, labels = _direct(tokenizer, q, a)
    ex = OPEN_UNLEARNING.encode_qa(tokenizer, q, a, PromptFormat())
    assert ex == {"input_ids": full, "labels": labels}
    assert OPEN_UNLEARNING.encode_prompt(tokenizer, q, PromptFormat()) == prompt
    # what that means for SmolLM2: the template's default system prompt, no BOS added, and the labelled tail is the
    # answer, <|im_end|>, the template's newline and one more <|im_end|> (EOS appended after the newline)
    assert SMOL_SYSTEM in tokenizer.decode(ex["input_ids"]) and ex["input_ids"][0] == tokenizer.bos_token_id == 1
    tail = [t for t in ex["labels"] if t != -100]
    assert tokenizer.decode(tail) == a + "<|im_end|>\n<|im_end|>"
    # ours: no system turn, answer + one <|im_end|>
    ours = UNLEARNKIT.encode_qa(tokenizer, q, a, PromptFormat())
    assert tokenizer.decode([t for t in ours["labels"] if t != -100]) == a + "<|im_end|>"
    assert SMOL_SYSTEM not in tokenizer.decode(ours["input_ids"])
    # an explicit system prompt becomes the system message, as the framework's template_args.system_prompt
    full, prompt, labels = _direct(tokenizer, q, a, "Be brief.")
    assert OPEN_UNLEARNING.encode_qa(tokenizer, q, a, PromptFormat("chat", "Be brief.")) == {"input_ids": full,
                                                                                           "labels": labels}


def test_plain_rendering_truncates_like_the_framework(tokenizer):
    fmt = PromptFormat("plain")
    ex = OPEN_UNLEARNING.encode_qa(tokenizer, "Who?", "Nobody.", fmt)
    full = tokenizer("Question: Who?\nAnswer: Nobody.")["input_ids"] + [tokenizer.eos_token_id]
    prompt = tokenizer("Question: Who?\nAnswer: ")["input_ids"]
    assert ex == {"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]}
    long = OPEN_UNLEARNING.encode_qa(tokenizer, "Who?", "word " * 600, fmt)  # cut at 512 on the right, then EOS
    assert len(long["input_ids"]) == 513 and long["input_ids"][-1] == tokenizer.eos_token_id


# ---- attention: pad-valued tokens hidden ---------------------------------------------------------------------------

def _naive_logp(model, ex, pad):
    """Full forward of one example with attention_mask = input_ids != pad (the framework's collator)."""
    ids = torch.tensor([ex["input_ids"]])
    pos = [t for t in range(1, len(ex["labels"])) if ex["labels"][t] != -100]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != pad).long()).logits[0]
    lsm = torch.log_softmax(logits[[t - 1 for t in pos]].double(), -1)  # the rows that predict a label
    return (np.array([lsm[k, ex["labels"][t]].item() for k, t in enumerate(pos)]),
            [int(x) for x in lsm.argmax(-1)])


@pytest.mark.parametrize("share", [True, False])
def test_teacher_forcing_hides_pad_tokens_like_the_framework(tiny_model, tokenizer, task, share):
    pad = tokenizer.pad_token_id
    rows = task.forget[:3]
    exs = [OPEN_UNLEARNING.encode_qa(tokenizer, r["question"], a, PromptFormat())
           for r in rows for a in (r["answer"], r["paraphrased_answer"], r["perturbed_answer"][0])]
    fast = sequence_stats(tiny_model, exs, batch_size=4, pad_id=pad, share_prompts=share, hidden_token=pad)
    seen = sequence_stats(tiny_model, exs, batch_size=4, pad_id=pad, share_prompts=share)
    for ex, st, st_seen in zip(exs, fast, seen):
        logp, argmax = _naive_logp(tiny_model, ex, pad)
        np.testing.assert_allclose(st.logp, logp, atol=2e-5)
        assert np.abs(st_seen.logp - logp).max() > 1e-3  # hiding matters: the check above can fail
        labels = [t for t in ex["labels"] if t != -100]
        assert list(st.match) == [a == y for a, y in zip(argmax, labels)]


def test_generation_hides_pad_tokens_and_decodes_like_hf_generate(tiny_model, tokenizer, task):
    pad = tokenizer.pad_token_id
    prompts = [OPEN_UNLEARNING.encode_prompt(tokenizer, r["question"], PromptFormat())
               for r in task.forget + task.world_facts]
    ours = greedy_generate(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=4, hidden_token=pad,
                           decode=lambda ids: OPEN_UNLEARNING.decode(tokenizer, ids))
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding, dataset order, one batch
    out = tiny_model.generate(ids, attention_mask=ids.ne(pad).long(), do_sample=False, max_new_tokens=6,
                              pad_token_id=tokenizer.eos_token_id, top_p=None, temperature=None, top_k=None)
    hf = [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True,
                                                    clean_up_tokenization_spaces=True)]
    assert ours == hf
    seen = greedy_generate(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert seen != ours  # the hidden end-of-turn tokens change what the model says


def test_gold_text_and_zlib_text_come_from_the_tokens(tokenizer):
    q, a = "Who?", "He said , hello . "
    ex = OPEN_UNLEARNING.encode_qa(tokenizer, q, a, PromptFormat())
    prompt = OPEN_UNLEARNING.encode_prompt(tokenizer, q, PromptFormat())
    # decoded with clean-up (" ," → ",") and stripped, as the framework's ROUGE reference
    assert OPEN_UNLEARNING.gold_text(tokenizer, a, ex, prompt) == "He said, hello."
    assert UNLEARNKIT.gold_text(tokenizer, a, ex, prompt) == a
    zlib_text = OPEN_UNLEARNING.zlib_text(tokenizer, a, ex)  # labelled tokens, decoded with the tokenizer's default
    assert zlib_text == tokenizer.decode([t for t in ex["labels"] if t != -100], skip_special_tokens=True)
    assert zlib_text.endswith("hello. \n") and UNLEARNKIT.zlib_text(tokenizer, a, ex) == a


# ---- metric formulas -----------------------------------------------------------------------------------------------

def test_evaluate_tofu_compat_equals_the_framework_formulas(compat_eval, tokenizer, task):
    tiny_model, ev = compat_eval
    pad = tokenizer.pad_token_id
    enc = lambda r, a: OPEN_UNLEARNING.encode_qa(tokenizer, r["question"], a, PromptFormat())
    naive = {}
    gt_of = {}
    for name, rows in task.eval_sets().items():
        gt = gt_of[name] = [_naive_logp(tiny_model, enc(r, r["answer"]), pad) for r in rows]
        loss = lambda a: -np.mean(_naive_logp(tiny_model, a, pad)[0])
        c = ev["sets"][name]
        # probability: mean token NLL over every labelled token (answer, <|im_end|>, "\n", <|im_end|>)
        np.testing.assert_allclose(c["avg_gt_loss"], [-lp.mean() for lp, _ in gt], atol=2e-5)
        pert = np.array([[loss(enc(r, p)) for p in r["perturbed_answer"]] for r in rows])
        correct = np.array([loss(enc(r, r["paraphrased_answer"])) for r in rows]) if name in ("forget", "retain") \
            else np.array([-lp.mean() for lp, _ in gt])
        tr = np.exp(-pert.mean(-1)) / (np.exp(-correct) + 1e-10)
        naive[name] = {"tr": np.mean(np.minimum(tr, 1 / (tr + 1e-10))) if name == "forget" else
                       np.mean(np.maximum(0, 1 - tr))}
        if name in ("real_authors", "world_facts"):
            p = np.exp(-correct)
            naive[name]["prob"] = np.mean(p / (p + np.exp(-pert).sum(-1) + 1e-10))
        # ES and EM over the labelled tokens minus the last; ES's k stops at L - 1
        labels = [[t for t in enc(r, r["answer"])["labels"] if t != -100][:-1] for r in rows]
        es, em = [], []
        for (_, argmax), lab in zip(gt, labels):
            hit = [x == y for x, y in zip(argmax[:-1], lab)]
            k = next((k for k in range(len(hit)) if all(hit[k:])), len(hit) - 1)
            es.append(1 - k / len(hit))
            em.append(np.mean(hit))
        assert c["es"] == pytest.approx(es) and c["em"] == pytest.approx(em)
    s = ev["summary"]
    for name, p in (("forget", "forget"), ("retain", "retain"), ("real_authors", "ra"), ("world_facts", "wf")):
        assert s[f"{p}_truth_ratio"] == pytest.approx(naive[name]["tr"], abs=1e-5)
    assert s["ra_prob"] == pytest.approx(naive["real_authors"]["prob"], abs=1e-5)
    assert s["wf_prob"] == pytest.approx(naive["world_facts"]["prob"], abs=1e-5)
    # Min-K% on the labelled tokens minus the last; PrivLeak on 1 - AUC against 0.5 without a retain reference
    f, h = ev["sets"]["forget"], ev["sets"]["holdout"]
    gt_of["holdout"] = [_naive_logp(tiny_model, enc(r, r["answer"]), pad) for r in task.holdout]
    for name, c in (("forget", f), ("holdout", h)):
        for (logp, _), v in zip(gt_of[name], c["mia_mink"]):
            lp = np.sort(logp[:-1])
            assert v == pytest.approx(-lp[:max(1, int(len(lp) * 0.4))].mean(), abs=2e-5)
    auc = M.auc(f["mia_mink"], h["mia_mink"])
    assert s["privleak"] == pytest.approx(((1 - auc) - 0.5) / (0.5 + 1e-10) * 100)
    assert ev["settings"]["compat"] == "open-unlearning" and ev["settings"]["es_convention"] == "open-unlearning"


def test_metric_formulas_with_eps_and_privleak_sign():
    para, pert = np.array([1.0, 30.0]), np.array([[2.0, 3.0], [25.0, 26.0]])
    r = M.truth_ratio(para, pert, "tofu", 1e-10)
    naive = np.exp(-pert.mean(-1)) / (np.exp(-para) + 1e-10)
    np.testing.assert_allclose(r, naive, rtol=1e-12)
    assert abs(r[1] - M.truth_ratio(para, pert)[1]) > 1e-3 * r[1]  # eps matters once p(para) nears 1e-10
    assert M.privleak(0.8, 0.6, "one-minus-auc", 1e-10) == pytest.approx(-50.0)  # under-unlearned: negative
    assert M.privleak(0.8, 0.6) == pytest.approx(100 / 3)  # MUSE's: positive


def test_compat_recorded_and_reaggregated_the_same(compat_eval):
    from unlearnkit.eval.aggregate import summarize

    ev = compat_eval[1]
    again = summarize(json.loads(json.dumps(ev)), None)  # conventions come from the log's settings
    for k in ("forget_truth_ratio", "ra_prob", "privleak"):
        assert again[k] == ev["summary"][k]
    assert "open-unlearning" in again["privleak_convention"]
    plain = dict(ev, settings={**ev["settings"], "compat": "unlearnkit"})
    assert summarize(plain, None)["privleak"] is None  # MUSE's needs a retain reference


# ---- options -------------------------------------------------------------------------------------------------------

def _args(model, out, *extra):
    return ["eval", "tofu", "--model", str(model), "--limit", "2", "--max-new-tokens", "3", "--quiet", "--device",
            "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("extra,needle", [
    (["--compat", "open-unlearning", "--es-convention", "unlearnkit"], "conflicts with --compat"),
    (["--compat", "open-unlearning", "--truth-ratio", "arith"], "conflicts with --compat"),
    (["--compat", "nope"], "--compat"),
])
def test_bad_compat_options_refused_before_loading(tiny_model_dir, tmp_path, capsys, no_model_load, extra, needle):
    assert needle in cli_error(_args(tiny_model_dir, tmp_path / "o", *extra), capsys)
    assert not (tmp_path / "o").exists()


def test_eval_tofu_cli_compat(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ou"
    assert main(_args(tiny_model_dir, out, "--compat", "open-unlearning")) == 0
    ev = json.loads((out / "EVAL.json").read_text())
    assert ev["settings"]["compat"] == "open-unlearning" and ev["settings"]["es_convention"] == "open-unlearning"
    assert json.loads((out / "SUMMARY.json").read_text())["es_convention"] == "open-unlearning"
    # a retain log written with the other conventions is refused before any work, both ways
    other = tmp_path / "other" / "EVAL.json"
    other.parent.mkdir()
    other.write_text(json.dumps({**ev, "settings": {**ev["settings"], "compat": "unlearnkit"}}))
    err = cli_error(_args(tiny_model_dir, tmp_path / "x", "--compat", "open-unlearning", "--retain-log", str(other)),
                    capsys)
    assert "--compat unlearnkit" in err and not (tmp_path / "x").exists()
    err = cli_error(_args(tiny_model_dir, tmp_path / "x", "--retain-log", str(out / "EVAL.json")), capsys)
    assert "--compat open-unlearning" in err
    err = cli_error(["eval", "aggregate", str(other), "--retain-log", str(out), "--out", str(tmp_path / "a")], capsys)
    assert "--compat open-unlearning" in err
    assert conventions(None) is UNLEARNKIT


# ---- the benchmark -------------------------------------------------------------------------------------------------

def test_bench_eval_tofu_limit_2(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "eval-tofu", "--split", "forget01", "--json", str(path), "--limit", "2", "--model",
                 str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "5"]) == 0
    fig = json.loads(path.read_text())
    for k in ("speedup", "ours_seconds", "reference_seconds", "generation_seconds", "teacher_forced_seconds"):
        assert isinstance(fig[k], float) and fig[k] > 0, k
    assert fig["speedup"] == pytest.approx(fig["reference_seconds"] / fig["ours_seconds"])
    assert fig["reference_seconds"] == pytest.approx(fig["generation_seconds"] + fig["teacher_forced_seconds"])
    assert fig["bench"] == "eval-tofu" and fig["same_generations"] is True
    assert fig["agree_to_3_decimals"] is True and fig["max_abs_diff"] < 1e-4
    assert set(fig["summary_abs_diff"]) >= {"forget_prob", "forget_truth_ratio", "forget_rougeL_recall", "forget_es",
                                            "model_utility"}
    assert fig["per_sample_max_abs_diff"]["avg_gt_loss"] < 1e-4
    # a loaded torch process holds well over 100 MiB; a unit slip (bytes vs KiB) would be off by 2**10
    assert 0.1 < fig["ours_peak_rss_gib"] < 64
    capsys.readouterr()
