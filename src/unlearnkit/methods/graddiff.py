"""Gradient Difference: ascend on forget, descend on retain.  L = −γ·CE(forget) + α·R,  R = CE(retain) or
KL(p_ref ‖ p_θ) on retain answer tokens (retain_loss: nll | kl)."""
from __future__ import annotations

from ..train.nll import mean_token_nll
from .common import retain_term

DEFAULTS = dict(lr=1e-5, epochs=5.0, batch_size=4, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                max_grad_norm=1.0, gamma=1.0, alpha=1.0, retain_loss="nll")
NEEDS_RETAIN = True
CHOICES = {"retain_loss": ("nll", "kl")}


def setup(model, data, cfg):
    retain = retain_term(model, cfg)
    gamma, alpha = cfg["gamma"], cfg["alpha"]

    def step_loss(m, batch):
        ce_forget = mean_token_nll(m, batch["forget"])
        r = retain(m, batch["retain"])
        return -gamma * ce_forget + alpha * r, {"forget_ce": ce_forget.item(), "retain": r.item()}

    return step_loss
