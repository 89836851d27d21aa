"""Forget metrics under attack: score attacked prompts exactly as `eval tofu` scores clean ones.

An attack turns each forget row into a `Probe`: the token ids the model sees before its answer (any template,
conversation, suffix or assistant prefill) and how many leading answer tokens are given rather than scored (the
answer-prefill attack). From there everything is the evaluation's own machinery: one teacher-forced pass
(eval/logprobs.py) over gold, paraphrased and perturbed answers after the attacked prompt, greedy generation
(eval/generate.py), and the TOFU summary (eval/aggregate.py: p(a|q), truth ratio, forget quality, ROUGE-L).

Answer prefill: each scored answer (gold, paraphrase, every perturbed one) gets its OWN first n tokens as the
assistant's start, and only the rest is scored, so the truth ratio still asks "which continuation does the model
prefer". ROUGE-L compares the generated continuation with the rest of the gold answer (the given tokens would
only inflate it).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.format import IGNORE, PromptFormat, encode_answer, encode_prompt, prompt_text
from ..eval import metrics as M
from ..eval.aggregate import summarize
from ..eval.generate import greedy_generate
from ..eval.logprobs import sequence_stats

SUMMARY_KEYS = ("forget_prob", "forget_truth_ratio", "forget_quality", "forget_rougeL_recall")


@dataclass
class Probe:
    """One attacked prompt for one forget row."""
    prompt_ids: list[int]
    prompt_text: str            # what an ECO guard classifies (the rendered prompt)
    given_answer_tokens: int = 0


def question_probes(tokenizer, rows: list[dict], fmt: PromptFormat = PromptFormat()) -> list[Probe]:
    """The plain question of each row, as `eval tofu` asks it (no attack)."""
    return [Probe(encode_prompt(tokenizer, r["question"], fmt), prompt_text(tokenizer, r["question"], fmt))
            for r in rows]


def answer_variants(row: dict) -> list[tuple[str, str]]:
    """(role, answer) scored per row: gold, paraphrase, each perturbed answer (TOFU's forget set)."""
    return ([("gt", row["answer"]), ("para", row["paraphrased_answer"])]
            + [(f"pert{j}", a) for j, a in enumerate(row["perturbed_answer"])])


def score_probes(model, tokenizer, rows: list[dict], probes: list[Probe], *, fmt: PromptFormat = PromptFormat(),
                 guard=None, generate: bool = True, max_new_tokens: int = 200, batch_size: int = 32,
                 progress=None) -> dict:
    """Per-row columns in EVAL.json's forget-set layout (question = the original question, so a retain log
    matches), plus the attacked prompt, and — behind a guard — whether the classifier flagged it."""
    if len(rows) != len(probes):
        raise ValueError(f"score_probes: {len(rows)} rows, {len(probes)} probes")
    examples, owners, texts = [], [], []
    gold_ids = []
    for i, (row, probe) in enumerate(zip(rows, probes)):
        for role, answer in answer_variants(row):
            ids = encode_answer(tokenizer, answer, fmt)
            given = min(probe.given_answer_tokens, len(ids) - 1)  # at least one token is scored
            examples.append({"input_ids": probe.prompt_ids + ids,
                             "labels": [IGNORE] * (len(probe.prompt_ids) + given) + ids[given:]})
            owners.append((i, role))
            texts.append(probe.prompt_text)
            if role == "gt":
                gold_ids.append((ids, given))
    stats = sequence_stats(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id, prompts=texts,
                           guard=guard, progress=progress)
    n = len(rows)
    cols = {"index": [r.get("index", i) for i, r in enumerate(rows)], "question": [r["question"] for r in rows],
            "answer": [r["answer"] for r in rows], "attacked_prompt": [p.prompt_text for p in probes],
            "given_answer_tokens": [g for _, g in gold_ids], "avg_gt_loss": [None] * n,
            "avg_paraphrased_loss": [None] * n,
            "average_perturb_loss": [[None] * len(r["perturbed_answer"]) for r in rows]}
    for (i, role), st in zip(owners, stats):
        if role == "gt":
            cols["avg_gt_loss"][i] = st.nll
        elif role == "para":
            cols["avg_paraphrased_loss"][i] = st.nll
        else:
            cols["average_perturb_loss"][i][int(role[4:])] = st.nll
    if generate:
        starts = [p.prompt_ids + ids[:given] for p, (ids, given) in zip(probes, gold_ids)]
        gens = greedy_generate(model, tokenizer, starts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               prompts=[p.prompt_text for p in probes], guard=guard, progress=progress)
        cols.update(generated_text=gens, rougeL_recall=[], rouge1_recall=[], rougeL_f1=[])
        for row, (ids, given), text in zip(rows, gold_ids, gens):
            gold = row["answer"] if not given else tokenizer.decode(ids[given:], skip_special_tokens=True).strip()
            for k, v in M.rouge(gold, text).items():
                cols[k].append(v)
    if guard is not None:
        cols["flagged"] = [bool(f) for f in guard.flags([p.prompt_text for p in probes])]
    return cols


def summarize_forget(cols: dict, reference: dict | None, split: str | None = None) -> dict:
    """The forget metrics of scored columns (eval/aggregate.summarize on a forget-only log), the ECO flag rate,
    and why a value is null. `reference`: the retain model's forget columns on the same rows (or None)."""
    ev = {"split": split, "sets": {"forget": cols}}
    ref = None if reference is None else {"source": "retain reference", "split": split,
                                          "sets": {"forget": reference}}
    full = summarize(ev, ref)
    out = {k: full.get(k) for k in SUMMARY_KEYS if k != "forget_rougeL_recall" or "rougeL_recall" in cols}
    out["n"] = len(cols["avg_gt_loss"])
    if "flagged" in cols:
        out["flag_rate"] = sum(cols["flagged"]) / max(1, len(cols["flagged"]))
    why = {k: v for k, v in full.get("null_reasons", {}).items() if k in out and out[k] is None}
    if why:
        out["null_reasons"] = why
    return out
