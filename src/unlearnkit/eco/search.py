"""Choosing the corruption strength sigma.

Goal: the guarded model should look, on the forget set, like a model that never learned it:
    minimise f(sigma) = |v(sigma) - v_target|
v(sigma) is a task metric on the forget set with the corruption applied to every forget prompt (the classifier is
bypassed: sigma must be right for the prompts it does flag), v_target the retain model's value of the same metric
(or a proxy: the base model's; for multiple choice, chance accuracy).

Zeroth-order search (no gradients through the model): central finite difference
    g = (f(sigma + eps) - f(sigma - eps)) / (2 eps),   sigma <- max(sigma - lr * g, sigma_min)
Because the noise is seeded, v is a smooth deterministic function of sigma (noise = sigma * fixed z), so the finite
difference is meaningful. The search runs in units of the embedding matrix's standard deviation, so one set of
defaults fits models of any width. A small grid search is offered for comparison.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

METRICS = ("prob", "truth_ratio")


def zo_search(metric: Callable[[float], float], target: float, *, sigma0: float = 1.0, lr: float = 2.0,
              eps: float = 0.25, steps: int = 8, sigma_min: float = 0.01, scale: float = 1.0,
              log: Callable[[dict], None] | None = None) -> dict:
    """Zeroth-order minimisation of |metric(sigma) - target|; sigma is `scale` × the relative value searched.

    Returns {"sigma", "value", "objective", "log": [per-step dicts]}: the best evaluated point (not merely the
    last), since a fixed step size can overshoot near the optimum.
    """
    cache: dict[float, float] = {}

    def v(s: float) -> float:
        key = round(s, 12)
        if key not in cache:
            cache[key] = float(metric(s * scale))
        return cache[key]

    s, history = float(sigma0), []
    for step in range(steps + 1):
        value = v(s)
        entry = {"step": step, "sigma": s * scale, "sigma_rel": s, "value": value, "objective": abs(value - target)}
        if step < steps:
            lo, hi = max(s - eps, 0.0), s + eps
            grad = (abs(v(hi) - target) - abs(v(lo) - target)) / (hi - lo)
            s_new = max(s - lr * grad, sigma_min)
            entry.update(grad=grad, next_sigma=s_new * scale)
        history.append(entry)
        if log:
            log(entry)
        if step < steps:
            if s_new == s:
                break  # stuck at sigma_min (or zero gradient): further steps change nothing
            s = s_new
    best = min(history, key=lambda e: e["objective"])
    return {"method": "zo", "target": target, "sigma": best["sigma"], "value": best["value"],
            "objective": best["objective"], "evaluations": len(cache), "log": history}


def grid_search(metric: Callable[[float], float], target: float, grid=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
                scale: float = 1.0, log: Callable[[dict], None] | None = None) -> dict:
    history = []
    for s in grid:
        value = float(metric(s * scale))
        entry = {"sigma": s * scale, "sigma_rel": s, "value": value, "objective": abs(value - target)}
        history.append(entry)
        if log:
            log(entry)
    best = min(history, key=lambda e: e["objective"])
    return {"method": "grid", "target": target, "sigma": best["sigma"], "value": best["value"],
            "objective": best["objective"], "evaluations": len(history), "log": history}


def embedding_scale(model) -> float:
    """Standard deviation of the input-embedding matrix: the unit sigma is searched in."""
    return float(model.get_input_embeddings().weight.detach().float().std())


def forget_metric(model, tokenizer, rows: list[dict], *, metric: str = "prob", fmt=None, batch_size: int = 16,
                  guard_factory=None) -> Callable[[float | None], float]:
    """sigma → metric on `rows` with every prompt corrupted (sigma=None: no guard, e.g. the reference model).

    prob: mean p(answer | question)^(1/len) (exp of minus the mean token NLL).
    truth_ratio: TOFU's forget truth-ratio score, mean min(R, 1/R) of paraphrased vs perturbed answers.
    guard_factory(sigma) → an EcoGuard with no classifier (so every row is corrupted).
    """
    from ..data.format import PromptFormat, encode_qa, prompt_text
    from ..eval import metrics as M
    from ..eval.logprobs import sequence_stats

    fmt = fmt or PromptFormat()
    if metric not in METRICS:
        from ..errors import UserError

        raise UserError(f"--metric: unknown value {metric!r}; choose one of {', '.join(METRICS)}")
    seqs = []  # (row, role, question, answer)
    for i, row in enumerate(rows):
        if metric == "prob":
            seqs.append((i, "gt", row["question"], row["answer"]))
        else:
            seqs.append((i, "para", row["question"], row["paraphrased_answer"]))
            seqs += [(i, ("pert", j), row["question"], a) for j, a in enumerate(row["perturbed_answer"])]
    examples = [encode_qa(tokenizer, q, a, fmt) for _, _, q, a in seqs]
    prompts = [prompt_text(tokenizer, q, fmt) for _, _, q, _ in seqs]

    def value(sigma: float | None) -> float:
        guard = guard_factory(sigma) if sigma is not None else None
        stats = sequence_stats(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
                               prompts=prompts, guard=guard)
        if metric == "prob":
            return float(np.mean(M.prob([s.nll for s in stats])))
        para = np.zeros(len(rows))
        pert = [[] for _ in rows]
        for (i, role, _, _), st in zip(seqs, stats):
            if role == "para":
                para[i] = st.nll
            else:
                pert[i].append(st.nll)
        return M.truth_ratio_score(M.truth_ratio(para, np.array(pert)), forget=True)

    return value
