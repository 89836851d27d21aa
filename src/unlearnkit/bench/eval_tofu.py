"""`unlearnkit bench eval-tofu`: our TOFU evaluation under `--compat open-unlearning` against a reference path built
the way open-unlearning's stock TOFU evaluation works, same model and rows, one run.

The reference path follows the framework's design step by step (docs/evaluation.md, "Differences from
open-unlearning", cites its files): each example rendered with the chat template as one conversation and tokenised
by `apply_chat_template(tokenize=True)`, EOS appended when missing, labels after the generation prompt; batches of
`--batch-size` rows in dataset order, padded with the pad id and attention_mask = input_ids != pad; one full-logits
forward pass per metric and answer kind (probability, paraphrased and each perturbed answer of the truth ratio,
extraction strength, Min-K% for PrivLeak), nothing shared between metrics except what the framework itself reuses
(real_authors / world_facts probabilities serve both the normalised probability and the truth ratio); HF
`model.generate` (greedy, left padding) per fixed batch; the framework's formulas for every aggregate.

Ours = `evaluate_tofu(..., compat="open-unlearning")`. The figures: speedup = reference ÷ ours, both times and
their teacher-forced / generation parts, and the largest absolute difference of every headline number and per-sample
column between the two (they must agree to the third decimal)."""
from __future__ import annotations

import resource
import time

from . import add_json_arg, emit

IGNORE = -100
EPS = 1e-10  # the framework's denominators
MINK_K = 0.4
HEADLINE = ("forget_prob", "forget_truth_ratio", "forget_rougeL_recall", "forget_es", "model_utility",
            "retain_prob", "retain_truth_ratio", "retain_rougeL_recall", "ra_prob", "ra_truth_ratio",
            "ra_rougeL_recall", "wf_prob", "wf_truth_ratio", "wf_rougeL_recall", "privleak")
PREFIX = {"forget": "forget", "retain": "retain", "real_authors": "ra", "world_facts": "wf"}


