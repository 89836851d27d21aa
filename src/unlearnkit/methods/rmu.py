"""RMU — Representation Misdirection for Unlearning (Li et al., 2024, WMDP) — and Adaptive RMU (Dang et al., 2025).

h_l(x) = output of decoder layer l (= HF hidden_states[l+1]); u_k ~ Uniform[0,1)^d, normalised, fixed per forget
topic k (seeded). Per step (topics interleave step by step, each with its own u_k, c_k, α_k):

    L = mean (h_l^θ(x_f) − c_k·u_k)²  +  α_k · mean (h_l^θ(x_r) − h_l^frozen(x_r))²

means over (batch, token, hidden); padding is masked out (padding="masked") or, as the reference code does,
included with left padding (padding="reference"). Adaptive RMU replaces c_k by β·‖h_l^frozen(x_f)‖: the mean
per-token L2 norm of the frozen layer-l activations on the topic's first forget batch, detached and then held fixed
(adaptive_norm="first_batch", the reference); "batch" recomputes it every step, "sample" per sequence.

Fast path (default): the forward stops at layer l — no later layers, no LM head, no logits. Layers below the lowest
trained layer run once, under no_grad, and feed both the updated and the frozen branch; the frozen branch is a copy
of only the trained layers. Only trained parameters require grad. `naive=True` builds the plain version (full
forward with all hidden states, a full frozen model copy) for tests and `unlearnkit bench rmu`.
"""
from __future__ import annotations

import copy
import re

import torch
import torch.nn.functional as F

from ..errors import UserError
from .common import frozen_copy

# Reference (Zephyr-7B): layer 7, c 6.5, α 1200, lr 5e-5, batch 4, 150 batches, AdamW eps 1e-6 / wd 0, no
# schedule or clipping. For SmolLM2-135M (30 layers, d=576) layer 7 is also a quarter of the depth. Both loss terms
# scale with the activation norm squared, so what transfers between models is c relative to the layer's norm:
# SmolLM2's layer-7 tokens have mean norm ~144, so c = 600 (~4x, like the reference c against Zephyr's norms, and
# close to Adaptive RMU's 5x) and the reference α. The reference lr 5e-5 leaves SmolLM2 unchanged in 150 steps
# (mini TOFU forget p(a|q) 0.97 → 0.97; 5e-4 → 0.86, 1e-3 → 0.33, 2e-3 → 0.04 with retain p unchanged at 0.96),
# so lr 2e-3. See docs/methods.md and docs/results_methods.md.
DEFAULTS = dict(lr=2e-3, epochs=1.0, max_steps=150, batch_size=4, warmup_ratio=0.0, schedule="constant",
                weight_decay=0.0, adam_eps=1e-6, max_grad_norm=None,
                layer=7, steering_coeff=600.0, alpha=1200.0, params=None, padding="masked",
                adaptive=False, beta=5.0, adaptive_norm="first_batch")
# Adaptive RMU's target (5 × the layer norm, ~720 here) is larger than c = 600: at lr 2e-3 it overshoots (forget
# p(a|q) 3e-4, PrivLeak −100, forget quality 0.007); lr 1e-3 gives forget quality 0.27 at PrivLeak +2.7.
ADAPTIVE_DEFAULTS = dict(DEFAULTS, adaptive=True, lr=1e-3)
NEEDS_RETAIN = True
CHOICES = {"padding": ("masked", "reference"), "adaptive_norm": ("first_batch", "batch", "sample")}


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


# --- activations at layer l: the fast path and the naive one -------------------------------------------------------

def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return base.get_decoder()


def _layer_index(name: str) -> int | None:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class _StopAtFirstLayer(Exception):
    pass


def _layer_inputs(decoder, batch):
    """Embeddings plus the arguments HF gives every decoder layer (causal mask, rotary embeddings, ...): run the
    decoder until its first layer is called. Model-agnostic for HF decoders whose layers share their arguments."""
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _StopAtFirstLayer

    handle = decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        decoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch},
                use_cache=False)
    except _StopAtFirstLayer:
        pass
    finally:
        handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, args[1:], kwargs


