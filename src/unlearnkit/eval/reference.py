"""A straightforward TOFU evaluation, the way the field's framework does it: one full-logits forward over the data
per metric, batches in data order, log-softmax over every position. Used by `unlearnkit bench eval` as the baseline
and by the tests as the independent path that evaluate_tofu must match."""
from __future__ import annotations

import numpy as np
import torch

from ..data.batching import collate
from ..data.format import PromptFormat, encode_prompt, encode_qa
from . import metrics as M
from .generate import greedy_generate


@torch.no_grad()
def _token_logprobs(model, tokenizer, pairs, fmt, batch_size):
    """Per pair: (log p of each label token, argmax hit per token, full log-softmax rows at those positions)."""
    out = []
    for s in range(0, len(pairs), batch_size):
        exs = [encode_qa(tokenizer, q, a, fmt) for q, a in pairs[s:s + batch_size]]
        b = collate(exs, tokenizer.pad_token_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        lsm = torch.log_softmax(logits[:, :-1], -1)
        labels = b["labels"][:, 1:]
        for r in range(len(exs)):
            keep = labels[r] != -100
            tgt = labels[r][keep]
            rows = lsm[r][keep]
            out.append((rows.gather(-1, tgt[:, None])[:, 0].numpy().astype(np.float64),
                        (rows.argmax(-1) == tgt).numpy(), rows))
    return out


def _nll(model, tok, pairs, fmt, bs):
    return [float(-lp.mean()) for lp, _, _ in _token_logprobs(model, tok, pairs, fmt, bs)]


def evaluate_tofu_reference(model, tokenizer, task, *, fmt: PromptFormat = PromptFormat(), batch_size: int = 16,
                            max_new_tokens: int = 200, generate: bool = True) -> dict:
    """Same columns as evaluate_tofu's EVAL["sets"], each metric from its own forward pass."""
    sets = dict(task.eval_sets())
    if task.holdout:
        sets["holdout"] = task.holdout
    cols = {}
    for name, rows in sets.items():
        gt = [(r["question"], r["answer"]) for r in rows]
        c = cols[name] = {"avg_gt_loss": _nll(model, tokenizer, gt, fmt, batch_size)}  # probability
        if name != "holdout":
            para = gt if name in ("real_authors", "world_facts") else [(r["question"], r["paraphrased_answer"])
                                                                        for r in rows]
            c["avg_paraphrased_loss"] = _nll(model, tokenizer, para, fmt, batch_size)  # truth ratio
            width = len(rows[0]["perturbed_answer"])
            per_j = [_nll(model, tokenizer, [(r["question"], r["perturbed_answer"][j]) for r in rows], fmt,
                          batch_size) for j in range(width)]
            c["average_perturb_loss"] = [list(v) for v in zip(*per_j)]
            c["es"] = [M.extraction_strength(m) for _, m, _ in _token_logprobs(model, tokenizer, gt, fmt, batch_size)]
            c["em"] = [M.exact_memorisation(m) for _, m, _ in _token_logprobs(model, tokenizer, gt, fmt, batch_size)]
            if generate:
                gens = []
                for s in range(0, len(rows), batch_size):  # data order, one batch at a time
                    chunk = rows[s:s + batch_size]
                    gens += greedy_generate(model, tokenizer, [encode_prompt(tokenizer, r["question"], fmt)
                                                               for r in chunk],
                                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                                            engine="hf")  # the straightforward way: HF generate
                c["generated_text"] = gens
                scores = [M.rouge(r["answer"], g) for r, g in zip(rows, gens)]
                for k in ("rougeL_recall", "rouge1_recall", "rougeL_f1"):
                    c[k] = [s[k] for s in scores]
        if name in ("forget", "holdout"):  # MIA: one forward per attack
            c["mia_loss"] = [M.mia_loss(lp) for lp, _, _ in _token_logprobs(model, tokenizer, gt, fmt, batch_size)]
            c["mia_zlib"] = [M.mia_zlib(lp, a) for (lp, _, _), (_, a) in
                             zip(_token_logprobs(model, tokenizer, gt, fmt, batch_size), gt)]
            c["mia_mink"] = [M.mia_mink(lp) for lp, _, _ in _token_logprobs(model, tokenizer, gt, fmt, batch_size)]
            pp = []
            for lp, _, rows_lsm in _token_logprobs(model, tokenizer, gt, fmt, batch_size):
                p = rows_lsm.exp()
                mu = (p * rows_lsm).sum(-1)
                var = (p * (rows_lsm - mu[:, None]).square()).sum(-1)
                pp.append(M.mia_minkpp(lp, mu.numpy().astype(np.float64), var.numpy().astype(np.float64)))
            c["mia_minkpp"] = pp
    return cols
