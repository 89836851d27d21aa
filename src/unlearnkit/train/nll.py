"""Answer-token log-likelihoods, computed only where they are needed.

The LM head (vocab × hidden) and the log-softmax dominate a small model's step; prompts are about half of each
sequence. So we run the backbone, keep the hidden states that predict a labelled token, and apply the head to those
rows only. Equal to the full-logits computation (tests check to 1e-5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.format import IGNORE
from .sharding import in_root


def backbone_and_head(model):
    """(decoder without head, LM head), or (None, None) where the head-at-labels shortcut does not apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    base = getattr(base, "module", base)  # DDP
    backbone = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    # Models with logit soft-capping or scaling after the head need the full path.
    special = any(getattr(base.config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    # Some classes (GPT-2 in transformers 4.57) return themselves from get_decoder(): no separate backbone.
    return (None, None) if backbone is None or backbone is base or head is None or special else (backbone, head)


def label_logits(model, batch: dict, full_logits: bool = False):
    """Logits at the positions that predict a labelled token.

    Returns (logits [N, V], targets [N], rows [N]) with N = number of labelled tokens in the batch (shifted by one:
    position t predicts token t+1), rows = batch row of each token.
    """
    labels = batch["labels"]
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    rows = keep.nonzero(as_tuple=True)[0]
    targets = shifted[keep]
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    backbone, head = (None, None) if full_logits else backbone_and_head(model)
    if backbone is None:
        logits = model(**kwargs, use_cache=False).logits[:, :-1][keep]
    else:
        # in_root: under FSDP the root unit (embeddings, norm, head) is gathered as in a full forward
        logits = in_root(model, _head_at_labels, backbone, head, kwargs, keep)
    return logits.float(), targets, rows


def _head_at_labels(backbone, head, kwargs, keep):
    hidden = backbone(**kwargs, use_cache=False).last_hidden_state[:, :-1][keep]
    return head(hidden)


def sequence_nll(model, batch: dict, full_logits: bool = False):
    """Per-sample summed answer NLL and answer length: (nll_sum [B], n_tokens [B])."""
    logits, targets, rows = label_logits(model, batch, full_logits)
    token_nll = F.cross_entropy(logits, targets, reduction="none")
    bsz = batch["labels"].shape[0]
    nll_sum = torch.zeros(bsz, dtype=token_nll.dtype, device=token_nll.device).index_add(0, rows, token_nll)
    n_tokens = torch.bincount(rows, minlength=bsz).to(token_nll.dtype)
    return nll_sum, n_tokens


def mean_token_nll(model, batch: dict, full_logits: bool = False) -> torch.Tensor:
    """Token-mean cross-entropy over all answer tokens of the batch (the usual LM loss)."""
    logits, targets, _ = label_logits(model, batch, full_logits)
    return F.cross_entropy(logits, targets)
