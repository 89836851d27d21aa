"""Each metric against a direct computation of its definition (loops, no shared code paths)."""
from __future__ import annotations

import itertools
import math
import zlib

import numpy as np
import pytest

from unlearnkit.eval import metrics as M

rng = np.random.default_rng(0)


def test_prob_is_geometric_mean_of_token_probs():
    logp = rng.uniform(-4, 0, size=13)
    direct = math.prod(math.exp(x) for x in logp) ** (1 / len(logp))
    assert M.prob(-logp.mean()) == pytest.approx(direct, rel=1e-12)


def test_normalised_prob():
    gt, pert = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, (5, 3))
    for i in range(5):
        pt = math.exp(-gt[i])
        direct = pt / (pt + sum(math.exp(-x) for x in pert[i]))
        assert M.normalised_prob(gt, pert)[i] == pytest.approx(direct, rel=1e-12)


def test_truth_ratio_variants_and_aggregates():
    para, pert = rng.uniform(0.1, 3, 7), rng.uniform(0.1, 3, (7, 5))
    r_geo, r_ar, share = [], [], []
    for i in range(7):
        ps = [math.exp(-x) for x in pert[i]]
        pp = math.exp(-para[i])
        geo = math.prod(ps) ** (1 / len(ps))
        r_geo.append(geo / pp)
        r_ar.append(sum(ps) / len(ps) / pp)
        share.append(pp / (pp + geo))
    np.testing.assert_allclose(M.truth_ratio(para, pert, "tofu"), r_geo, rtol=1e-12)
    np.testing.assert_allclose(M.truth_ratio(para, pert, "arith"), r_ar, rtol=1e-12)
    np.testing.assert_allclose(M.truth_ratio(para, pert, "para_share"), share, rtol=1e-12)
    assert M.truth_ratio_score(r_geo, forget=True) == pytest.approx(
        sum(min(r, 1 / r) for r in r_geo) / 7, rel=1e-12)
    assert M.truth_ratio_score(r_geo, forget=False) == pytest.approx(
        sum(max(0.0, 1 - r) for r in r_geo) / 7, rel=1e-12)
    assert M.truth_ratio_score(share, forget=True, variant="para_share") == pytest.approx(sum(share) / 7)
    with pytest.raises(ValueError):
        M.truth_ratio(para, pert, "nope")


def _ks_exact_pvalue(a, b):
    """Two-sided two-sample KS p-value by enumerating every split of the pooled sample (no ties)."""
    def stat(x, y):
        pts = sorted(set(x) | set(y))
        return max(abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in pts)
    d = stat(a, b)
    pooled = list(a) + list(b)
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += stat(x, y) >= d - 1e-12
        total += 1
    return hits / total


def test_forget_quality_is_exact_ks_pvalue():
    for seed in range(3):
        r = np.random.default_rng(seed)
        a, b = r.lognormal(0, 1, 5), r.lognormal(0.8, 1, 6)
        assert M.forget_quality(a, b) == pytest.approx(_ks_exact_pvalue(a, b), rel=1e-9)


def test_model_utility_harmonic_mean():
    v = rng.uniform(0.05, 1, 9)
    assert M.model_utility(v) == pytest.approx(9 / sum(1 / x for x in v), rel=1e-12)
    assert M.model_utility(list(v[:8]) + [0.0]) == 0.0


def test_extraction_strength_and_exact_memorisation():
    for _ in range(50):
        m = rng.random(rng.integers(1, 12)) < 0.7
        n = len(m)
        k_star = min(k for k in range(n + 1) if all(m[k:]))  # shortest prefix after which all match
        assert M.extraction_strength(m) == pytest.approx(1 - k_star / n)
        assert M.exact_memorisation(m) == pytest.approx(sum(m) / n)
    assert M.extraction_strength([True, True]) == 1.0 and M.extraction_strength([True, False]) == 0.0


def _es_naive_unlearnkit(m):
    """Definition: k* = the shortest prefix after which every argmax matches, over 0..L (k* = L when the last
    token misses)."""
    n = len(m)
    return 1 - min(k for k in range(n + 1) if all(m[k:])) / n


