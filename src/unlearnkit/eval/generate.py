"""Batched greedy generation: left padding, length-sorted batches, cut at EOS and at stop strings."""
from __future__ import annotations

import contextlib

import torch

from ..data.batching import collate


def cut_at_stops(text: str, stops) -> str:
    """Text up to the earliest stop string (the stop itself is dropped)."""
    at = min((i for i in (text.find(s) for s in stops or ()) if i >= 0), default=len(text))
    return text[:at]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int = 200,
                    batch_size: int = 16, stop_strings=(), prompts: list[str] | None = None, guard=None,
                    progress=None, engine: str = "pruned") -> list[str]:
    """Greedy continuation of each tokenised prompt, decoded without special tokens, in input order.

    Rows stop at the tokenizer's EOS; with stop_strings a row also ends once one appears and the text is cut before
    it. Batches are length-sorted so left padding stays small.
    engine="pruned" (default): our decoding loop drops finished rows from the batch and the KV cache, so one
    long answer does not make its whole batch decode to max_new_tokens. engine="hf": `model.generate` (reference).
    Both give the same text (tests check).
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[str | None] = [None] * len(prompt_ids)
    decode = _decode_pruned if engine == "pruned" else _decode_hf
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{"input_ids": prompt_ids[i], "labels": prompt_ids[i]} for i in idx], pad, "left")
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        arm = (guard.arm(ids, attn.bool(), [prompts[i] for i in idx] if prompts else None)
               if guard is not None else contextlib.nullcontext())
        with arm:  # the guard corrupts the first forward only: the prefill
            new_tokens = decode(model, tokenizer, ids, attn, max_new_tokens, pad, stop_strings)
        for row, i in enumerate(idx):
            new = new_tokens[row]
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            out[i] = cut_at_stops(tokenizer.decode(new, skip_special_tokens=True), stop_strings).strip()
        if progress is not None:
            progress.update(len(idx))
    return out


def _decode_hf(model, tokenizer, ids, attn, max_new_tokens, pad, stop_strings) -> list[list[int]]:
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **extra)
    return [row.tolist() for row in gen[:, ids.shape[1]:]]


def _decode_pruned(model, tokenizer, ids, attn, max_new_tokens, pad, stop_strings) -> list[list[int]]:
    new_tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    active = torch.arange(ids.shape[0], device=ids.device)  # batch rows still decoding, in cache order
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    step_input, cache = ids, None
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, attention_mask=attn, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
        next_token = out.logits[:, -1].argmax(-1)
        keep = []
        for k, (row, token) in enumerate(zip(active.tolist(), next_token.tolist())):
            new_tokens[row].append(token)
            done = token == tokenizer.eos_token_id or (
                stop_strings and any(s in tokenizer.decode(new_tokens[row][-16:], skip_special_tokens=True)
                                     for s in stop_strings))
            if not done:
                keep.append(k)
        if not keep:
            break
        if len(keep) < len(active):  # drop finished rows from the batch and the KV cache
            sel = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(sel)
            active, next_token, attn = active[sel], next_token[sel], attn[sel]
            positions = positions[sel]
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        step_input = next_token.unsqueeze(1)
    return new_tokens