def _run_layers(layers, hidden, args, kwargs):
    for layer in layers:
        out = layer(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class FastActivations:
    """h_l from layer slices: shared no-grad prefix, trained layers, frozen copies of the trained layers."""

    def __init__(self, model, layer: int, trained_layers: list[int]):
        self.decoder = _decoder(model)
        self.lo, self.hi = min(trained_layers), layer
        layers = self.decoder.layers
        self.prefix, self.trained = layers[:self.lo], layers[self.lo:self.hi + 1]
        self.frozen = copy.deepcopy(self.trained).eval().requires_grad_(False)

    def __call__(self, model, batch, with_frozen: bool):
        with torch.no_grad():
            hidden, args, kwargs = _layer_inputs(self.decoder, batch)
            hidden = _run_layers(self.prefix, hidden, args, kwargs)
        h = _run_layers(self.trained, hidden, args, kwargs)
        if not with_frozen:
            return h, None
        with torch.no_grad():
            return h, _run_layers(self.frozen, hidden, args, kwargs)


class NaiveActivations:
    """The plain way: full forwards (all layers, LM head) returning all hidden states; a full frozen copy."""

    def __init__(self, model, layer: int):
        self.layer, self.frozen = layer, frozen_copy(model)

    def _h(self, m, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return m(**inputs, output_hidden_states=True, use_cache=False).hidden_states[self.layer + 1]

    def __call__(self, model, batch, with_frozen: bool):
        h = self._h(model, batch)
        if not with_frozen:
            return h, None
        with torch.no_grad():
            return h, self._h(self.frozen, batch)


# --- the method -----------------------------------------------------------------------------------------------------

def _per_topic(value, n_topics: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_topics
    if len(values) != n_topics:
        raise UserError(f"config {name}: {len(values)} values for {n_topics} forget topics")
    return [float(v) for v in values]


def validate(model, cfg) -> None:
    """Checked before anything else is built."""
    layer, n_layers = cfg["layer"], len(_decoder(model).layers)
    if not isinstance(layer, int) or not 0 <= layer <= n_layers - 2:
        raise UserError(f"config layer: {layer} is out of range for a {n_layers}-layer model (0..{n_layers - 2}; "
                        "the last layer's HF hidden state is taken after the final norm)")


def setup(model, data, cfg, naive: bool = False):
    validate(model, cfg)
    layer, masked = cfg["layer"], cfg["padding"] == "masked"
    trained_layers = []
    for name in data.param_names:
        i = _layer_index(name)
        if i is None or i > layer:
            raise UserError(f"config params: RMU trains decoder-layer parameters at or below layer {layer}; "
                            f"{name} is not one")
        trained_layers.append(i)
    acts = NaiveActivations(model, layer) if naive else FastActivations(model, layer, trained_layers)
    n_topics = data.n_topics
    dim = model.get_input_embeddings().weight.shape[1]
    device = next(model.parameters()).device
    us = [unit_vector(dim, cfg.get("seed", 0), k).to(device) for k in range(n_topics)]
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
            _, h0 = acts(model, fb, with_frozen=True)
            coeffs.append(beta * mean_token_norm(h0, fb["attention_mask"], masked).item())

    def step_loss(m, batch):
        k, forget, retain = batch["topic"], batch["forget"], batch["retain"]
        per_batch_norm = adaptive and norm_mode != "first_batch"
        h_f, h_f0 = acts(m, forget, with_frozen=per_batch_norm)
        if per_batch_norm:
            coeff = beta * mean_token_norm(h_f0, forget["attention_mask"], masked, per_sample=norm_mode == "sample")
        else:
            coeff = coeffs[k]
        loss_f = masked_mse(h_f, coeff * us[k].to(h_f.dtype), forget["attention_mask"], masked)
        h_r, h_r0 = acts(m, retain, with_frozen=True)
        loss_r = masked_mse(h_r, h_r0, retain["attention_mask"], masked)
        return loss_f + alphas[k] * loss_r, {"forget_mse": loss_f.item(), "retain_mse": loss_r.item()}

    step_loss.coeffs = coeffs  # resolved c_k (adaptive: β·norm), recorded in run.json
    return step_loss