def add_command(bsub) -> None:
    p = bsub.add_parser("eval-tofu", help="our TOFU evaluation (--compat open-unlearning) vs open-unlearning's "
                        "design: HF generate per fixed batch, one forward per metric (time, agreement)")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the offline SmolLM2)")
    p.add_argument("--split", default="forget01", help="forget01 | forget05 | forget10 | mini")
    p.add_argument("--limit", type=int, default=None, help="only the first N (>= 1) rows of each set")
    p.add_argument("--batch-size", type=int, default=32, help="the framework's eval batch size (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="greedy answer length (the framework's 200)")
    p.add_argument("--system-prompt", default=None,
                   help="system message (default none: the chat template's own default, e.g. SmolLM2's)")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..data import tofu
    from ..data.format import PromptFormat
    from ..eval.limits import at_least
    from ..eval.tofu import check_lengths, evaluate_tofu, limit_task, task_sets
    from ..models import load_model, load_tokenizer

    at_least(args.limit, 1, "--limit", none_ok=True)
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    task, sets = task_sets(limit_task(tofu.task(args.split), args.limit))
    # every sequence renders (a tokenizer without a chat template is refused) before any weights load
    check_lengths(load_tokenizer(args.model), sets, PromptFormat("chat", args.system_prompt),
                  max_new_tokens=args.max_new_tokens, compat="open-unlearning")
    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    # One short forward first, so neither timed path pays for first-call set-up.
    with torch.no_grad():
        model(input_ids=torch.tensor([tokenizer("warm up")["input_ids"]], device=device))
    sync()
    t0 = time.perf_counter()
    ours_t: dict = {}
    ours = evaluate_tofu(model, tokenizer, task, fmt=PromptFormat("chat", args.system_prompt), compat="open-unlearning",
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False,
                         timings=ours_t)
    sync()
    t_ours = time.perf_counter() - t0
    # the process's peak so far = model + our whole evaluation (the reference path has not run yet); Linux: KiB
    ours_peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ref = reference_eval(model, tokenizer, sets, system_prompt=args.system_prompt, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens)
    diffs = compare(ours, ref)
    figures = {"split": args.split, "rows_per_set": args.limit or 0, "device": str(device),
               "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
               "speedup": ref["seconds"]["total"] / t_ours, "ours_seconds": t_ours,
               "reference_seconds": ref["seconds"]["total"],
               "generation_seconds": ref["seconds"]["generation"],
               "teacher_forced_seconds": ref["seconds"]["teacher_forced"],
               "ours_generation_seconds": ours_t["generation_seconds"],
               "ours_teacher_forced_seconds": ours_t["teacher_forced_seconds"],
               "ours_peak_rss_gib": ours_peak_rss_gib,
               "generation_speedup": ref["seconds"]["generation"] / max(ours_t["generation_seconds"], 1e-9),
               "teacher_forced_speedup": ref["seconds"]["teacher_forced"] / max(ours_t["teacher_forced_seconds"],
                                                                               1e-9),
               **diffs,
               "ours": {k: ours["summary"].get(k) for k in HEADLINE},
               "reference": {k: ref["summary"].get(k) for k in HEADLINE}}
    emit(figures, args.json, bench="eval-tofu")
    return 0


def compare(ours: dict, ref: dict) -> dict:
    """Largest absolute differences: per headline number, per per-sample column; generations equal or not."""
    import numpy as np

    summary = {}
    for k in HEADLINE:
        a, b = ours["summary"].get(k), ref["summary"].get(k)
        if a is not None and b is not None:
            summary[k] = abs(a - b)
    columns = {}
    same_text = True
    for name, r in ref["sets"].items():
        o = ours["sets"][name]
        for field, values in r.items():
            if field == "generated_text":
                same_text &= o[field] == values
            elif values is not None:
                d = float(np.max(np.abs(np.subtract(np.asarray(o[field], float), np.asarray(values, float)))))
                columns[field] = max(columns.get(field, 0.0), d)
    worst = max(summary.values(), default=0.0)
    return {"max_abs_diff": worst, "agree_to_3_decimals": worst < 5e-4, "same_generations": same_text,
            "summary_abs_diff": summary, "per_sample_max_abs_diff": columns}


# ---- the reference path: open-unlearning's design ---------------------------------------------------------------

def _chat_ids(tokenizer, messages, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # newer transformers return a mapping


def framework_item(tokenizer, question: str, answer: str, system_prompt: str | None = None,
                   generate: bool = False) -> dict:
    """One example as the framework's chat preprocessing builds it: the whole conversation tokenised by the template,
    EOS appended unless last; teacher forcing: labels -100 over the generation prompt's length; generation:
    input = the prompt, labels = the whole conversation."""
    chat = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    chat_ids = _chat_ids(tokenizer, chat, False)
    prompt_ids = _chat_ids(tokenizer, chat[:-1], True)
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids = chat_ids + [tokenizer.eos_token_id]
    if generate:
        return {"input_ids": prompt_ids, "labels": chat_ids}
    return {"input_ids": chat_ids, "labels": [IGNORE] * len(prompt_ids) + chat_ids[len(prompt_ids):]}


def framework_collate(items: list[dict], pad_id: int, side: str = "right") -> dict:
    """Pad ids with pad_id and labels with -100 on one side; attention_mask = input_ids != pad_id."""
    import torch

    width = max(len(x["input_ids"]) for x in items)
    width_l = max(len(x["labels"]) for x in items)

    def pad(seq, w, value):
        fill = [value] * (w - len(seq))
        return fill + list(seq) if side == "left" else list(seq) + fill

    ids = torch.tensor([pad(x["input_ids"], width, pad_id) for x in items])
    labels = torch.tensor([pad(x["labels"], width_l, IGNORE) for x in items])
    return {"input_ids": ids, "attention_mask": ids.ne(pad_id).long(), "labels": labels}


def _batches(items, batch_size):
    return [items[s:s + batch_size] for s in range(0, len(items), batch_size)]


def _avg_losses(model, tokenizer, items, batch_size):
    """Mean token cross-entropy over the labelled tokens, per example (the framework's probability metric)."""
    import torch

    out = []
    for chunk in _batches(items, batch_size):
        b = {k: v.to(model.device) for k, v in framework_collate(chunk, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        shifted = b["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(-1, -2).float(), shifted,
                                                   ignore_index=IGNORE, reduction="none").sum(-1)
        out += (losses / (b["labels"] != IGNORE).sum(-1)).tolist()
    return out


def _labelled_logprobs(model, tokenizer, items, batch_size):
    """Per example: log-softmax rows and labels over the labelled tokens except the last (the framework's
    token-wise metrics drop it)."""
    import torch

    out = []
    for chunk in _batches(items, batch_size):
        b = {k: v.to(model.device) for k, v in framework_collate(chunk, tokenizer.pad_token_id).items()}
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lsm = torch.log_softmax(logits.float(), -1)[:, :-1]
        for i in range(len(chunk)):
            where = (b["labels"][i] != IGNORE).nonzero(as_tuple=True)[0][:-1]
            s, e = int(where[0]), int(where[-1])
            out.append((lsm[i, s - 1:e], b["labels"][i][where]))
    return out


def _extraction_strength(log_probs, labels) -> float:
    preds = log_probs.argmax(-1)
    n = len(labels)
    for k in range(n):
        if bool((preds[k:] == labels[k:]).all()):
            break
    return 1 - k / n


def _min_k(log_probs, labels) -> float:
    import numpy as np

    lp = np.sort(log_probs.gather(-1, labels[:, None])[:, 0].numpy())
    return float(-lp[:max(1, int(len(lp) * MINK_K))].mean())


def _generate(model, tokenizer, rows, system_prompt, batch_size, max_new_tokens):
    """Greedy answers and ROUGE gold texts, HF generate per fixed left-padded batch in dataset order."""
    import torch

    eos = tokenizer.eos_token_id
    decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    gens, golds = [], []
    for chunk in _batches(rows, batch_size):
        items = [framework_item(tokenizer, r["question"], r["answer"], system_prompt, generate=True) for r in chunk]
        b = {k: v.to(model.device) for k, v in framework_collate(items, tokenizer.pad_token_id, "left").items()}
        with torch.no_grad():
            out = model.generate(b["input_ids"], attention_mask=b["attention_mask"], do_sample=False, top_p=None,
                                 temperature=None, top_k=None, max_new_tokens=max_new_tokens, use_cache=True,
                                 pad_token_id=eos)
        inputs = decode(b["input_ids"])
        full = decode([lab[lab != IGNORE] for lab in b["labels"]])
        golds += [f.replace(i, "").strip() for i, f in zip(inputs, full)]
        stop = tokenizer.decode([eos])
        for text in decode(out[:, b["input_ids"].shape[1]:]):
            gens.append((text.split(stop)[0] if stop and stop in text else text).strip())
    return gens, golds


def reference_eval(model, tokenizer, sets: dict, *, system_prompt=None, batch_size=32, max_new_tokens=200) -> dict:
    """Per-sample columns (EVAL layout names), headline numbers and timings, the framework's way."""
    import numpy as np
    import scipy.stats
    import torch
    from rouge_score import rouge_scorer
    from sklearn.metrics import roc_auc_score

    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    item = lambda r, a: framework_item(tokenizer, r["question"], a, system_prompt)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    cols, summary, t_tf, t_gen = {}, {}, 0.0, 0.0

    def timed(fn):
        nonlocal t_tf
        sync()
        t = time.perf_counter()
        value = fn()
        sync()
        t_tf += time.perf_counter() - t
        return value

    for name in ("forget", "retain", "real_authors", "world_facts"):
        if name not in sets:
            continue
        rows, c = sets[name], {}
        cols[name] = c
        c["avg_gt_loss"] = timed(lambda: _avg_losses(model, tokenizer, [item(r, r["answer"]) for r in rows],
                                                     batch_size))
        if name in ("forget", "retain"):
            c["avg_paraphrased_loss"] = timed(lambda: _avg_losses(
                model, tokenizer, [item(r, r["paraphrased_answer"]) for r in rows], batch_size))
        # The perturbed answers: per batch of rows, one sub-batch per answer index (the framework's collator).
        width = len(rows[0]["perturbed_answer"])
        per_row = [[None] * width for _ in rows]
        for s in range(0, len(rows), batch_size):
            for j in range(width):
                losses = timed(lambda: _avg_losses(model, tokenizer, [item(r, r["perturbed_answer"][j])
                                                                      for r in rows[s:s + batch_size]], batch_size))
                for k, v in enumerate(losses):
                    per_row[s + k][j] = v
        c["average_perturb_loss"] = per_row
        if name == "forget":
            c["es"] = [_extraction_strength(lp, lab) for lp, lab in timed(lambda: _labelled_logprobs(
                model, tokenizer, [item(r, r["answer"]) for r in rows], batch_size))]
        sync()
        t = time.perf_counter()
        gens, golds = _generate(model, tokenizer, rows, system_prompt, batch_size, max_new_tokens)
        sync()
        t_gen += time.perf_counter() - t
        c["generated_text"] = gens
        c["rougeL_recall"] = [scorer.score(g, x)["rougeL"].recall for g, x in zip(golds, gens)]

        # aggregates, the framework's formulas
        p = PREFIX[name]
        gt = np.exp(-np.asarray(c["avg_gt_loss"]))
        wrong_loss = np.asarray(per_row).mean(-1)
        if name in ("forget", "retain"):
            summary[f"{p}_prob"] = float(gt.mean())
            correct = np.exp(-np.asarray(c["avg_paraphrased_loss"]))
        else:
            summary[f"{p}_prob"] = float((gt / (gt + np.exp(-np.asarray(per_row)).sum(-1) + EPS)).mean())
            correct = gt
        tr = np.exp(-wrong_loss) / (correct + EPS)
        summary[f"{p}_truth_ratio"] = float(np.mean(np.minimum(tr, 1 / (tr + EPS))) if name == "forget" else
                                            np.mean(np.maximum(0, 1 - tr)))
        summary[f"{p}_rougeL_recall"] = float(np.mean(c["rougeL_recall"]))
        if name == "forget":
            summary["forget_es"] = float(np.mean(c["es"]))
    parts = [f"{p}_{k}" for p in ("retain", "ra", "wf") for k in ("prob", "rougeL_recall", "truth_ratio")]
    if all(k in summary for k in parts):
        summary["model_utility"] = float(scipy.stats.hmean([summary[k] for k in parts]))
    if "holdout" in sets and "forget" in sets:  # PrivLeak from Min-K%, retain AUC 0.5 without retain logs
        scores = {}
        for name in ("forget", "holdout"):
            scores[name] = [_min_k(lp, lab) for lp, lab in timed(lambda: _labelled_logprobs(
                model, tokenizer, [item(r, r["answer"]) for r in sets[name]], batch_size))]
            cols.setdefault(name, {})["mia_mink"] = scores[name]
        auc = roc_auc_score([0] * len(scores["forget"]) + [1] * len(scores["holdout"]),
                            scores["forget"] + scores["holdout"])
        summary["privleak"] = ((1 - auc) - 0.5) / (0.5 + EPS) * 100
    return {"sets": cols, "summary": summary,
            "seconds": {"teacher_forced": t_tf, "generation": t_gen, "total": t_tf + t_gen}}
