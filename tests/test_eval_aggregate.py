"""`eval aggregate` on original-TOFU-format logs (dict-by-index and list layouts) and on EVAL.json: headline numbers
against direct computations from the fixture values; bad input gives one-line errors (exit 2) or reasoned nulls."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unlearnkit.cli import main
from unlearnkit.errors import UserError
from unlearnkit.eval.aggregate import aggregate

FILES = {"forget": "eval_log_forget.json", "retain": "eval_log.json",
         "real_authors": "eval_real_author_wo_options.json", "world_facts": "eval_real_world_wo_options.json"}
SIZES = {"forget": 6, "retain": 7, "real_authors": 5, "world_facts": 4}


def make_logs(seed: int, n_forget: int = 6) -> dict:
    """Random per-sample values shaped like the TOFU codebase's logs (lists; convert to dict layout as needed)."""
    r = np.random.default_rng(seed)
    logs = {}
    for name, n in {**SIZES, "forget": n_forget}.items():
        k = 5 if name in ("forget", "retain") else 3
        gt = r.uniform(0.2, 3, n).tolist()
        logs[name] = {"avg_gt_loss": gt,
                      "avg_paraphrased_loss": gt if name in ("real_authors", "world_facts")
                      else r.uniform(0.2, 3, n).tolist(),
                      "average_perturb_loss": r.uniform(0.2, 3, (n, k)).tolist(),
                      "rougeL_recall": r.uniform(0, 1, n).tolist(),
                      "generated_text": [[f"Q{name}{i}?", f"gen {i}", f"gold {i}"] for i in range(n)]}
    return logs


def write_logs(folder, logs, layout="dict"):
    folder.mkdir(parents=True, exist_ok=True)
    for name, cols in logs.items():
        if layout == "dict":
            cols = {f: {str(i): v for i, v in enumerate(vals)} for f, vals in cols.items()}
        (folder / FILES[name]).write_text(json.dumps(cols))
    return folder


def expected(logs, ret=None) -> dict:
    """Direct computation of TOFU's headline numbers from the definitions."""
    out = {}
    pre = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}
    tr = {}
    for name, c in logs.items():
        p = pre[name]
        n = len(c["avg_gt_loss"])
        probs = []
        for i in range(n):
            pt = math.exp(-c["avg_gt_loss"][i])
            if name in ("forget", "retain"):
                probs.append(pt)
            else:
                probs.append(pt / (pt + sum(math.exp(-x) for x in c["average_perturb_loss"][i])))
        out[f"{p}_prob"] = sum(probs) / n
        pert = c["average_perturb_loss"]
        tr[name] = [math.prod(math.exp(-x) for x in pert[i]) ** (1 / len(pert[i])) / math.exp(-c["avg_paraphrased_loss"][i])
                    for i in range(n)]
        out[f"{p}_truth_ratio"] = (sum(min(x, 1 / x) for x in tr[name]) / n if name == "forget"
                                   else sum(max(0, 1 - x) for x in tr[name]) / n)
        out[f"{p}_rougeL_recall"] = sum(c["rougeL_recall"]) / n
    nine = [out[f"{p}_{k}"] for p in ("retain", "ra", "wf") for k in ("prob", "rougeL_recall", "truth_ratio")]
    out["model_utility"] = 0.0 if 0 in nine else len(nine) / sum(1 / v for v in nine)
    if ret is not None:
        from scipy.stats import ks_2samp

        rp = ret["forget"]["average_perturb_loss"]
        rtr = [math.exp(np.mean(rp[i]) * -1) / math.exp(-ret["forget"]["avg_paraphrased_loss"][i])
               for i in range(len(rp))]
        out["forget_quality"] = ks_2samp(tr["forget"], rtr).pvalue
    return out


def check(summary, exp):
    for k, v in exp.items():
        assert summary[k] == pytest.approx(v, rel=1e-9), k


@pytest.mark.parametrize("layout", ["dict", "list"])
def test_aggregate_tofu_logs_both_layouts(tmp_path, layout):
    logs, ret = make_logs(0), make_logs(1)
    model_dir = write_logs(tmp_path / "model", logs, layout)
    retain_dir = write_logs(tmp_path / "retain", ret, "dict")
    s = aggregate(model_dir)
    check(s, expected(logs))
    assert s["forget_quality"] is None and s["null_reasons"]["forget_quality"]
    s = aggregate(model_dir, retain_dir)
    check(s, expected(logs, ret))
    assert 0 < s["forget_quality"] <= 1


