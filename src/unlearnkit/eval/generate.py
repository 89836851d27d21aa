"""Batched greedy generation: left padding, length-sorted prompts, continuous batching, cut at EOS and stop strings."""
from __future__ import annotations

import contextlib
import inspect
from collections import deque

import torch

from ..data.batching import collate
from .limits import GEN_MEMORY_GB
from .logprobs import common_prefix_length, expanded_cache


_ROOM = 32           # KV positions a row holds beyond its current length (GrowingLayer.room)


FALLBACK_GEN_BATCH = 32  # when the config does not give the sizes row_bytes needs


def _field(config, *names):
    value = next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)
    if value is None:
        raise AttributeError(f"config has none of {names}")
    return value


def kv_bytes_per_token(config, dtype_bytes: int = 4) -> int:
    """Key + value bytes one row adds per token: 2 × layers × kv heads × head dim × dtype bytes."""
    heads = _field(config, "num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or _field(config, "hidden_size", "n_embd") // heads
    return 2 * _field(config, "num_hidden_layers", "n_layer") * kv_heads * head_dim * dtype_bytes


def row_bytes(config, prompt_tokens: int, max_new_tokens: int, dtype_bytes: int = 4) -> int:
    """Memory one decoding row may need at most: its KV cache at full length (+ the buffer's room) and the
    activations of its share of a prefill (one layer's hidden states, q/k/v/o, MLP, attention scores, and logits
    for the last position)."""
    kv = kv_bytes_per_token(config, dtype_bytes) * (prompt_tokens + max_new_tokens + _ROOM)
    hidden = _field(config, "hidden_size", "n_embd")
    mlp = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = _field(config, "num_attention_heads", "n_head")
    act = prompt_tokens * (6 * hidden + 3 * mlp + heads * prompt_tokens) + 2 * _field(config, "vocab_size")
    return kv + act * dtype_bytes


def generation_batch_size(config, prompt_lengths, max_new_tokens: int, memory_gb: float = GEN_MEMORY_GB,
                          dtype_bytes: int = 4) -> int:
    """Rows decoded at once: as many as fit memory_gb by row_bytes (longest prompt), at least 1, at most the number
    of prompts. Larger batches cost less per token on CPU and GPU alike (docs/evaluation.md), memory is the limit.
    A config without the sizes: FALLBACK_GEN_BATCH."""
    if not prompt_lengths:
        return 1
    try:
        per_row = row_bytes(config, max(prompt_lengths), max(max_new_tokens, 0), dtype_bytes)
    except AttributeError:
        return min(len(prompt_lengths), FALLBACK_GEN_BATCH)
    return max(1, min(len(prompt_lengths), int(memory_gb * 2**30 // per_row)))


def cut_at_stops(text: str, stops) -> str:
    """Text up to the earliest stop string (the stop itself is dropped)."""
    at = min((i for i in (text.find(s) for s in stops or ()) if i >= 0), default=len(text))
    return text[:at]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int = 200,
                    batch_size: int | None = None, stop_strings=(), prompts: list[str] | None = None, guard=None,
                    progress=None, engine: str = "continuous", hidden_token: int | None = None,
                    decode=None, memory_gb: float = GEN_MEMORY_GB, share_prefix: bool = True) -> list[str]:
    """Greedy continuation of each tokenised prompt, decoded without special tokens, in input order.

    Rows stop at the tokenizer's EOS; with stop_strings a row also ends once one appears and the text is cut before
    it. Prompts are taken in length order so left padding stays small.
    engine="continuous" (default): our decoding loop. Finished rows leave the batch and the KV cache at once, and
    once half the batch is free, waiting prompts are prefilled and join it — so a few long answers neither make
    their batch decode to max_new_tokens nor leave it running at one or two rows. engine="pruned": the same loop on
    fixed batches (rows leave, none join). engine="hf": `model.generate` on fixed batches (reference). All give the
    same text (tests check).
    hidden_token: prompt positions holding this id are left out of the attention mask (open-unlearning's collator:
    attention_mask = input_ids != pad, pad == EOS); positions then count only the attended tokens, as HF generate
    derives them from the mask. decode(ids) → text (default: decode without special tokens).
    batch_size: rows decoded at once; None: generation_batch_size under memory_gb (GiB).
    share_prefix (continuous and pruned engines, no guard): the prefix common to all prompts (a system prompt and
    the template around it) is prefilled once at batch 1; each prefill then feeds only the prompts' remaining
    tokens, left-padded, after that prefix's KV cache, so a row's cache holds [prefix | padding | rest]. False
    prefills whole prompts. A guard sees whole prompts, so with one the prefix is not shared.
    """
    param = next(model.parameters())
    device = param.device
    if batch_size is None:
        batch_size = generation_batch_size(getattr(model, "config", None), [len(p) for p in prompt_ids],
                                           max_new_tokens, memory_gb, param.element_size())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))

    def left_padded(idx, skip=0):  # skip: leading tokens already in the prefix cache
        batch = collate([{"input_ids": prompt_ids[i][skip:], "labels": prompt_ids[i][skip:]} for i in idx], pad, "left")
        attn = batch["attention_mask"]
        if hidden_token is not None:
            attn = attn * (batch["input_ids"] != hidden_token)
        return batch["input_ids"].to(device), attn.to(device)

    def armed(idx, ids, attn):  # the guard corrupts the first forward only: the prefill
        return (guard.arm(ids, attn.bool(), [prompts[i] for i in idx] if prompts else None)
                if guard is not None else contextlib.nullcontext())

    new_tokens: dict[int, list[int]] = {}
    if engine == "hf":
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, attn = left_padded(idx)
            with armed(idx, ids, attn):
                new_tokens.update(zip(idx, _decode_hf(model, tokenizer, ids, attn, max_new_tokens, pad, stop_strings)))
            if progress is not None:
                progress.update(len(idx))
    elif engine in ("continuous", "pruned"):
        with grouped_kv_attention(model):
            prefix = (_prefix_kv(model, prompt_ids, hidden_token, device)
                      if share_prefix and guard is None and max_new_tokens > 0 else None)
            new_tokens = _decode(model, tokenizer, order, left_padded, armed, max_new_tokens, batch_size, stop_strings,
                                 progress, join=engine == "continuous", prefix=prefix)
    else:
        raise ValueError(f"greedy_generate: unknown engine {engine!r} (continuous, pruned, hf)")
    out = []
    for i in range(len(prompt_ids)):
        new = new_tokens[i]
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        text = decode(new) if decode is not None else tokenizer.decode(new, skip_special_tokens=True)
        out.append(cut_at_stops(text, stop_strings).strip())
    return out


GROUPED_KV_ATTENTION = "unlearnkit_sdpa_gqa"  # the attention implementation grouped_kv_attention switches to


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' sdpa attention, with the key/value heads handed to torch as they are (enable_gqa) instead of
    copied group-times first (repeat_kv)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=bool(is_causal),
        enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _gqa_registered() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if "enable_gqa" not in (torch.nn.functional.scaled_dot_product_attention.__doc__ or ""):  # torch < 2.5
        return False
    AttentionInterface.register(GROUPED_KV_ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(GROUPED_KV_ATTENTION, sdpa_mask)  # the masks transformers builds for sdpa
    return True


@contextlib.contextmanager
def grouped_kv_attention(model, enabled: bool = True):
    """While decoding on CPU, an sdpa model attends through _sdpa_gqa (attention implementation
    GROUPED_KV_ATTENTION). enabled=False leaves the model as it is (transformers' own sdpa with repeat_kv): the
    switch `unlearnkit bench generate` times the stock path with.

    With an attention mask (left padding), transformers' sdpa path copies every key/value head group-times per
    layer and step (repeat_kv: SmolLM2 has 3 KV heads for 9 query heads) — over half of a CPU decode step at batch
    64. torch's CPU sdpa kernel maps query head h to key/value head h // groups itself and gives bit-identical
    outputs (tests/test_eval_fastpath.py). Elsewhere nothing changes: on GPU enable_gqa with a mask leaves the fused
    kernels; eager or other attention implementations, and configs with sub-configs, are left alone."""
    config = getattr(model, "config", None)
    use = (enabled and config is not None and getattr(config, "_attn_implementation", None) == "sdpa"
           and not getattr(config, "sub_configs", None) and next(model.parameters()).device.type == "cpu"
           and _gqa_registered())
    if not use:
        yield
        return
    config._attn_implementation = GROUPED_KV_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _decode_hf(model, tokenizer, ids, attn, max_new_tokens, pad, stop_strings) -> list[list[int]]:
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **extra)
    return [row.tolist() for row in gen[:, ids.shape[1]:]]


def _mergeable(cache) -> bool:
    """Plain per-layer key/value tensors (DynamicLayer) can be padded and concatenated; anything else (sliding
    window, quantised, other transformers versions) falls back to refilling only when the batch is empty."""
    plain = _plain_layer_types()
    return bool(plain) and all(type(layer) in plain for layer in getattr(cache, "layers", [None]))


def _plain_layer_types() -> tuple:
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return ()
    return DynamicLayer, _growing_layer_class()


_GROWING = []


def _growing_layer_class():
    """DynamicLayer whose keys/values are the filled part of a buffer with spare room at the end: a decode step
    writes its one new position into the buffer instead of copying the whole history (DynamicLayer's torch.cat on
    every step, a third of a CPU decode step at batch 64). The values are the same tensors; only copies go."""
    if _GROWING:
        return _GROWING[0]
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        room = _ROOM  # positions allocated ahead: one whole-history copy per `room` steps instead of one per step

        def _fits(self, total: int) -> bool:
            buf = getattr(self, "_kbuf", None)
            return (buf is not None and self.keys.data_ptr() == buf.data_ptr() and self.keys.shape[0] == buf.shape[0]
                    and self.keys.stride() == buf.stride() and total <= buf.shape[-2])

        def update(self, key_states, value_states, cache_kwargs=None):
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            n = self.keys.shape[-2] if self.keys.numel() else 0
            total = n + key_states.shape[-2]
            if not self._fits(total):  # first call, or keys replaced by a join / trim / row selection
                shape = (*key_states.shape[:2], total + self.room, key_states.shape[-1])
                self._kbuf, self._vbuf = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    self._kbuf[:, :, :n], self._vbuf[:, :, :n] = self.keys, self.values
            self._kbuf[:, :, n:total], self._vbuf[:, :, n:total] = key_states, value_states
            self.keys, self.values = self._kbuf[:, :, :total], self._vbuf[:, :, :total]
            return self.keys, self.values

        def batch_select_indices(self, indices):
            n = self.get_seq_length()
            if n and self._fits(n):  # select rows of the buffer (room included): one copy, room kept
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
                self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]
            else:
                super().batch_select_indices(indices)

    _GROWING.append(GrowingLayer)
    return GrowingLayer


