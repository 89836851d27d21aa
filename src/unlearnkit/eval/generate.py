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
                    progress=None) -> list[str]:
    """Greedy continuation of each tokenised prompt, decoded without special tokens, in input order.

    Rows stop at the tokenizer's EOS; with stop_strings, generation of a row also ends once one appears (HF's
    stop-string criterion) and the text is cut before it. Batches are length-sorted so left padding stays small.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[str | None] = [None] * len(prompt_ids)
    extra = {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{"input_ids": prompt_ids[i], "labels": prompt_ids[i]} for i in idx], pad, "left")
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        arm = (guard.arm(ids, attn.bool(), [prompts[i] for i in idx] if prompts else None)
               if guard is not None else contextlib.nullcontext())
        with arm:
            gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **extra)
        for row, i in enumerate(idx):
            new = gen[row, ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in new:  # rows that finished early are padded after EOS
                new = new[:new.index(tokenizer.eos_token_id)]
            out[i] = cut_at_stops(tokenizer.decode(new, skip_special_tokens=True), stop_strings).strip()
        if progress is not None:
            progress.update(len(idx))
    return out
