"""RMU / Adaptive RMU: the loss against its definition from full-model hidden states, and the fast path (layer
slices, shared no-grad prefix, frozen copies of the trained layers only) against the naive implementation (full
forward with all hidden states + a full frozen copy): loss and gradients to 1e-5 relative."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from unlearnkit.data import tofu
from unlearnkit.errors import UserError
from unlearnkit.methods import rmu
from unlearnkit.train.activations import FastActivations
from unlearnkit.unlearning import build

FORGET = [dict(r, topic="a" if i % 2 else "b") for i, r in enumerate(tofu.load("forget01")[:8])]
RETAIN = tofu.load("full")[:8]
LAYER = 2  # of 4


def perturb_trained(params, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def hidden(model, batch, layer):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs, output_hidden_states=True).hidden_states[layer + 1]


def mean_sq(diff, mask, masked):
    """mean over (batch, token, hidden), written out: real tokens only when masked."""
    if not masked:
        return (diff ** 2).sum() / diff.numel()
    return ((diff ** 2).sum(-1) * mask).sum() / (mask.sum() * diff.shape[-1])


CASES = {
    "rmu-default": dict(),
    "rmu-prefix-reference-padding": dict(params=r"layers\.(1|2)\.mlp\.(down|up)_proj\.weight", padding="reference"),
    "adaptive-first-batch": dict(adaptive=True),
    "adaptive-per-sample-prefix": dict(adaptive=True, adaptive_norm="sample", params=r"layers\.2\.self_attn"),
    "adaptive-per-batch-reference": dict(adaptive=True, adaptive_norm="batch", padding="reference"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_equals_naive_and_definition(make_tiny_model, tokenizer, case):
    config = dict(layer=LAYER, batch_size=3, steering_coeff=[3.0, 5.0], alpha=[7.0, 11.0], **CASES[case])
    method = "adaptive_rmu" if config.get("adaptive") else "rmu"
    run = build(make_tiny_model(), tokenizer, method, FORGET, RETAIN, config)
    model, cfg = run.model, run.cfg
    naive_data = dataclasses.replace(run.data, report={})
    naive_loss = rmu.setup(model, naive_data, cfg, naive=True)
    frozen = copy.deepcopy(model).eval()
    assert naive_data.report["steering_coeffs"] == pytest.approx(run.data.report["steering_coeffs"], rel=1e-5)
    perturb_trained(run.params)  # so the retain term and its gradient are not zero
    masked = cfg["padding"] == "masked"
    for batch in run.schedule(0)[:2]:
        k, f, r = batch["topic"], batch["forget"], batch["retain"]
        # the definition, from full-model hidden states
        u = rmu.unit_vector(model.config.hidden_size, cfg["seed"], k)
        with torch.no_grad():
            h_f0, h_r0 = hidden(frozen, f, LAYER), hidden(frozen, r, LAYER)
        if cfg["adaptive"] and cfg["adaptive_norm"] != "first_batch":
            norms = h_f0.norm(dim=-1)
            w = f["attention_mask"].float() if masked else torch.ones_like(norms)
            if cfg["adaptive_norm"] == "sample":
                c = (cfg["beta"] * (norms * w).sum(1) / w.sum(1))[:, None, None]
            else:
                c = cfg["beta"] * (norms * w).sum() / w.sum()
        else:
            c = run.data.report["steering_coeffs"][k]
        expected = (mean_sq(hidden(model, f, LAYER) - c * u, f["attention_mask"], masked)
                    + cfg["alpha"][k] * mean_sq(hidden(model, r, LAYER) - h_r0, r["attention_mask"], masked))

        grads = []
        for loss_fn in (run.step_loss, naive_loss):
            for p in run.params:
                p.grad = None
            loss, parts = loss_fn(model, batch)
            loss.backward()
            grads.append([p.grad.clone() for p in run.params])
            torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-7)
            assert parts["retain_mse"] > 0
        for g_fast, g_naive in zip(*grads):
            assert g_fast.abs().max() > 0
            torch.testing.assert_close(g_fast, g_naive, rtol=1e-5, atol=1e-7)


def test_first_batch_norm_is_the_topics_first_forget_batch(make_tiny_model, tokenizer):
    run = build(make_tiny_model(), tokenizer, "adaptive_rmu", FORGET, RETAIN, dict(layer=LAYER, batch_size=3))
    firsts = {}
    for b in run.schedule(0):
        firsts.setdefault(b["topic"], b["forget"])
    for k, fb in firsts.items():
        with torch.no_grad():
            h = hidden(run.model, fb, LAYER)
        norm = (h.norm(dim=-1) * fb["attention_mask"]).sum() / fb["attention_mask"].sum()
        assert run.data.report["steering_coeffs"][k] == pytest.approx(5.0 * float(norm), rel=1e-5)


def test_only_trained_parameters_require_grad_and_frozen_copy_is_small(make_tiny_model, tokenizer):
    run = build(make_tiny_model(), tokenizer, "rmu", FORGET, RETAIN, dict(layer=LAYER))
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert names == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
    frozen = run.step_loss.__closure__  # the fast path holds copies of layers 0..2 only
    acts = next(c.cell_contents for c in frozen if isinstance(c.cell_contents, FastActivations))
    assert len(acts.frozen) == 3


@pytest.mark.parametrize("config, message", [
    (dict(layer=3), "layer: 3 is out of range"),
    (dict(layer=-1), "layer: must be a decoder-layer number >= 0"),
    (dict(layer=1, params=r"layers\.2\.mlp"), "at or below layer 1"),
    (dict(layer=2, params="no_such_param"), "matches no parameter"),
    (dict(layer=2, steering_coeff=[1.0, 2.0, 3.0]), "3 values for 2 forget topics"),
    (dict(padding="left"), "choose one of masked, reference"),
])
def test_rmu_config_errors(make_tiny_model, tokenizer, config, message):
    with pytest.raises(UserError, match=message):
        build(make_tiny_model(), tokenizer, "rmu", FORGET, RETAIN, config)