def add_kv_buffer(cache) -> None:
    """Give a KV cache the buffer with room: its plain DynamicLayers become GrowingLayers (same tensors, same
    numbers; the next update allocates the room). Our decoding loop calls it after each first prefill; without it a
    cache appends with torch.cat as transformers' does (`unlearnkit bench generate` times both)."""
    from transformers.cache_utils import DynamicLayer

    for layer in getattr(cache, "layers", ()):
        if type(layer) is DynamicLayer:
            layer.__class__ = _growing_layer_class()


def _keep_last(model) -> dict:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _prefix_kv(model, prompt_ids, hidden_token, device):
    """(KV cache, [1, P] attention mask) of the prefix common to all prompts, prefilled once; None when there is
    none or its cache cannot be expanded and joined (not _mergeable)."""
    p = common_prefix_length(prompt_ids)
    if p < 1:
        return None
    ids = torch.tensor([prompt_ids[0][:p]], device=device)
    attn = torch.ones_like(ids) if hidden_token is None else (ids != hidden_token).long()
    out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                **_keep_last(model))
    return (out.past_key_values, attn) if _mergeable(out.past_key_values) else None


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _join(cache, attn, new_cache, new_attn):
    """Append new rows to the batch: left-pad the shorter KV history with masked zeros, concatenate rows."""
    width = max(attn.shape[1], new_attn.shape[1])
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        for name in ("keys", "values"):
            old, new = getattr(layer, name), getattr(new_layer, name)
            setattr(layer, name, torch.cat([_pad_left(old, width - old.shape[-2], -2),
                                            _pad_left(new, width - new.shape[-2], -2)]))
    return torch.cat([_pad_left(attn, width - attn.shape[1], 1), _pad_left(new_attn, width - new_attn.shape[1], 1)])