def _es_naive_open_unlearning(m):
    """open-unlearning's loop: the first k in 0..L-1 whose suffix matches, else the loop's last k (L-1)."""
    n = len(m)
    for k in range(n):
        if all(m[k:]):
            break
    return 1 - k / n


def test_extraction_strength_conventions_against_naive():
    cases = [rng.random(rng.integers(1, 12)) < 0.6 for _ in range(200)]
    cases += [np.array(c, bool) for c in ([False], [True], [True, False], [False, True], [True, True, False])]
    for m in cases:
        assert M.extraction_strength(m, "unlearnkit") == pytest.approx(_es_naive_unlearnkit(m))
        assert M.extraction_strength(m, "open-unlearning") == pytest.approx(_es_naive_open_unlearning(m))
        if not m[-1]:  # the documented difference: a missed last token is 0 here, 1/L there
            assert M.extraction_strength(m) == 0.0
            assert M.extraction_strength(m, "open-unlearning") == pytest.approx(1 / len(m))
        else:
            assert M.extraction_strength(m) == M.extraction_strength(m, "open-unlearning")
    with pytest.raises(ValueError, match="open-unlearning"):
        M.extraction_strength([True], "other")


def test_mia_scores():
    logp = rng.uniform(-6, 0, 11)
    assert M.mia_loss(logp) == pytest.approx(-sum(logp) / 11)
    text = "The quick brown fox jumps over the lazy dog, twice: the quick brown fox."
    assert M.mia_zlib(logp, text) == pytest.approx((-sum(logp) / 11) / len(zlib.compress(text.encode())))
    k = max(1, int(11 * 0.4))  # 4 lowest
    assert M.mia_mink(logp) == pytest.approx(-sum(sorted(logp)[:k]) / k)
    # Min-K%++: a real next-token distribution per position.
    logits = rng.normal(size=(11, 7))
    targets = rng.integers(0, 7, 11)
    z = []
    for t in range(11):
        p = [math.exp(x) for x in logits[t]]
        s = sum(p)
        p = [x / s for x in p]
        lp = [math.log(x) for x in p]
        mu = sum(pi * li for pi, li in zip(p, lp))
        var = sum(pi * (li - mu) ** 2 for pi, li in zip(p, lp))
        z.append((lp[targets[t]] - mu) / math.sqrt(var))
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok_lp = lsm[np.arange(11), targets]
    mu = (np.exp(lsm) * lsm).sum(-1)
    var = (np.exp(lsm) * lsm ** 2).sum(-1) - mu ** 2
    assert M.mia_minkpp(tok_lp, mu, var) == pytest.approx(-sum(sorted(z)[:k]) / k, rel=1e-9)


def test_auc_is_pairwise_probability_and_privleak():
    f, h = rng.normal(0, 1, 9), rng.normal(0.5, 1, 12)
    h[0] = f[0]  # a tie counts one half
    direct = sum((hj > fi) + 0.5 * (hj == fi) for fi in f for hj in h) / (len(f) * len(h))
    assert M.auc(f, h) == pytest.approx(direct, rel=1e-12)
    assert M.privleak(0.8, 0.5) == pytest.approx(60.0)
    assert M.privleak(0.4, 0.5) < 0  # over-unlearned: forget looks less member-like than holdout


def _lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_rouge_recall_is_lcs_over_reference_length():
    gold = "the author was born in paris and writes about war"
    gen = "born in london the author writes poems about the sea"
    r = M.rouge(gold, gen)
    g, p = gold.split(), gen.split()
    lcs = _lcs(g, p)
    assert r["rougeL_recall"] == pytest.approx(lcs / len(g))
    prec = lcs / len(p)
    assert r["rougeL_f1"] == pytest.approx(2 * prec * (lcs / len(g)) / (prec + lcs / len(g)))
    overlap = sum(min(g.count(w), p.count(w)) for w in set(g))
    assert r["rouge1_recall"] == pytest.approx(overlap / len(g))
    assert M.rouge("He writes novels", "he wrote a novel")["rouge1_recall"] == pytest.approx(2 / 3)  # stemming
