"""Negative Preference Optimization (Zhang et al., 2024).

L_f = −(2/β)·mean_i log σ(β·(NLL_sum,θ(y_i|x_i) − NLL_sum,ref(y_i|x_i))),  L = γ·L_f + α·R.

The reference model is the model before unlearning and only enters through NLL_sum,ref of the forget set, so we
compute those once, in one no-grad pass, and look them up by example index: no reference model is held (unless
R = KL, which needs p_ref on retain tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.nll import sequence_nll
from ..train.sharding import compute_device
from .common import frozen_copy, retain_term
from .contract import Method, non_negative, positive, when_alpha

# lr 1e-4 for small models; the paper's 1e-5 (Llama-2-7b) is the place to start on 7B models (docs/methods.md).
DEFAULTS = dict(lr=1e-4, epochs=5.0, batch_size=4, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                max_grad_norm=1.0, beta=0.1, gamma=1.0, alpha=1.0, retain_loss="nll")


def npo_forget_loss(nll_theta: torch.Tensor, nll_ref: torch.Tensor, beta: float) -> torch.Tensor:
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_theta - nll_ref)).mean()


@torch.no_grad()
def reference_nll(model, forget_batches, n: int, autocast) -> torch.Tensor:
    """NLL_sum of every forget example under `model` as it is now: [n], indexed like the forget set.

    Computed on the step's own batches under the step's autocast (`autocast()`, the loop's), so that at step 0
    NLL_θ − NLL_ref is exactly 0 whatever the precision: a reference computed in fp32 while the step runs in bf16
    would start NPO off its fixed point."""
    was_training = model.training
    model.eval()
    device = compute_device(model)
    out = torch.full((n,), float("nan"), dtype=torch.float32)
    for batch in forget_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            nll, _ = sequence_nll(model, batch)
        out[batch["index"].cpu()] = nll.float().cpu()
    model.train(was_training)
    if torch.isnan(out).any():
        raise RuntimeError("NPO reference: some forget examples are in no batch of the first epoch")
    return out


def setup(model, data, cfg, naive: bool = False):
    """naive=True: hold a reference model and recompute its NLL every step (for `unlearnkit bench npo`)."""
    if naive:
        ref_model = frozen_copy(model)
    else:
        forget_batches = [step["forget"] for step in data.batches_for_epoch(0)]
        ref_nll = reference_nll(model, forget_batches, len(data.forget), data.autocast)
        ref_nll = ref_nll.to(compute_device(model))
    retain = retain_term(model, cfg) if cfg["alpha"] else None
    beta, gamma, alpha = cfg["beta"], cfg["gamma"], cfg["alpha"]

    def step_loss(m, batch):
        forget = batch["forget"]
        nll, _ = sequence_nll(m, forget)
        if naive:
            with torch.no_grad():
                ref = sequence_nll(ref_model, forget)[0]
        else:
            ref = ref_nll[forget["index"]]
        loss_f = npo_forget_loss(nll, ref, beta)
        parts = {"forget_npo": loss_f.item(), "forget_nll": nll.mean().item()}
        loss = gamma * loss_f
        if retain is not None:
            r = retain(m, batch["retain"])
            loss = loss + alpha * r
            parts["retain"] = r.item()
        return loss, parts

    return step_loss


METHOD = Method("npo", DEFAULTS, setup, uses_retain=when_alpha, choices={"retain_loss": ("nll", "kl")},
                check=lambda cfg: (positive(cfg, "beta"), non_negative(cfg, "gamma", "alpha")))
