"""Per-sample token statistics from ONE teacher-forced forward per sequence.

Every teacher-forced metric (probability, truth ratio, ES, EM, LOSS / ZLib / Min-K% / Min-K%++) is a function of
four per-token arrays over the labelled tokens (answer + end-of-turn):
  logp   log p(label token)
  match  argmax of the model's next-token distribution == label
  mu,var mean and variance of log p(z) for z ~ the model's own next-token distribution (Min-K%++ only)
So we compute them once, in length-sorted batches, with the LM head and log-softmax applied only at labelled
positions (train/nll.py: label_logits).

Shared prompts: TOFU scores up to 7 answers per question (gold, paraphrase, 5 perturbed), MCQ 4 choices. By default
the examples that share a prompt become ONE row: the prompt, then each answer, with position ids restarting after
the prompt and a block attention mask (an answer sees the prompt and itself, never another answer). Every answer
token gets exactly the context it has alone, and each prompt is computed once (TOFU mini: 57 % of the tokens).

Shared prefix: with a system prompt every prompt starts with the same rendered tokens (system turn, then the user
turn's header). The prefix common to all examples is computed once, at batch 1, and its key/value cache is handed
to every batch, whose rows then start after it (positions stay absolute, the mask keeps the prefix as key columns).
A guard sees whole prompts, so with one the rows keep their prefix.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..data.batching import collate
from ..data.format import IGNORE
from ..train.nll import backbone_and_head, label_logits

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


def _split_stats(members, owner, logits, targets, want_dist, out) -> None:
    """Per-token statistics of a batch → one TokenStats per member example (owner[n] = example index of token n)."""
    wd = torch.tensor(want_dist, device=owner.device)[owner]
    logp, match, mu, var = (t.cpu().numpy() for t in _token_stats(logits, targets, wd))
    owner = owner.cpu().numpy()
    for i in members:
        sel = owner == i
        out[i] = TokenStats(logp[sel].astype(np.float64), match[sel],
                            mu[sel].astype(np.float64) if want_dist[i] else None,
                            var[sel].astype(np.float64) if want_dist[i] else None)


@torch.no_grad()
def sequence_stats(model, examples: list[dict], *, batch_size: int = 16, pad_id: int = 0,
                   want_dist: list[bool] | None = None, prompts: list[str] | None = None,
                   guard=None, progress=None, share_prompts: bool = True,
                   hidden_token: int | None = None, share_prefix: bool = True) -> list[TokenStats]:
    """TokenStats for each tokenised example ({"input_ids", "labels"}), in input order.

    want_dist[i]: also compute Min-K%++'s mu/var for example i. prompts[i]: prompt string handed to the guard.
    Examples are batched by length (sorted, so padding is minimal); one forward per batch. share_prompts: examples
    with the same prompt tokens share one row (module docstring); when off, or when the model's attention cannot
    take a custom mask, each example is its own row. hidden_token: no position holding this id is attended to,
    as with an attention mask of input_ids != that id (open-unlearning's collator, pad == EOS); positions still
    count every token. share_prefix: with shared prompts and no guard, the prefix common to all prompts is computed
    once and its KV cache reused by every batch (module docstring); False computes it in every row.
    """
    n = len(examples)
    want_dist = list(want_dist) if want_dist is not None else [False] * n
    if n and share_prompts and can_share_prompts(model):
        return _shared_prompt_stats(model, examples, batch_size, pad_id, want_dist, prompts, guard, progress,
                                    hidden_token, share_prefix and guard is None)
    order = sorted(range(n), key=lambda i: len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    out: list[TokenStats | None] = [None] * n
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        arm = (guard.arm(batch["input_ids"], prompt_mask(batch), [prompts[i] for i in idx] if prompts else None)
               if guard is not None else contextlib.nullcontext())
        if hidden_token is not None:
            batch["attention_mask"] = batch["attention_mask"] * (batch["input_ids"] != hidden_token)
        with arm:
            logits, targets, rows = label_logits(model, batch)
        _split_stats(idx, torch.tensor(idx, device=device)[rows], logits, targets, want_dist, out)
        if progress is not None:
            progress.update(len(idx))
    return out


def can_share_prompts(model) -> bool:
    """Shared-prompt rows need the backbone/head split and an attention that takes a custom 4-D additive mask."""
    backbone, _ = backbone_and_head(model)
    return backbone is not None and getattr(backbone.config, "_attn_implementation", None) in ("eager", "sdpa")


@dataclass
class SharedPromptRow:
    """One row: the prompt, then each member example's answer tokens."""
    input_ids: list[int]
    position_ids: list[int]
    segment: list[int]      # 0 = prompt, k = the k-th member's answer
    predictors: list[int]   # for each labelled token: the row position whose output predicts it,
    targets: list[int]      # the token,
    owner: list[int]        # and its example index
    members: list[int]


def _prompt_length(ex: dict) -> int:
    return next((t for t, y in enumerate(ex["labels"]) if y != IGNORE), len(ex["labels"]))


def common_prefix_length(seqs) -> int:
    """Length of the longest prefix all sequences share, capped at the shortest length − 1: every sequence keeps
    its last token out of it (a prompt's last token predicts the first answer token). 0 for no sequences."""
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs:
        if n <= 0:
            break
        n = next((k for k in range(n) if s[k] != first[k]), n)
    return max(n, 0)


def expanded_cache(cache, batch: int):
    """A fresh DynamicCache whose layers view `cache`'s keys/values expanded to `batch` rows (no copy). The next
    forward appends to it with torch.cat into new tensors, so `cache` itself is never written."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    out = DynamicCache()
    for layer in cache.layers:
        new = DynamicLayer()
        new.lazy_initialization(layer.keys)
        new.keys, new.values = layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1)
        out.layers.append(new)
    return out


def plain_cache():
    """An empty DynamicCache of plain layers, or None where this transformers version has none (no `layers`)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401
    except ImportError:
        return None
    cache = DynamicCache()
    return cache if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer else None


def pack_shared_prompts(examples: list[dict], max_row_tokens: int | None = None) -> list[SharedPromptRow]:
    """Group examples by prompt (the tokens before the first label) into rows, in first-seen order. A row holds
    at most max_row_tokens tokens (at least one example): corpora whose documents share only a first token must not
    become one huge row with a quadratic mask."""
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(examples):
        p = _prompt_length(ex)
        if p == 0:
            raise ValueError(f"example {i}: its first token is labelled, so nothing predicts it")
        groups.setdefault(tuple(ex["input_ids"][:p]), []).append(i)
    rows = []
    for prompt, members in groups.items():
        p = len(prompt)
        row = None
        for i in members:
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            if row is None or (max_row_tokens and len(row.input_ids) + len(ids) - p > max_row_tokens):
                row = SharedPromptRow(list(prompt), list(range(p)), [0] * p, [], [], [], [])
                rows.append(row)
            row.members.append(i)
            k = len(row.members)
            start = len(row.input_ids)  # row position of the example's token p
            row.input_ids += ids[p:]
            row.position_ids += range(p, len(ids))
            row.segment += [k] * (len(ids) - p)
            for t in range(p, len(ids)):
                if labels[t] != IGNORE:  # token t is predicted by token t-1: the prompt's last, or this answer's
                    row.predictors.append(p - 1 if t == p else start + t - p - 1)
                    row.targets.append(labels[t])
                    row.owner.append(i)
    return rows


def shared_prompt_batch(rows: list[SharedPromptRow], pad_id: int, dtype: torch.dtype,
                        hidden_token: int | None = None, prefix: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids and positions, a [B, 1, T, T] additive mask (0 = may attend), and the prompt mask.
    hidden_token: keys holding this id are masked for every query (itself included), as a 2-D attention mask with
    zeros there does. prefix: the rows' first `prefix` tokens are in a KV cache: ids, positions, prompt mask and the
    mask's queries start after them ([B, 1, T - prefix, T]: the prefix stays as key columns)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 = padding
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.tensor(r.input_ids)
        pos[b, :n] = torch.tensor(r.position_ids)
        seg[b, :n] = torch.tensor(r.segment)
    query, key = seg[:, :, None], seg[:, None, :]
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))
    if hidden_token is None:
        allowed |= torch.eye(width, dtype=torch.bool)  # padding queries see themselves: no all-masked softmax rows
    else:
        allowed &= (ids != hidden_token)[:, None, :]
        # only a query left with nothing to see gets itself back (padding; a hidden first token)
        allowed |= torch.eye(width, dtype=torch.bool) & ~allowed.any(-1, keepdim=True)
    allowed = allowed[:, prefix:]
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return {"input_ids": ids[:, prefix:], "position_ids": pos[:, prefix:], "attention_mask": mask[:, None],
            "prompt_mask": (seg == 0)[:, prefix:]}


