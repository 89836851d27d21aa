"""Corruption functions vs naive per-token loops; conformal threshold vs its definition."""
import math

import numpy as np
import pytest
import torch

from unlearnkit.eco.corrupt import (CorruptionConfig, flip_sign_top_k, rand_noise_first_n, rand_noise_rand_n,
                                    zero_out_top_k)
from unlearnkit.errors import UserError


def _data(seed=0, b=3, t=5, h=8):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn((b, t, h), generator=g)
    mask = torch.rand((b, t), generator=g) > 0.5
    mask[0, 0] = True
    mask[1] = False  # a row with nothing selected
    return emb, mask


def _positions(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]


def test_rand_noise_first_n_matches_naive():
    emb, mask = _data()
    before = emb.clone()
    out = rand_noise_first_n(emb, mask, 3, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(emb, before)  # not in place
    noise = torch.randn((int(mask.sum()), 3), generator=torch.Generator().manual_seed(7)) * 0.5
    naive = emb.clone()
    for i, (b, t) in enumerate(_positions(mask)):
        for d in range(3):
            naive[b, t, d] += noise[i, d]
    assert torch.allclose(out, naive, atol=1e-6)
    assert torch.equal(out[~mask], emb[~mask])
    assert torch.equal(out[..., 3:], emb[..., 3:])


def test_rand_noise_rand_n_matches_naive_and_touches_dims_distinct_columns():
    emb, mask = _data(1, h=16)
    n = int(mask.sum())
    out = rand_noise_rand_n(emb, mask, 4, 2.0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    cols = torch.rand((n, 16), generator=g).argsort(dim=1)[:, :4]
    noise = torch.randn((n, 4), generator=g) * 2.0
    naive = emb.clone()
    for i, (b, t) in enumerate(_positions(mask)):
        assert len(set(cols[i].tolist())) == 4
        for j in range(4):
            naive[b, t, cols[i, j]] += noise[i, j]
    assert torch.allclose(out, naive, atol=1e-6)
    changed = (out != emb).sum(-1)
    assert torch.equal(changed[~mask], torch.zeros_like(changed[~mask]))
    assert (changed[mask] == 4).all()


def test_noise_has_requested_std():
    emb = torch.zeros((4, 500, 64))
    mask = torch.ones((4, 500), dtype=torch.bool)
    out = rand_noise_first_n(emb, mask, 64, 0.3, torch.Generator().manual_seed(0))
    assert abs(out.std().item() - 0.3) < 0.005
    assert abs(out.mean().item()) < 0.005


def test_zero_out_and_flip_sign_top_k_match_naive():
    emb, mask = _data(2, h=10)
    z = zero_out_top_k(emb, mask, 3)
    f = flip_sign_top_k(emb, mask, 3)
    nz, nf = emb.clone(), emb.clone()
    for b, t in _positions(mask):
        vals = emb[b, t].tolist()
        top = sorted(range(10), key=lambda j: -abs(vals[j]))[:3]
        for j in top:
            nz[b, t, j] = 0.0
            nf[b, t, j] = -vals[j]
    assert torch.equal(z, nz)
    assert torch.equal(f, nf)


def test_config_seeded_and_validated():
    emb, mask = _data()
    cfg = CorruptionConfig("rand_noise_first_n", sigma=1.0, dims=None, seed=5)
    a, b = cfg.apply(emb, mask), cfg.apply(emb, mask)
    assert torch.equal(a, b)
    assert not torch.equal(a, CorruptionConfig("rand_noise_first_n", 1.0, None, seed=6).apply(emb, mask))
    assert torch.equal(CorruptionConfig(sigma=0.0).apply(emb, mask), emb)
    with pytest.raises(UserError, match="--corruption"):
        CorruptionConfig("nope")
    with pytest.raises(UserError, match="--sigma"):
        CorruptionConfig(sigma=-1)
    with pytest.raises(UserError, match="--sigma"):
        CorruptionConfig(sigma=float("nan"))


@pytest.mark.parametrize("kwargs, needle", [
    ({"sigma": float("inf")}, "--sigma"),
    ({"sigma": "1"}, "--sigma"),
    ({"dims": 2.5}, "--dims"),
    ({"dims": True}, "--dims"),
    ({"seed": 2 ** 70}, "--seed"),
    ({"seed": 1.0}, "--seed"),
])
def test_config_rejects_non_finite_and_mistyped_values(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        CorruptionConfig(**kwargs)


def test_conformal_threshold_definition_and_coverage():
    from unlearnkit.eco.classifier import achievable_fpr, conformal_threshold

    rng = np.random.default_rng(0)
    n, alpha = 99, 0.1
    scores = rng.normal(size=n)
    tau = conformal_threshold(scores, alpha)
    k = math.ceil((n + 1) * (1 - alpha))  # = 90
    assert tau == np.sort(scores)[k - 1]
    # Marginal guarantee: over fresh calibration sets and test points, P(score > tau) = (n+1-k)/(n+1) <= alpha.
    fp = []
    for _ in range(4000):
        cal, new = rng.normal(size=n), rng.normal()
        fp.append(new > conformal_threshold(cal, alpha))
    assert abs(np.mean(fp) - (n + 1 - k) / (n + 1)) < 0.015
    # Too few calibration points for alpha: threshold falls back to the maximum (guarantee 1/(n+1)).
    assert conformal_threshold([0.1, 0.5, 0.3], 0.01) == 0.5
    assert achievable_fpr(3) == 0.25
    with pytest.raises(UserError):
        conformal_threshold([], 0.1)
