"""Data difficulty (the SimNPO paper's TOFU panel): does a method unlearn strongly and weakly memorised forget data,
short and long answers, equally well?

The forget set is split twice, by the target model itself: strongly vs weakly memorised (target p(a|q) above / at or
below the median) and short vs long answers (answer tokens at or below / above the median). Each method unlearns the
whole forget set from the same target with the same budget; then every subset is scored (teacher-forced p(a|q),
truth ratio) and its forget quality computed against the retain model on the same rows.
"""
from __future__ import annotations

import statistics

from ..attacks.score import question_probes, score_probes, summarize_forget
from ..data.format import PromptFormat, encode_answer

SUBSETS = ("strong", "weak", "short", "long")


def forget_columns(model, tokenizer, rows, fmt: PromptFormat = PromptFormat(), batch_size: int = 32) -> dict:
    """Teacher-forced forget columns (EVAL layout) of `model` on `rows`: the values every subset is cut from."""
    return score_probes(model, tokenizer, rows, question_probes(tokenizer, rows, fmt), fmt=fmt, generate=False,
                        batch_size=batch_size)


def split_rows(target_cols: dict, rows: list[dict], tokenizer, fmt: PromptFormat = PromptFormat()) -> dict:
    """{subset: row indices}: strong/weak by the target's p(a|q) against its median, short/long by answer tokens."""
    import math

    prob = [math.exp(-nll) for nll in target_cols["avg_gt_loss"]]
    length = [len(encode_answer(tokenizer, r["answer"], fmt)) for r in rows]
    p_med, l_med = statistics.median(prob), statistics.median(length)
    idx = range(len(rows))
    return {"strong": [i for i in idx if prob[i] > p_med], "weak": [i for i in idx if prob[i] <= p_med],
            "short": [i for i in idx if length[i] <= l_med], "long": [i for i in idx if length[i] > l_med],
            "thresholds": {"target_prob_median": p_med, "answer_tokens_median": l_med}}


def subset(cols: dict, idx: list[int]) -> dict:
    n = len(cols["avg_gt_loss"])
    return {k: [v[i] for i in idx] for k, v in cols.items() if isinstance(v, list) and len(v) == n}


def subset_summaries(cols: dict, retain_cols: dict, subsets: dict, split: str | None = None) -> dict:
    """Forget metrics (forget quality against the retain model on the same rows) per subset, and on all rows."""
    out = {"all": summarize_forget(cols, retain_cols, split)}
    for name in SUBSETS:
        out[name] = summarize_forget(subset(cols, subsets[name]), subset(retain_cols, subsets[name]), split)
    return out


def difficulty_figure(results: dict, path, title: str = ""):
    """Forget quality (log) per subset, one bar per method."""
    from ..plots import PALETTE, pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    names = list(results)
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [results[name][s].get("forget_quality") or float("nan") for s in SUBSETS]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(SUBSETS))], values, width, label=name,
               color=PALETTE[j % len(PALETTE)])
    ax.set_xticks(range(len(SUBSETS)))
    ax.set_xticklabels(["strongly memorised", "weakly memorised", "short answers", "long answers"])
    ax.set_yscale("log")
    ax.set_ylabel("forget quality (KS p-value, log)")
    ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    return save(fig, path)