def test_aggregated_tofu_file_and_single_file(tmp_path):
    logs, ret = make_logs(2), make_logs(3)
    agg = tmp_path / "eval_log_aggregated.json"
    agg.write_text(json.dumps({FILES[n]: c for n, c in logs.items()}))
    write_logs(tmp_path / "retain", {"forget": ret["forget"]})
    s = aggregate(agg, tmp_path / "retain" / "eval_log_forget.json")
    check(s, expected(logs, {"forget": ret["forget"]}))


def test_cli_contract_writes_summary(tmp_path, capsys):
    logs, ret = make_logs(4), make_logs(5)
    write_logs(tmp_path / "m", logs)
    write_logs(tmp_path / "r", ret, "list")
    assert main(["eval", "aggregate", str(tmp_path / "m"), "--out", str(tmp_path / "o1")]) == 0
    s = json.loads((tmp_path / "o1" / "SUMMARY.json").read_text())
    keys = ["model_utility", "forget_quality", "forget_truth_ratio", "forget_rougeL_recall", "forget_prob",
            "retain_prob", "retain_rougeL_recall", "retain_truth_ratio"] + [
        f"{p}_{k}" for p in ("ra", "wf") for k in ("prob", "rougeL_recall", "truth_ratio")]
    assert set(keys) <= set(s) and s["forget_quality"] is None
    check(s, expected(logs))
    assert main(["eval", "aggregate", str(tmp_path / "m"), "--retain-log", str(tmp_path / "r"),
                 "--out", str(tmp_path / "o2")]) == 0
    check(json.loads((tmp_path / "o2" / "SUMMARY.json").read_text()), expected(logs, ret))
    assert "model_utility" in capsys.readouterr().out


def test_eval_json_roundtrip(tmp_path, tiny_model, tokenizer):
    """Our EVAL.json re-aggregates to the same summary, and serves as a retain reference."""
    import dataclasses

    from unlearnkit.data import tofu
    from unlearnkit.eval import evaluate_tofu, write_eval

    t = tofu.task("mini")
    t = dataclasses.replace(t, forget=t.forget[:4], retain_eval=t.retain_eval[:3], real_authors=t.real_authors[:3],
                            world_facts=t.world_facts[:3], holdout=t.holdout[:4])
    ev = evaluate_tofu(tiny_model, tokenizer, t, max_new_tokens=4, progress=False)
    write_eval(tmp_path / "run", ev)
    s = aggregate(tmp_path / "run" / "EVAL.json")
    for k, v in ev["summary"].items():
        if isinstance(v, float):
            assert s[k] == pytest.approx(v, rel=1e-12), k
    s2 = aggregate(tmp_path / "run", tmp_path / "run" / "EVAL.json")
    assert s2["forget_quality"] == pytest.approx(1.0)  # identical truth ratios
    assert s2["privleak"] == pytest.approx(0.0) and s2["mia_auc_reference"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "run" / "SUMMARY.json").read_text())["forget_prob"] == pytest.approx(
        ev["summary"]["forget_prob"])


