"""Tokenised examples → padded batches.

Attention masks come from each sequence's real length, never from `input_ids != pad_id`: with pad == EOS that
would mask the real EOS the model must learn to emit.
"""
from __future__ import annotations

import random

import torch

from ..errors import UserError
from .format import IGNORE, PromptFormat, encode_qa, encode_text


def encode_items(tokenizer, items: list[dict], fmt: PromptFormat = PromptFormat(), max_length: int = 512,
                 source: str = "data", question_key: str = "question", answer_key: str = "answer") -> list[dict]:
    """Tokenise QA rows. A sequence longer than max_length is an error naming the source and row."""
    if not items:
        raise UserError(f"{source}: empty data set")
    out = []
    for i, item in enumerate(items):
        ex = encode_qa(tokenizer, item[question_key], item[answer_key], fmt)
        if len(ex["input_ids"]) > max_length:
            raise UserError(f"{source}: row {item.get('index', i)} has {len(ex['input_ids'])} tokens, more than "
                            f"--max-length {max_length}")
        out.append(ex)
    return out


def encode_corpus(tokenizer, docs: list[str], max_length: int = 512, source: str = "corpus") -> list[dict]:
    """Raw text cut into chunks of at most max_length tokens (long documents are normal for corpora)."""
    if not docs:
        raise UserError(f"{source}: empty corpus")
    out = []
    for doc in docs:
        ex = encode_text(tokenizer, doc)
        ids = ex["input_ids"]
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length]
            if len(chunk) > 1:
                out.append({"input_ids": chunk, "labels": [IGNORE] + chunk[1:]})
    return out


def length_bucketed_batches(lengths: list[int], batch_size: int, shuffle: bool = True, seed: int = 0,
                            bucket_factor: int = 50) -> list[list[int]]:
    """Index batches of similar length (less padding). With shuffle: a seeded shuffle, then sort within windows of
    bucket_factor × batch_size, then shuffle the batch order — random but deterministic for a seed."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    window = max(batch_size * bucket_factor, batch_size)
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest; attention_mask = 1 on the first/last `len` positions (from real lengths)."""
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ex, n) in enumerate(zip(examples, lengths)):
        sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, sl] = torch.tensor(ex["input_ids"])
        labels[row, sl] = torch.tensor(ex["labels"])
        attention[row, sl] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if padding_side == "left":  # positions must count real tokens only
        batch["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
    return batch


def batches(examples: list[dict], batch_size: int, pad_id: int, shuffle: bool = True, seed: int = 0,
            padding_side: str = "right"):
    """Padded batches in length-bucketed order. Each batch carries "index": positions into `examples`."""
    for idx in length_bucketed_batches([len(e["input_ids"]) for e in examples], batch_size, shuffle, seed):
        batch = collate([examples[i] for i in idx], pad_id, padding_side)
        batch["index"] = torch.tensor(idx)
        yield batch