def _trim_left(cache, attn):
    """Drop leading KV columns that no remaining row attends to (padding of rows that have left)."""
    first = int(attn.any(0).int().argmax())
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        attn = attn[:, first:]
    return attn


def _decode(model, tokenizer, order, left_padded, armed, max_new_tokens, batch_size, stop_strings, progress,
            join: bool, prefix=None) -> dict[int, list[int]]:
    """prefix: (KV cache, [1, P] mask) of the first P tokens of every prompt (_prefix_kv), or None."""
    queue = deque(order)
    new_tokens: dict[int, list[int]] = {i: [] for i in order}
    if max_new_tokens <= 0:
        return new_tokens
    keep_last = _keep_last(model)
    skip = prefix[1].shape[1] if prefix is not None else 0
    rows: list[int] = []   # prompt index of each batch row, in cache order
    cache = attn = positions = pending = None   # pending: each row's newest token, fed at the next step
    can_join = True

    def finished(i: int) -> bool:
        toks = new_tokens[i]
        return (toks[-1] == tokenizer.eos_token_id or len(toks) >= max_new_tokens or bool(stop_strings) and any(
            s in tokenizer.decode(toks[-16:], skip_special_tokens=True) for s in stop_strings))

    while queue or rows:
        free = batch_size - len(rows)
        if queue and (not rows or (can_join and free >= max(1, batch_size // 2))):
            idx = [queue.popleft() for _ in range(min(free, len(queue)))]
            ids, new_attn = left_padded(idx, skip)
            past = {}
            if prefix is not None:  # the ids follow the prefix's KV: mask and positions cover [prefix | ids]
                past = {"past_key_values": expanded_cache(prefix[0], len(idx))}
                new_attn = torch.cat([prefix[1].expand(len(idx), -1), new_attn], dim=1)
            new_positions = (new_attn.cumsum(-1) - 1).clamp(min=0)
            with armed(idx, ids, new_attn):
                out = model(input_ids=ids, attention_mask=new_attn, position_ids=new_positions[:, skip:],
                            use_cache=True, **past, **keep_last)
            token = out.logits[:, -1].argmax(-1)
            if rows:
                attn = _join(cache, attn, out.past_key_values, new_attn)
                positions = torch.cat([positions, new_positions[:, -1:]])
                pending = torch.cat([pending, token])
            else:
                cache, attn, positions, pending = out.past_key_values, new_attn, new_positions[:, -1:], token
                can_join = join and _mergeable(cache)
                add_kv_buffer(cache)
            rows += idx
            fresh = range(len(rows) - len(idx), len(rows))
        else:
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            positions = positions + 1
            out = model(input_ids=pending[:, None], attention_mask=attn, position_ids=positions, past_key_values=cache,
                        use_cache=True)
            cache, pending = out.past_key_values, out.logits[:, -1].argmax(-1)
            fresh = range(len(rows))
        tokens = pending.tolist()  # one device → host copy per step
        for k in fresh:
            new_tokens[rows[k]].append(tokens[k])
        keep = [k for k in range(len(rows)) if not finished(rows[k])]
        if progress is not None:
            progress.update(len(rows) - len(keep))
        if len(keep) < len(rows):  # finished rows leave the batch and the KV cache
            rows = [rows[k] for k in keep]
            if rows:
                sel = torch.tensor(keep, device=attn.device)
                cache.batch_select_indices(sel)
                attn, positions, pending = attn[sel], positions[sel], pending[sel]
                attn = _trim_left(cache, attn) if can_join else attn
    return new_tokens
