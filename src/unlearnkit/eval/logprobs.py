"""Per-sample token statistics from ONE teacher-forced forward per sequence.

Every teacher-forced metric (probability, truth ratio, ES, EM, LOSS / ZLib / Min-K% / Min-K%++) is a function of
four per-token arrays over the labelled tokens (answer + end-of-turn):
  logp   log p(label token)
  match  argmax of the model's next-token distribution == label
  mu,var mean and variance of log p(z) for z ~ the model's own next-token distribution (Min-K%++ only)
So we compute them once, in length-sorted batches, with the LM head and log-softmax applied only at labelled
positions (train/nll.py: label_logits).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import collate
from ..data.format import IGNORE
from ..train.nll import label_logits

_CHUNK = 512  # rows of [N, V] log-probs materialised at once: bounds memory for the vocab-wide statistics


@dataclass
class TokenStats:
    """Statistics over the labelled tokens of one sequence (arrays of equal length L)."""
    logp: np.ndarray
    match: np.ndarray
    mu: np.ndarray | None = None
    var: np.ndarray | None = None

    @property
    def nll(self) -> float:
        """Mean token NLL (TOFU's `avg_gt_loss`); p(a|q) = exp(-nll)."""
        return float(-self.logp.mean())


def prompt_mask(batch: dict) -> torch.Tensor:
    """True on real prompt tokens (attended and unlabelled): what an inference-time guard may look at."""
    return batch["attention_mask"].bool() & (batch["labels"] == IGNORE)


def _token_stats(logits: torch.Tensor, targets: torch.Tensor, want_dist: torch.Tensor):
    """logp, match for every row; mu/var only for rows with want_dist (the vocab-wide sums cost extra passes)."""
    logp_all, match, mu, var = [], [], [], []
    for s in range(0, logits.shape[0], _CHUNK):
        lg, tg, wd = logits[s:s + _CHUNK], targets[s:s + _CHUNK], want_dist[s:s + _CHUNK]
        lsm = torch.log_softmax(lg, dim=-1)
        logp_all.append(lsm.gather(-1, tg[:, None])[:, 0])
        match.append(lg.argmax(-1) == tg)
        m = torch.full_like(tg, float("nan"), dtype=lsm.dtype)
        v = torch.full_like(m, float("nan"))
        if wd.any():
            sel = lsm[wd]
            p = sel.exp()
            m_sel = (p * sel).sum(-1)
            # Two-pass variance: E[x²] - μ² cancels catastrophically in fp32 (μ ≈ -log V, σ² ≪ μ²).
            v_sel = (p * (sel - m_sel[:, None]).square()).sum(-1)
            m[wd], v[wd] = m_sel, v_sel
        mu.append(m)
        var.append(v)
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)
    return cat(logp_all), cat(match), cat(mu), cat(var)


@torch.no_grad()
def sequence_stats(model, examples: list[dict], *, batch_size: int = 16, pad_id: int = 0,
                   want_dist: list[bool] | None = None, prompts: list[str] | None = None,
                   guard=None, progress=None) -> list[TokenStats]:
    """TokenStats for each tokenised example ({"input_ids", "labels"}), in input order.

    want_dist[i]: also compute Min-K%++'s mu/var for example i. prompts[i]: prompt string handed to the guard.
    Examples are batched by length (sorted, so padding is minimal); one forward per batch.
    """
    n = len(examples)
    want_dist = want_dist if want_dist is not None else [False] * n
    order = sorted(range(n), key=lambda i: len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    out: list[TokenStats | None] = [None] * n
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        arm = (guard.arm(batch["input_ids"], prompt_mask(batch), [prompts[i] for i in idx] if prompts else None)
               if guard is not None else contextlib.nullcontext())
        with arm:
            logits, targets, rows = label_logits(model, batch)
        wd = torch.tensor([want_dist[i] for i in idx], device=device)[rows]
        logp, match, mu, var = (t.cpu().numpy() for t in _token_stats(logits, targets, wd))
        rows = rows.cpu().numpy()
        for r, i in enumerate(idx):
            sel = rows == r
            out[i] = TokenStats(logp[sel].astype(np.float64), match[sel],
                                mu[sel].astype(np.float64) if want_dist[i] else None,
                                var[sel].astype(np.float64) if want_dist[i] else None)
        if progress is not None:
            progress.update(len(idx))
    return out
