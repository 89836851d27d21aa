"""Pieces several methods share: the retain term R (CE or KL to the starting model) and a frozen reference copy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..train.nll import label_logits, mean_token_nll


def frozen_copy(model):
    """A frozen, eval-mode copy of the model as it is now (the reference p_ref); sharded like it under FSDP."""
    from ..train.sharding import frozen_copy as copy_module

    return copy_module(model)


def kl_to_reference(model, ref_model, batch) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) over the vocabulary, averaged over the batch's answer tokens."""
    logits, _, _ = label_logits(model, batch)
    with torch.no_grad():
        ref_logits, _, _ = label_logits(ref_model, batch)
    logp = F.log_softmax(logits, -1)
    ref_logp = F.log_softmax(ref_logits, -1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()


def retain_term(model, cfg: dict):
    """R(model, retain_batch) as configured: "nll" (token-mean CE) or "kl" (holds a frozen copy of the model)."""
    kind = cfg["retain_loss"]
    if kind == "nll":
        return lambda m, batch: mean_token_nll(m, batch)
    ref = frozen_copy(model)
    return lambda m, batch: kl_to_reference(m, ref, batch)
