"""Attacks: scoring attacked prompts equals the evaluation's own numbers and a direct computation of the
definitions; prompt attacks render what they say; relearning trains and is scored at the stated steps; both commands
check their inputs before any model loads and write ATTACK.json with a summary per subject."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import cli_error

from unlearnkit.attacks import jailbreak as J
from unlearnkit.attacks.relearn import RelearnConfig, relearn_curve, split_forget
from unlearnkit.attacks.score import Probe, score_probes, summarize_forget
from unlearnkit.eval.aggregate import reference_rows
from unlearnkit.cli import main
from unlearnkit.data import tofu
from unlearnkit.data.format import PromptFormat, encode_answer, encode_prompt, prompt_text
from unlearnkit.errors import UserError

ROWS = tofu.task("mini").forget


def clean_probes(tokenizer, rows, fmt=PromptFormat()):
    return [Probe(encode_prompt(tokenizer, r["question"], fmt), prompt_text(tokenizer, r["question"], fmt))
            for r in rows]


def test_clean_probes_score_exactly_like_eval_tofu(tiny_model, tokenizer):
    from unlearnkit.eval.tofu import evaluate_tofu, limit_task

    task = limit_task(tofu.task("mini"), 3)
    ev = evaluate_tofu(tiny_model, tokenizer, task, only_sets=("forget",), max_new_tokens=5, progress=False)
    f = ev["sets"]["forget"]
    cols = score_probes(tiny_model, tokenizer, task.forget, clean_probes(tokenizer, task.forget), max_new_tokens=5)
    for key in ("avg_gt_loss", "avg_paraphrased_loss"):
        np.testing.assert_allclose(cols[key], f[key], rtol=0, atol=1e-6)
    np.testing.assert_allclose(cols["average_perturb_loss"], f["average_perturb_loss"], rtol=0, atol=1e-6)
    assert cols["generated_text"] == f["generated_text"]
    assert cols["rougeL_recall"] == f["rougeL_recall"]


def test_prefill_scores_only_the_rest_of_each_answer(tiny_model, tokenizer):
    row, given = ROWS[0], 5
    prompt = encode_prompt(tokenizer, row["question"])
    cols = score_probes(tiny_model, tokenizer, [row], [Probe(prompt, "p", given)], generate=False)
    with torch.no_grad():
        for key, answer in (("avg_gt_loss", row["answer"]), ("avg_paraphrased_loss", row["paraphrased_answer"])):
            ids = encode_answer(tokenizer, answer)
            full = torch.tensor([prompt + ids])
            logp = torch.log_softmax(tiny_model(full).logits[0].double(), -1)
            # token t is predicted at position t-1; the first `given` answer tokens are context, not scored
            scored = range(len(prompt) + given, len(prompt) + len(ids))
            nll = -np.mean([logp[t - 1, full[0, t]].item() for t in scored])
            assert cols[key][0] == pytest.approx(nll, abs=1e-5)


def test_summarize_forget_against_the_definitions():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(0)
    n = 12
    cols = {"question": [r["question"] for r in ROWS[:n]], "answer": [r["answer"] for r in ROWS[:n]],
            "avg_gt_loss": list(rng.uniform(0.1, 3, n)), "avg_paraphrased_loss": list(rng.uniform(0.1, 3, n)),
            "average_perturb_loss": rng.uniform(0.1, 3, (n, 5)).tolist(), "flagged": [True] * 3 + [False] * 9}
    ref = {**cols, "avg_paraphrased_loss": list(rng.uniform(0.1, 3, n))}
    s = summarize_forget(cols, ref)
    assert s["forget_prob"] == pytest.approx(np.mean(np.exp(-np.array(cols["avg_gt_loss"]))))
    r = [np.exp(-np.mean(p)) / np.exp(-a) for a, p in zip(cols["avg_paraphrased_loss"], cols["average_perturb_loss"])]
    rr = [np.exp(-np.mean(p)) / np.exp(-a) for a, p in zip(ref["avg_paraphrased_loss"], ref["average_perturb_loss"])]
    assert s["forget_truth_ratio"] == pytest.approx(np.mean(np.minimum(r, 1 / np.array(r))))
    assert s["forget_quality"] == pytest.approx(ks_2samp(r, rr).pvalue)
    assert s["flag_rate"] == pytest.approx(0.25) and s["n"] == n
    assert "forget_rougeL_recall" not in s  # not generated: left out, not null
    assert summarize_forget(cols, None)["null_reasons"]["forget_quality"]


def test_reference_rows_match_by_question_and_refuse_a_missing_row():
    log = {"source": "log", "sets": {"forget": {"question": [r["question"] for r in ROWS[:4]],
                                                "avg_gt_loss": [0, 1, 2, 3], "answer": [r["answer"] for r in ROWS[:4]],
                                                "avg_paraphrased_loss": [0] * 4,
                                                "average_perturb_loss": [[0]] * 4}}}
    assert reference_rows(log, [ROWS[2], ROWS[0]])["avg_gt_loss"] == [2, 0]
    with pytest.raises(UserError, match="has no forget row"):
        reference_rows(log, [ROWS[5]])


def test_prompt_attacks_render_what_they_claim(tokenizer):
    ctx = J.AttackContext(tokenizer, PromptFormat(), ROWS, k=3, prefill_tokens=8)
    row = ROWS[3]
    assert J.clean(row, ctx).prompt_ids == encode_prompt(tokenizer, row["question"])
    assert row["paraphrased_question"] in J.paraphrase(row, ctx).prompt_text
    assert J.prefix_injection(row, ctx).prompt_text.endswith(J.PREFIX_INJECTION)
    assert J.prefill(row, ctx).given_answer_tokens == 8
    for attack in (J.roleplay, J.priming, J.language, J.context, J.icl, J.prefix_injection):
        probe = attack(row, ctx)
        assert row["question"] in probe.prompt_text
        assert probe.prompt_ids == tokenizer(probe.prompt_text, add_special_tokens=True)["input_ids"]
    others = ctx.others(row)
    assert len(others) == 3 and all(o["author"] == row["author"] and o is not row for o in others)
    icl = J.icl(row, ctx).prompt_text
    assert all(o["question"] in icl and o["answer"] in icl for o in others) and row["answer"] not in icl
    assert icl.count("<|im_start|>user") == 4 and "<|im_start|>system" not in icl
    assert all(o["answer"] in J.context(row, ctx).prompt_text for o in others)
    assert J.parse_attacks("prefill,icl") == ["clean", "prefill", "icl"]
    assert J.parse_attacks("all") == list(J.ATTACKS)
    with pytest.raises(UserError, match="unknown attack 'nope'"):
        J.parse_attacks("icl,nope")


def test_split_forget_random_is_seeded_and_shortest_takes_the_shortest(tokenizer):
    a, held = split_forget(ROWS, RelearnConfig(n=5, seed=1), tokenizer)
    assert len(a) == 5 and len(held) == 35 and not {r["question"] for r in a} & {r["question"] for r in held}
    assert a == split_forget(ROWS, RelearnConfig(n=5, seed=1), tokenizer)[0]
    assert a != split_forget(ROWS, RelearnConfig(n=5, seed=2), tokenizer)[0]
    short, held = split_forget(ROWS, RelearnConfig(n=5, relearn_set="shortest"), tokenizer)
    length = lambda r: len(encode_answer(tokenizer, r["answer"]))
    assert max(map(length, short)) <= min(map(length, held))
    with pytest.raises(UserError, match="--n 40"):
        split_forget(ROWS, RelearnConfig(n=40), tokenizer)


def test_relearn_curve_trains_and_scores_at_the_stated_steps(make_tiny_model, tokenizer):
    model = make_tiny_model(layers=2)
    taught, held = ROWS[:2], ROWS[2:4]
    before = score_probes(model, tokenizer, held, clean_probes(tokenizer, held), generate=False)
    cfg = RelearnConfig(n=2, steps=3, eval_every=2, lr=1e-2, batch_size=2, max_new_tokens=3)
    res = relearn_curve(model, tokenizer, taught, held, cfg, progress=False)
    assert [p["step"] for p in res["curve"]] == [0, 2, 3]
    assert res["samples"]["step_0"]["avg_gt_loss"] == before["avg_gt_loss"]
    assert res["curve"][-1]["relearned_prob"] > 2 * res["curve"][0]["relearned_prob"]  # relearning took
    assert "forget_rougeL_recall" in res["curve"][0] and "forget_rougeL_recall" not in res["curve"][1]
    assert len(res["train_log"]["steps"]) == 3


@pytest.mark.parametrize("extra, needle", [
    (["--n", "0"], "--n: must be a whole number >= 1"),
    (["--eval-every", "0"], "--eval-every"),
    (["--lr", "-1"], "--lr: must be a number > 0"),
    (["--limit", "0"], "--limit"),
    (["--controls", "retain,bogus"], "--controls: unknown value 'bogus'"),
])
def test_relearn_bad_options_exit_2_before_loading(tmp_path, tiny_model_dir, no_model_load, capsys, extra, needle):
    err = cli_error(["attack", "relearn", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *extra],
                    capsys)
    assert needle in err, err
    assert not (tmp_path / "o").exists()


def test_attack_inputs_checked_before_loading(tmp_path, tiny_model_dir, no_model_load, capsys):
    base = ["attack", "jailbreak", "--out", str(tmp_path / "o")]
    assert "nothing to attack" in cli_error(base, capsys)
    assert "unknown attack 'gcgx'" in cli_error(base + ["--model", str(tiny_model_dir), "--attacks", "gcgx"], capsys)
    assert "--model" in cli_error(base + ["--model", str(tmp_path / "missing")], capsys)
    bad_log = tmp_path / "retain.json"
    bad_log.write_text(json.dumps({"split": "forget05", "sets": {"forget": {
        "question": ["q"], "answer": ["a"], "avg_gt_loss": [1.0], "avg_paraphrased_loss": [1.0],
        "average_perturb_loss": [[1.0]]}}}))
    assert "forget05" in cli_error(base + ["--model", str(tiny_model_dir), "--retain-log", str(bad_log)], capsys)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    err = cli_error(["attack", "relearn", "--model", str(tiny_model_dir), "--out", str(foreign)], capsys)
    assert "not empty" in err and (foreign / "notes.txt").read_text() == "keep me"
    assert "is inside the input" in cli_error(["attack", "relearn", "--model", str(tiny_model_dir), "--out",
                                               str(tiny_model_dir / "attack")], capsys)


def test_relearn_cli_with_a_retain_control(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "rel"
    argv = ["attack", "relearn", "--model", f"mine={tiny_model_dir}", "--controls", "retain", "--retain-model",
            str(tiny_model_dir), "--limit", "4", "--n", "2", "--steps", "2", "--eval-every", "1", "--max-new-tokens",
            "3", "--lr", "1e-3", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "ATTACK.json").read_text())
    assert list(doc["summary"]) == ["mine", "retain"]
    for per in doc["summary"].values():
        assert list(per) == ["step_0", "step_1", "step_2"]
        assert {"forget_prob", "forget_truth_ratio", "forget_quality", "relearned_prob"} <= set(per["step_0"])
    # Same weights, same seed: the model and the control relearn identically; at step 0 both equal the reference.
    assert doc["summary"]["mine"] == doc["summary"]["retain"]
    assert doc["summary"]["retain"]["step_0"]["forget_quality"] == pytest.approx(1.0)
    assert doc["forget_quality_reference"] == "the retain control before relearning"
    assert len(doc["heldout_questions"]) == 2
    samples = json.loads((out / "SAMPLES.json").read_text())
    assert set(samples["mine"]) == {"step_0", "step_1", "step_2"}
    assert (out / "RELEARN.png").stat().st_size > 1000
    assert main(argv) == 0  # its own earlier output is replaced


def test_jailbreak_cli_with_controls_and_an_eco_guard(tmp_path, tiny_model_dir, capsys):
    from unlearnkit.eco.classifier import PromptClassifier
    from unlearnkit.eco.guard import EcoGuard
    from unlearnkit.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    flag_all = PromptClassifier(coef=np.zeros(384, dtype=np.float32), intercept=10.0, tau=0.5)
    art = EcoGuard(model, tok, flag_all).save(tmp_path / "art")
    out = tmp_path / "jb"
    argv = ["attack", "jailbreak", "--model", str(tiny_model_dir), "--eco", f"g={art}", "--eco-model",
            str(tiny_model_dir), "--controls", "retain", "--retain-model", str(tiny_model_dir), "--attacks",
            "icl,prefill", "--limit", "4", "--k", "2", "--max-new-tokens", "3", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "ATTACK.json").read_text())
    assert set(doc["summary"]) == {"tiny", "eco:g", "retain"}
    for per in doc["summary"].values():
        assert list(per) == ["clean", "icl", "prefill"]
        assert per["icl"]["forget_quality_reference"] == "retain model, same attack"
    assert doc["summary"]["tiny"] == doc["summary"]["retain"]  # same weights
    assert doc["summary"]["eco:g"]["icl"]["flag_rate"] == 1.0
    assert doc["summary"]["eco:g"]["clean"]["forget_prob"] != doc["summary"]["tiny"]["clean"]["forget_prob"]
    assert doc["notes"] and "black-box" in doc["notes"][0]
    assert (out / "JAILBREAK.png").stat().st_size > 1000


def test_jailbreak_cli_gcg_per_question_and_universal(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "gcg"
    argv = ["attack", "jailbreak", "--model", str(tiny_model_dir), "--controls", "none", "--attacks",
            "gcg,gcg_universal", "--limit", "3", "--gcg-n", "1", "--gcg-universal-n", "1", "--gcg-steps", "2",
            "--gcg-candidates", "4", "--gcg-suffix-len", "3", "--gcg-top-k", "8", "--max-new-tokens", "2", "--quiet",
            "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "ATTACK.json").read_text())
    per = doc["summary"]["tiny"]
    assert list(per) == ["clean", "gcg", "clean@gcg", "gcg_universal", "clean@gcg_universal"]
    assert per["gcg"]["n"] == 1 and per["gcg_universal"]["n"] == 2 and per["clean@gcg_universal"]["n"] == 2
    attacks = doc["subjects"]["tiny"]["attacks"]
    (row,) = doc["settings"]["gcg_rows"]
    detail = attacks["gcg"]["gcg"]["per_question"][0]
    assert detail["row"] == row and len(detail["suffix_ids"]) == 3 and detail["loss"] <= detail["initial_loss"]
    universal = attacks["gcg_universal"]
    assert universal["gcg"]["fit_rows"] == doc["settings"]["gcg_universal_fit_rows"]
    assert not set(universal["rows"]) & set(universal["gcg"]["fit_rows"])  # scored on unseen questions only
    samples = json.loads((out / "SAMPLES.json").read_text())["tiny"]
    # The per-question attacked prompt is the question's prompt with the found suffix inserted before the turn end.
    from unlearnkit.attacks.gcg import gcg_targets
    from unlearnkit.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    target = gcg_targets(tok, [(ROWS[row]["question"], ROWS[row]["answer"])])[0]
    assert samples["gcg"]["attacked_prompt"][0] == tok.decode(target.prompt_ids(detail["suffix_ids"]))


def test_an_interrupted_attack_run_reuses_its_finished_subjects(tmp_path, tiny_model_dir, capsys, monkeypatch):
    out = tmp_path / "jb"
    argv = ["attack", "jailbreak", "--model", f"a={tiny_model_dir}", "--model", f"b={tiny_model_dir}", "--controls",
            "none", "--attacks", "prefill", "--limit", "2", "--max-new-tokens", "2", "--quiet", "--out", str(out)]
    real, calls = J.attack_model, []

    def dies_on_the_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(J, "attack_model", dies_on_the_second)
    assert main(argv) == 130 and not out.exists()
    capsys.readouterr()
    partial = tmp_path / ".jb.partial"
    assert len(list(partial.glob("*.json"))) == 2  # settings + subject a
    # Other settings: refused before any work, the partial results kept.
    err = cli_error(argv[:-2] + ["--k", "2", "--out", str(out)], capsys)
    assert "partial results of a different run" in err and "k: 3 → 2" in err and partial.exists()
    calls.clear()
    monkeypatch.setattr(J, "attack_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(argv) == 0
    assert len(calls) == 1 and "a: reusing its result" in capsys.readouterr().out  # only b was attacked
    assert not partial.exists()
    doc = json.loads((out / "ATTACK.json").read_text())
    assert doc["summary"]["a"] == doc["summary"]["b"]  # same weights: the reused result equals the fresh one
    assert doc["summary"]["a"]["prefill"]["n"] == 2