def _run_err(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("unlearnkit: error:") and "\n" not in err, err
    return err


def test_bad_input_one_line_errors(tmp_path, capsys):
    logs = make_logs(6)
    m = write_logs(tmp_path / "m", logs)
    out = tmp_path / "out"
    # retain log from another split (forget05 has 200 rows, here: a different length)
    write_logs(tmp_path / "r_len", make_logs(7, n_forget=9))
    err = _run_err(["eval", "aggregate", str(m), "--retain-log", str(tmp_path / "r_len"), "--out", str(out)], capsys)
    assert "9 forget samples" in err and "6" in err
    # same length, other questions
    other = make_logs(8)
    other["forget"]["generated_text"] = [[f"Other question {i}?", "g", "a"] for i in range(6)]
    write_logs(tmp_path / "r_q", other)
    assert "another split" in _run_err(["eval", "aggregate", str(m), "--retain-log", str(tmp_path / "r_q"),
                                        "--out", str(out)], capsys)
    # missing field
    bad = make_logs(6)
    del bad["retain"]["avg_paraphrased_loss"]
    write_logs(tmp_path / "missing", bad)
    err = _run_err(["eval", "aggregate", str(tmp_path / "missing"), "--out", str(out)], capsys)
    assert "avg_paraphrased_loss" in err and "eval_log.json" in err
    # NaN value
    nan = make_logs(6)
    nan["forget"]["avg_gt_loss"][3] = float("nan")
    write_logs(tmp_path / "nan", nan)
    err = _run_err(["eval", "aggregate", str(tmp_path / "nan"), "--out", str(out)], capsys)
    assert "avg_gt_loss" in err and "row 3" in err
    # mismatched lengths inside one log
    short = make_logs(6)
    short["forget"]["rougeL_recall"] = short["forget"]["rougeL_recall"][:4]
    write_logs(tmp_path / "short", short, "list")
    assert "rougeL_recall" in _run_err(["eval", "aggregate", str(tmp_path / "short"), "--out", str(out)], capsys)
    # not a log, no such path, split names differ in EVAL.json
    (tmp_path / "x.json").write_text("{\"a\": 1}")
    _run_err(["eval", "aggregate", str(tmp_path / "x.json"), "--out", str(out)], capsys)
    _run_err(["eval", "aggregate", str(tmp_path / "nope"), "--out", str(out)], capsys)
    ev = {"split": "forget01", "sets": {n: c for n, c in make_logs(9).items()}}
    (tmp_path / "a.json").write_text(json.dumps(ev))
    (tmp_path / "b.json").write_text(json.dumps({**ev, "split": "forget05"}))
    assert "forget05" in _run_err(["eval", "aggregate", str(tmp_path / "a.json"), "--retain-log",
                                   str(tmp_path / "b.json"), "--out", str(out)], capsys)
    assert not out.exists()  # nothing half-written


def test_missing_sets_give_reasoned_nulls(tmp_path):
    logs = make_logs(10)
    write_logs(tmp_path / "f", {"forget": logs["forget"]})
    s = aggregate(tmp_path / "f")
    assert s["forget_prob"] is not None
    assert s["model_utility"] is None and "retain_prob" in s["null_reasons"]["model_utility"]
    assert s["retain_prob"] is None and s["null_reasons"]["retain_prob"]


# ---- retain-log matching (prompt templates in original TOFU logs) -------------------------------------------------

TEMPLATES = {"llama2": lambda q: f"[INST] {q} [/INST]", "phi": lambda q: f"Question: {q}\n",
             "phi_answer": lambda q: f"Question: {q}\nAnswer:",
             "chatml": lambda q: f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"}


def templated(logs: dict, template: str, questions, answers) -> dict:
    """Logs whose generated_text carries the question as the TOFU code logs it: inside the model's prompt."""
    out = {name: dict(cols) for name, cols in logs.items()}
    out["forget"]["generated_text"] = [[TEMPLATES[template](q), f"gen {i}", f" {a}"]
                                       for i, (q, a) in enumerate(zip(questions, answers))]
    return out


def eval_json(logs: dict, questions, answers, split="forget01") -> dict:
    """Our EVAL.json layout (bare questions and answers), from the same per-sample values."""
    sets = {}
    for name, cols in logs.items():
        c = {k: v for k, v in cols.items() if k != "generated_text"}
        n = len(c["avg_gt_loss"])
        c["question"] = list(questions) if name == "forget" else [f"Q{name}{i}?" for i in range(n)]
        c["answer"] = list(answers) if name == "forget" else [f"gold {i}" for i in range(n)]
        sets[name] = c
    return {"format": "unlearnkit-eval/1", "split": split, "sets": sets}


QS = [f"What is  the name of author {i}?" for i in range(6)]
AS = [f"The author {i} is called Name{i}." for i in range(6)]


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_retain_tofu_log_with_prompt_template_matches_eval_json(tmp_path, template):
    logs, ret = make_logs(20), make_logs(21)
    (tmp_path / "EVAL.json").write_text(json.dumps(eval_json(logs, QS, AS)))
    write_logs(tmp_path / "retain", templated(ret, template, [" ".join(q.split()) for q in QS], AS))
    s = aggregate(tmp_path / "EVAL.json", tmp_path / "retain")
    check(s, {"forget_quality": expected(logs, ret)["forget_quality"]})
    assert s["retain_log_match"] == "question" and "template" in s["retain_log_match_convention"]


def test_two_tofu_logs_with_different_templates_match(tmp_path):
    logs, ret = make_logs(22), make_logs(23)
    write_logs(tmp_path / "m", templated(logs, "llama2", QS, AS))
    write_logs(tmp_path / "r", templated(ret, "phi", QS, AS), "list")
    s = aggregate(tmp_path / "m", tmp_path / "r")
    assert s["retain_log_match"] == "question"
    check(s, expected(logs, ret))


def test_retain_log_matched_by_position_when_answers_agree(tmp_path):
    logs, ret = make_logs(24), make_logs(25)
    write_logs(tmp_path / "m", templated(logs, "llama2", QS, AS))
    odd = templated(ret, "llama2", QS, AS)  # an unknown template: the questions cannot be compared
    odd["forget"]["generated_text"] = [[f"<<USER>> {q} <<BOT>>", g, a] for q, g, a in odd["forget"]["generated_text"]]
    write_logs(tmp_path / "r", odd)
    s = aggregate(tmp_path / "m", tmp_path / "r")
    assert s["retain_log_match"] == "position"
    check(s, expected(logs, ret))
    odd["forget"]["generated_text"][2][2] = "another answer"  # answers disagree too: refused, row named
    write_logs(tmp_path / "r2", odd)
    with pytest.raises(UserError, match="forget row 2 gold answer differs.*another answer.*questions differ too"):
        aggregate(tmp_path / "m", tmp_path / "r2")


def test_retain_log_without_generation_is_accepted(tmp_path):
    """A retain EVAL.json made with --no-generate (no ROUGE, no generated_text) serves for forget quality."""
    logs, ret = make_logs(26), make_logs(27)
    write_logs(tmp_path / "m", templated(logs, "llama2", QS, AS))
    no_gen = eval_json(ret, QS, AS, split=None)
    for cols in no_gen["sets"].values():
        cols.pop("rougeL_recall")
    (tmp_path / "retain.json").write_text(json.dumps(no_gen))
    s = aggregate(tmp_path / "m", tmp_path / "retain.json")
    assert s["retain_log_match"] == "question"
    check(s, expected(logs, ret))
    # the same log aggregated on its own: ROUGE and model utility null with a reason, the rest computed
    s = aggregate(tmp_path / "retain.json")
    assert s["forget_rougeL_recall"] is None and "rougeL_recall" in s["null_reasons"]["forget_rougeL_recall"]
    assert s["model_utility"] is None and s["forget_prob"] is not None


def test_retain_log_match_is_in_the_written_summary(tmp_path, capsys):
    logs, ret = make_logs(28), make_logs(29)
    (tmp_path / "EVAL.json").write_text(json.dumps(eval_json(logs, QS, AS)))
    write_logs(tmp_path / "retain", templated(ret, "llama2", QS, AS))
    assert main(["eval", "aggregate", str(tmp_path / "EVAL.json"), "--retain-log", str(tmp_path / "retain"),
                 "--out", str(tmp_path / "o")]) == 0
    s = json.loads((tmp_path / "o" / "SUMMARY.json").read_text())
    assert s["retain_log_match"] == "question" and s["forget_quality"] is not None
    assert "matched by question" in capsys.readouterr().out
    assert main(["eval", "aggregate", str(tmp_path / "EVAL.json"), "--out", str(tmp_path / "o2")]) == 0
    s = json.loads((tmp_path / "o2" / "SUMMARY.json").read_text())
    assert s["retain_log_match"] is None and s["null_reasons"]["retain_log_match"]


# ---- output folder rules ------------------------------------------------------------------------------------------

def test_aggregate_out_folder_rules(tmp_path, capsys):
    logs = make_logs(30)
    m = write_logs(tmp_path / "m", logs)
    out = tmp_path / "o"
    assert main(["eval", "aggregate", str(m), "--out", str(out)]) == 0
    marker = json.loads((out / ".unlearnkit.json").read_text())
    assert marker["kind"] == "eval aggregate" and marker["files"] == ["SUMMARY.json"]
    assert main(["eval", "aggregate", str(m), str(m / "eval_log_forget.json"), "--out", str(out)]) == 0  # ours: rerun
    assert sorted(p.name for p in out.iterdir()) == [".unlearnkit.json", "0_m", "1_eval_log_forget"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not empty" in _run_err(["eval", "aggregate", str(m), "--out", str(foreign)], capsys)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    # an output equal to, inside or around an input log
    assert "is the input" in _run_err(["eval", "aggregate", str(m), "--out", str(m)], capsys)
    assert "inside" in _run_err(["eval", "aggregate", str(m), "--out", str(m / "agg")], capsys)
    r = write_logs(tmp_path / "wrap" / "r", make_logs(31))
    assert "contains" in _run_err(["eval", "aggregate", str(m), "--retain-log", str(r), "--out",
                                   str(tmp_path / "wrap")], capsys)
    assert not (m / "agg").exists() and sorted(p.name for p in m.iterdir()) == sorted(FILES.values())
    (out / "stray.txt").write_text("x")  # our folder, but with a file we did not write
    assert "stray.txt" in _run_err(["eval", "aggregate", str(m), "--out", str(out)], capsys)
