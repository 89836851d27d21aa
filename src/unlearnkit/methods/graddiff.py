"""Gradient Difference: ascend on forget, descend on retain.  L = −γ·CE(forget) + α·R,  R = CE(retain) or
KL(p_ref ‖ p_θ) on retain answer tokens (retain_loss: nll | kl)."""
from __future__ import annotations

from ..train.nll import mean_token_nll
from .common import retain_term
from .contract import Method, non_negative, when_alpha

DEFAULTS = dict(lr=1e-5, epochs=5.0, batch_size=4, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                max_grad_norm=1.0, gamma=1.0, alpha=1.0, retain_loss="nll")


def setup(model, data, cfg):
    retain = retain_term(model, cfg) if cfg["alpha"] else None
    gamma, alpha = cfg["gamma"], cfg["alpha"]

    def step_loss(m, batch):
        ce_forget = mean_token_nll(m, batch["forget"])
        parts = {"forget_ce": ce_forget.item()}
        loss = -gamma * ce_forget
        if retain is not None:
            r = retain(m, batch["retain"])
            loss = loss + alpha * r
            parts["retain"] = r.item()
        return loss, parts

    return step_loss


METHOD = Method("graddiff", DEFAULTS, setup, uses_retain=when_alpha, choices={"retain_loss": ("nll", "kl")},
                check=lambda cfg: non_negative(cfg, "gamma", "alpha"))
