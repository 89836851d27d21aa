"""SimNPO (Fan et al., 2024): NPO without a reference model, length-normalised.

Paper form (default):   L_f = −(2/β)·mean_i log σ(β·NLL_sum,θ(y_i|x_i)/|y_i| − γ_m)
Authors' code form:     L_f = −(2/β)·mean_i log σ(β·(NLL_sum,θ(y_i|x_i)/|y_i| − γ_m))   (gamma_form="authors")
Total: L = λ·L_f + α·R.  |y| counts answer tokens including the end-of-turn/EOS token. With γ_m = 0 the forms agree.

Paper TOFU defaults (Llama-2-7b): forget05 β=2.5, λ=0.1375; forget10 β=4.5, λ=0.125; γ_m=0; α=1; lr 1e-5, 10
epochs (configs/simnpo_tofu_paper.yaml). Our defaults are for SmolLM2-135M on mini TOFU (docs/methods.md; the
measurements behind them are in docs/results_methods.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.nll import sequence_nll
from .common import retain_term
from .contract import Method, non_negative, positive, when_alpha

DEFAULTS = dict(lr=1e-4, epochs=4.0, batch_size=8, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                max_grad_norm=1.0, beta=2.5, lam=1.0, gamma_m=0.0, gamma_form="paper", alpha=1.0,
                retain_loss="nll")
CHOICES = {"retain_loss": ("nll", "kl"), "gamma_form": ("paper", "authors")}


def simnpo_forget_loss(nll_sum: torch.Tensor, n_tokens: torch.Tensor, beta: float, gamma_m: float,
                       form: str = "paper") -> torch.Tensor:
    per_token = nll_sum / n_tokens
    margin = beta * per_token - gamma_m if form == "paper" else beta * (per_token - gamma_m)
    return -(2.0 / beta) * F.logsigmoid(margin).mean()


def setup(model, data, cfg):
    retain = retain_term(model, cfg) if cfg["alpha"] else None
    beta, lam, alpha, gamma_m, form = cfg["beta"], cfg["lam"], cfg["alpha"], cfg["gamma_m"], cfg["gamma_form"]

    def step_loss(m, batch):
        nll, n_tokens = sequence_nll(m, batch["forget"])
        loss_f = simnpo_forget_loss(nll, n_tokens, beta, gamma_m, form)
        parts = {"forget_simnpo": loss_f.item(), "forget_nll_per_token": (nll / n_tokens).mean().item()}
        loss = lam * loss_f
        if retain is not None:
            r = retain(m, batch["retain"])
            loss = loss + alpha * r
            parts["retain"] = r.item()
        return loss, parts

    return step_loss


METHOD = Method("simnpo", DEFAULTS, setup, uses_retain=when_alpha, choices=CHOICES,
                check=lambda cfg: (positive(cfg, "beta"), non_negative(cfg, "lam", "alpha")))
