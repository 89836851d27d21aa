"""Sigma search on synthetic metrics, and the forget-set metric with the guard on a tiny model."""
import math

import pytest

from unlearnkit.eco.search import grid_search, zo_search


def test_zo_search_moves_sigma_to_target_on_monotone_metric():
    metric = lambda s: math.exp(-s)  # decreasing in sigma, like answer probability under noise
    target = 0.3
    star = -math.log(target)  # 1.204
    logged = []
    res = zo_search(metric, target, sigma0=0.1, lr=2.0, eps=0.05, steps=12, log=logged.append)
    assert logged == res["log"] and len(logged) >= 3
    assert abs(res["sigma"] - star) < 0.05
    objectives = [e["objective"] for e in logged]
    assert objectives[-1] < objectives[0]
    # every step follows sigma <- max(sigma - lr * g, sigma_min) with the central difference g
    for e in logged[:-1]:
        s, eps = e["sigma"], 0.05
        g = (abs(metric(s + eps) - target) - abs(metric(max(s - eps, 0)) - target)) / (s + eps - max(s - eps, 0))
        assert e["grad"] == pytest.approx(g)
        assert e["next_sigma"] == pytest.approx(max(s - 2.0 * g, 0.01))


def test_zo_search_scale_and_sigma_min():
    # Target above anything reachable: sigma is pushed down and clamped at sigma_min, then stops.
    res = zo_search(lambda s: math.exp(-s / 10), 2.0, sigma0=1.0, lr=50.0, eps=0.1, steps=20, sigma_min=0.2,
                    scale=10.0)
    assert res["log"][-1]["sigma_rel"] == pytest.approx(0.2) and len(res["log"]) < 21
    assert res["sigma"] == pytest.approx(2.0)


def test_grid_search_picks_closest():
    res = grid_search(lambda s: math.exp(-s), 0.3, grid=(0.5, 1.0, 2.0), scale=1.0)
    assert res["sigma"] == 1.0 and len(res["log"]) == 3


def test_forget_metric_with_guard(tiny_model, tokenizer):
    from unlearnkit.data import tofu
    from unlearnkit.eco.corrupt import CorruptionConfig
    from unlearnkit.eco.guard import EcoGuard
    from unlearnkit.eco.search import forget_metric

    rows = tofu.task("mini").forget[:4]
    factory = lambda s: EcoGuard(tiny_model, tokenizer, None, CorruptionConfig(sigma=s), mode="all")
    for name in ("prob", "truth_ratio"):
        v = forget_metric(tiny_model, tokenizer, rows, metric=name, guard_factory=factory)
        plain = v(None)
        # zero noise = no corruption (unguarded scoring reuses the shared prefix's KV cache, a guarded one
        # recomputes it in every row: the same numbers up to float summation order)
        assert v(0.0) == pytest.approx(plain, rel=1e-6)
        assert v(5.0) != pytest.approx(plain, rel=1e-4)
        assert 0 < plain <= 1