def _prefix_cache(backbone, rows, pad_id, param, hidden_token):
    """(P, KV cache of the first P tokens) for the prefix all rows' prompts share, run once at batch 1 under the
    rows' own masking rules; (0, None) when there is none or the cache is not plain per-layer tensors."""
    p = common_prefix_length([r.input_ids[:r.segment.count(0)] for r in rows])
    cache = plain_cache() if p else None
    if cache is None:
        return 0, None
    head = rows[0]
    row = SharedPromptRow(head.input_ids[:p], head.position_ids[:p], [0] * p, [], [], [], [])
    batch = {k: v.to(param.device) for k, v in shared_prompt_batch([row], pad_id, param.dtype, hidden_token).items()}
    backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
             position_ids=batch["position_ids"], past_key_values=cache, use_cache=True)
    if len(cache.layers) == 0 or any(layer.get_seq_length() != p for layer in cache.layers):
        return 0, None
    return p, cache


def _shared_prompt_stats(model, examples, batch_size, pad_id, want_dist, prompts, guard, progress, hidden_token,
                         share_prefix):
    # About as many tokens per forward as batch_size unshared examples of average length; no row longer than that.
    budget = batch_size * sum(len(e["input_ids"]) for e in examples) / len(examples)
    rows = sorted(pack_shared_prompts(examples, max_row_tokens=int(budget)), key=lambda r: len(r.input_ids))
    batches, current = [], []
    for r in rows:
        if current and (len(current) + 1) * len(r.input_ids) > budget:
            batches.append(current)
            current = []
        current.append(r)
    batches += [current] if current else []
    backbone, head = backbone_and_head(model)
    param = next(model.parameters())
    # guard.arm corrupts prompt embeddings and must see whole prompts: no prefix then (sequence_stats)
    p, prefix = _prefix_cache(backbone, rows, pad_id, param, hidden_token) if share_prefix else (0, None)
    out: list[TokenStats | None] = [None] * len(examples)
    for group in batches:
        packed = shared_prompt_batch(group, pad_id, param.dtype, hidden_token, prefix=p)
        batch = {k: v.to(param.device) for k, v in packed.items()}
        arm = (guard.arm(batch["input_ids"], batch["prompt_mask"], [prompts[r.members[0]] for r in group]
                         if prompts else None) if guard is not None else contextlib.nullcontext())
        past = {} if prefix is None else {"past_key_values": expanded_cache(prefix, len(group)), "use_cache": True}
        with arm:
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], **({"use_cache": False} | past)).last_hidden_state
        at = lambda field: torch.tensor([x for r in group for x in getattr(r, field)], device=param.device)
        row_of = torch.tensor([b for b, r in enumerate(group) for _ in r.predictors], device=param.device)
        logits = head(hidden[row_of, at("predictors") - p]).float()  # the rows start after the prefix
        _split_stats([i for r in group for i in r.members], at("owner"), logits, at("targets"), want_dist, out)
        if progress is not None:
            progress.update(sum(len(r.members) for r in group))
    return out
