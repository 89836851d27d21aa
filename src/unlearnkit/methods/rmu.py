"""RMU — Representation Misdirection for Unlearning (Li et al., 2024, WMDP) — and Adaptive RMU (Dang et al., 2025).

h_l(x) = output of decoder layer l; u_k ~ Uniform[0,1)^d, normalised, fixed per forget topic k (seeded). Per step
(topics interleave step by step, each with its own u_k, c_k, α_k):

    L = mean (h_l^θ(x_f) − c_k·u_k)²  +  α_k · mean (h_l^θ(x_r) − h_l^frozen(x_r))²

means over (batch, token, hidden); padding is masked out (padding="masked") or, as the reference code does,
included with left padding (padding="reference"). Adaptive RMU replaces c_k by β·‖h_l^frozen(x_f)‖: the mean
per-token L2 norm of the frozen layer-l activations on the topic's first forget batch, detached and then held fixed
(adaptive_norm="first_batch", the reference); "batch" recomputes it every step, "sample" per sequence.

The activations come from train/activations.py: by default the forward stops at layer l (`FastActivations`);
`naive=True` uses full forwards and a full frozen copy (tests, `unlearnkit bench rmu`).
Defaults: c relative to the layer's activation norm and lr chosen for SmolLM2-135M (docs/methods.md says why;
the sweeps are in docs/results_methods.md). The reference (Zephyr-7B) values are in configs/rmu_zephyr_reference.yaml.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..train.activations import FastActivations, NaiveActivations, layer_index, n_layers
from ..train.sharding import compute_device
from .contract import Method, non_negative, positive, when_alpha

DEFAULTS = dict(lr=2e-3, epochs=1.0, max_steps=150, batch_size=4, warmup_ratio=0.0, schedule="constant",
                weight_decay=0.0, adam_eps=1e-6, max_grad_norm=None,
                layer=7, steering_coeff=600.0, alpha=1200.0, padding="masked",
                adaptive=False, beta=5.0, adaptive_norm="first_batch")
ADAPTIVE_DEFAULTS = dict(DEFAULTS, adaptive=True, lr=1e-3)
CHOICES = {"padding": ("masked", "reference"), "adaptive_norm": ("first_batch", "batch", "sample"),
           "adaptive": (True, False)}


def default_param_regex(layer: int) -> str:
    """mlp.down_proj of layers l−2..l (the reference trains exactly these)."""
    layers = "|".join(str(i) for i in range(max(0, layer - 2), layer + 1))
    return rf"(^|\.)layers\.({layers})\.mlp\.down_proj\.weight$"


def unit_vector(dim: int, seed: int, topic: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + topic)
    u = torch.rand(dim, generator=g)
    return u / u.norm()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, masked: bool) -> torch.Tensor:
    """Mean of (a − b)² over (batch, token, hidden); real tokens only when masked."""
    if not masked:
        return F.mse_loss(a, b.expand_as(a))
    per_token = ((a - b) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


def mean_token_norm(h: torch.Tensor, mask: torch.Tensor, masked: bool, per_sample: bool = False) -> torch.Tensor:
    """Mean per-token L2 norm of activations: a scalar, or [B, 1, 1] per sequence."""
    norms = h.norm(dim=-1)
    weights = mask.to(norms.dtype) if masked else torch.ones_like(norms)
    if per_sample:
        return ((norms * weights).sum(1) / weights.sum(1))[:, None, None]
    return (norms * weights).sum() / weights.sum()


def _per_topic(value, n_topics: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_topics
    if len(values) != n_topics:
        raise UserError(f"config {name}: {len(values)} values for {n_topics} forget topics")
    return [float(v) for v in values]


def check(cfg) -> None:
    if isinstance(cfg["layer"], bool) or not isinstance(cfg["layer"], int) or cfg["layer"] < 0:
        raise UserError(f"config layer: must be a decoder-layer number >= 0 (got {cfg['layer']!r})")
    positive(cfg, "steering_coeff", "beta")
    non_negative(cfg, "alpha")


def check_model(model, cfg) -> None:
    layer, n = cfg["layer"], n_layers(model)
    if not 0 <= layer <= n - 2:
        raise UserError(f"config layer: {layer} is out of range for a {n}-layer model (0..{n - 2}; "
                        "the last layer's HF hidden state is taken after the final norm)")


def setup(model, data, cfg, naive: bool = False):
    layer, masked = cfg["layer"], cfg["padding"] == "masked"
    trained_layers = []
    for name in data.param_names:
        i = layer_index(name)
        if i is None or i > layer:
            raise UserError(f"config params: RMU trains decoder-layer parameters at or below layer {layer}; "
                            f"{name} is not one")
        trained_layers.append(i)
    acts = NaiveActivations(model, layer) if naive else FastActivations(model, layer, trained_layers)
    n_topics = data.n_topics
    dim = model.get_input_embeddings().weight.shape[1]
    device = compute_device(model)
    us = [unit_vector(dim, cfg["seed"], k).to(device) for k in range(n_topics)]
    alphas = _per_topic(cfg["alpha"], n_topics, "alpha")
    coeffs = _per_topic(cfg["steering_coeff"], n_topics, "steering_coeff")
    adaptive, norm_mode, beta = cfg["adaptive"], cfg["adaptive_norm"], cfg["beta"]
    if adaptive and norm_mode == "first_batch":
        first = {}
        for b in data.batches_for_epoch(0):
            first.setdefault(b["topic"], b["forget"])
        coeffs = []
        for k in range(n_topics):
            fb = {key: v.to(device) for key, v in first[k].items()}
            with data.autocast():
                _, h0 = acts(model, fb, with_frozen=True)
            coeffs.append(beta * mean_token_norm(h0, fb["attention_mask"], masked).item())
    data.report["steering_coeffs"] = coeffs  # resolved c_k (adaptive: β·norm)

    def step_loss(m, batch):
        k, forget, retain = batch["topic"], batch["forget"], batch["retain"]
        per_batch_norm = adaptive and norm_mode != "first_batch"
        h_f, h_f0 = acts(m, forget, with_frozen=per_batch_norm)
        if per_batch_norm:
            coeff = beta * mean_token_norm(h_f0, forget["attention_mask"], masked, per_sample=norm_mode == "sample")
        else:
            coeff = coeffs[k]
        loss_f = masked_mse(h_f, coeff * us[k].to(h_f.dtype), forget["attention_mask"], masked)
        if not alphas[k]:  # α = 0: forget term only (no retain batch is drawn)
            return loss_f, {"forget_mse": loss_f.item()}
        h_r, h_r0 = acts(m, retain, with_frozen=True)
        loss_r = masked_mse(h_r, h_r0, retain["attention_mask"], masked)
        return loss_f + alphas[k] * loss_r, {"forget_mse": loss_f.item(), "retain_mse": loss_r.item()}

    return step_loss


def _check_adaptive(cfg) -> None:
    check(cfg)
    if not cfg["adaptive"]:
        raise UserError("config adaptive: adaptive_rmu needs adaptive=true (use --method rmu instead)")


_COMMON = dict(setup=setup, uses_retain=when_alpha, choices=CHOICES, check_model=check_model,
               default_params=lambda cfg: default_param_regex(cfg["layer"]),
               padding_side=lambda cfg: "left" if cfg["padding"] == "reference" else "right",
               position_ids=lambda cfg: cfg["padding"] != "reference",  # the reference code lets HF number them
               reports=("steering_coeffs",), per_topic=("alpha", "steering_coeff"))
METHOD = Method("rmu", DEFAULTS, check=check, **_COMMON)
ADAPTIVE = Method("adaptive_rmu", ADAPTIVE_DEFAULTS, check=_check_adaptive, **_COMMON)
