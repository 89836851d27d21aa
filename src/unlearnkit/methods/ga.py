"""Gradient Ascent: maximise the forget set's NLL.  L = −CE(forget)."""
from __future__ import annotations

from ..train.nll import mean_token_nll
from .contract import Method

# Small models fall apart quickly under pure ascent: low lr and few epochs.
DEFAULTS = dict(lr=1e-5, epochs=5.0, batch_size=4, warmup_ratio=0.0, schedule="constant", weight_decay=0.0,
                max_grad_norm=1.0)


def setup(model, data, cfg):
    def step_loss(m, batch):
        ce_forget = mean_token_nll(m, batch["forget"])
        return -ce_forget, {"forget_ce": ce_forget.item()}

    return step_loss


METHOD = Method("ga", DEFAULTS, setup)
