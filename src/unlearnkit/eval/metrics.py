"""The field's metrics as pure functions of per-sample values (no model here; see logprobs.py / generate.py).

Conventions (docs/evaluation.md):
- p(a|q) = exp(-mean token NLL over the answer tokens incl. end-of-turn)  (TOFU's length-normalised probability).
- Truth ratio R = geomean_j p(perturbed_j|q) / p(paraphrased|q)  (original answer on real_authors / world_facts).
- MIA scores are "loss-like" (higher = looks less like training data). AUC = P(score(holdout) > score(forget)),
  i.e. forget = members, so 0.5 = indistinguishable, > 0.5 = forget set still looks trained-on.
- PrivLeak (MUSE) = (AUC_model - AUC_retain) / AUC_retain * 100: > 0 under-unlearned, < 0 over-unlearned.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

MINK_K = 0.4
TRUTH_RATIO_VARIANTS = ("tofu", "arith", "para_share")


# ---- probabilities and truth ratio ------------------------------------------------------------------------------

def prob(nll) -> np.ndarray:
    """p(a|q) from the mean token NLL."""
    return np.exp(-np.asarray(nll, dtype=np.float64))


def normalised_prob(gt_nll, perturb_nll, eps: float = 0.0) -> np.ndarray:
    """p(correct) / (p(correct) + sum_j p(perturbed_j) + eps), per item (TOFU's probability on real_authors/world_facts;
    open-unlearning adds eps = 1e-10)."""
    p_true, p_false = prob(gt_nll), prob(perturb_nll)
    return p_true / (p_true + p_false.sum(-1) + eps)


def truth_ratio(para_nll, perturb_nll, variant: str = "tofu", eps: float = 0.0) -> np.ndarray:
    """Raw per-item ratio R. tofu: geometric mean of perturbed probabilities / p(para);
    arith: arithmetic mean instead; para_share: p(para) / (p(para) + geomean p(pert)) (a share, not a ratio).
    eps > 0 is added to the denominator (open-unlearning's 1e-10)."""
    para = np.asarray(para_nll, dtype=np.float64)
    pert = np.asarray(perturb_nll, dtype=np.float64)
    if variant not in TRUTH_RATIO_VARIANTS:
        raise ValueError(f"unknown truth-ratio variant {variant!r}; choose one of {', '.join(TRUTH_RATIO_VARIANTS)}")
    if eps:
        wrong = prob(pert).mean(-1) if variant == "arith" else np.exp(-pert.mean(-1))
        return prob(para) / (prob(para) + wrong + eps) if variant == "para_share" else wrong / (prob(para) + eps)
    if variant == "tofu":  # geomean of exp(-nll_j) = exp(-mean_j nll_j): stay in log space
        return np.exp(para - pert.mean(-1))
    if variant == "arith":
        return prob(pert).mean(-1) / prob(para)
    return 1.0 / (1.0 + np.exp(para - pert.mean(-1)))


def truth_ratio_score(r, forget: bool, variant: str = "tofu", eps: float = 0.0) -> float:
    """Split-level aggregate: forget → mean min(R, 1/(R + eps)) (closer to 1 = indistinguishable);
    other sets → mean max(0, 1 - R) (higher = prefers the truth). para_share: its plain mean on every set."""
    r = np.asarray(r, dtype=np.float64)
    if variant == "para_share":
        return float(r.mean())
    if forget:
        return float(np.minimum(r, 1.0 / (r + eps)).mean())
    return float(np.maximum(0.0, 1.0 - r).mean())


def forget_quality(r_model, r_retain) -> float:
    """p-value of the two-sample KS test between raw truth ratios of the evaluated and the retain model (forget set)."""
    from scipy.stats import ks_2samp

    return float(ks_2samp(np.asarray(r_model, float), np.asarray(r_retain, float)).pvalue)


def model_utility(values) -> float:
    """Harmonic mean of TOFU's 9 numbers ({prob, ROUGE-L recall, truth ratio} × {retain, real_authors, world_facts}).
    Any zero makes it zero (scipy's hmean convention)."""
    from scipy.stats import hmean

    v = np.asarray(values, dtype=np.float64)
    return 0.0 if (v == 0).any() else float(hmean(v))


# ---- memorisation from teacher-forced argmax --------------------------------------------------------------------

def exact_memorisation(match) -> float:
    """Fraction of answer tokens whose teacher-forced argmax equals the label."""
    return float(np.asarray(match, dtype=np.float64).mean())


ES_CONVENTIONS = ("unlearnkit", "open-unlearning")


def extraction_strength(match, convention: str = "unlearnkit") -> float:
    """1 - k*/L with k* the shortest prefix after which every teacher-forced argmax matches.

    convention="unlearnkit": k* ranges over 0..L (k* = L, the empty suffix, when the last token misses: ES = 0;
    k* = 0: the whole answer is reproduced, ES = 1). convention="open-unlearning": k* ranges over 0..L-1 as in
    open-unlearning's loop, so a missed last token scores 1/L, the same as matching only the last token."""
    if convention not in ES_CONVENTIONS:
        raise ValueError(f"unknown ES convention {convention!r}; choose one of {', '.join(ES_CONVENTIONS)}")
    m = np.asarray(match, dtype=bool)
    n = len(m)
    k = n
    while k > 0 and m[k - 1]:
        k -= 1
    if convention == "open-unlearning":
        k = min(k, n - 1)
    return 1.0 - k / n


# ---- membership inference (loss-like scores: lower = more member-like) ------------------------------------------

def zlib_bytes(text: str) -> int:
    return len(zlib.compress(text.encode("utf-8")))


def mia_loss(logp) -> float:
    return float(-np.mean(logp))


def mia_zlib(logp, text: str) -> float:
    """Mean NLL / zlib-compressed length of the text (Carlini et al., 2021)."""
    return mia_loss(logp) / zlib_bytes(text)


def _lowest_k_mean(x, k: float) -> float:
    x = np.sort(np.asarray(x, dtype=np.float64))
    return float(x[:max(1, int(len(x) * k))].mean())


def mia_mink(logp, k: float = MINK_K) -> float:
    """Min-K% (Shi et al., 2024): minus the mean of the k·L lowest token log-probs (at least one)."""
    return -_lowest_k_mean(logp, k)


def mia_minkpp(logp, mu, var, k: float = MINK_K, var_floor: float = 1e-12) -> float:
    """Min-K%++ (Zhang et al., 2024): token log-prob z-scored by the mean/variance of log p under the model's own
    next-token distribution; minus the mean of the k·L lowest z. Variances are clamped to at least var_floor."""
    z = (np.asarray(logp) - np.asarray(mu)) / np.sqrt(np.maximum(np.asarray(var), var_floor))
    return -_lowest_k_mean(z, k)


def auc(forget_scores, holdout_scores) -> float:
    """ROC AUC of separating forget (members, positive) from holdout by a loss-like score: P(holdout > forget)."""
    from sklearn.metrics import roc_auc_score

    f, h = np.asarray(forget_scores, float), np.asarray(holdout_scores, float)
    labels = np.r_[np.ones(len(f)), np.zeros(len(h))]
    return float(roc_auc_score(labels, -np.r_[f, h]))


PRIVLEAK_KINDS = ("muse", "one-minus-auc")


def privleak(auc_model: float, auc_retain: float, kind: str = "muse", eps: float = 0.0) -> float:
    """PrivLeak in percent. muse: (AUC - AUC_retain) / AUC_retain, > 0: forget set still distinguishable as members
    (under-unlearning). one-minus-auc: open-unlearning's, the same formula on 1 - AUC (its privacy.py), with eps in
    the denominator: ((1 - AUC) - (1 - AUC_retain)) / (1 - AUC_retain + eps), so its sign is the opposite."""
    if kind == "one-minus-auc":
        return ((1.0 - auc_model) - (1.0 - auc_retain)) / (1.0 - auc_retain + eps) * 100.0
    if kind != "muse":
        raise ValueError(f"unknown PrivLeak kind {kind!r}; choose one of {', '.join(PRIVLEAK_KINDS)}")
    return (auc_model - auc_retain) / (auc_retain + eps) * 100.0


# ---- ROUGE -------------------------------------------------------------------------------------------------------

_SCORER = None


def rouge(gold: str, generated: str) -> dict:
    """rouge1_recall, rougeL_recall, rougeL_f1 of the generation against the gold text (Porter stemming)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    s = _SCORER.score(gold, generated)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_recall": s["rougeL"].recall, "rougeL_f1": s["rougeL"].fmeasure}


def finite_mean(values) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()) if v.size and np.isfinite(v).all() else None


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)
