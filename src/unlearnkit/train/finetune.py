"""Supervised fine-tuning on QA pairs (answer tokens only): how TOFU target and retain models are made."""
from __future__ import annotations

from pathlib import Path

from ..data.batching import batches, encode_items
from ..data.format import PromptFormat
from ..files import write_json_atomic
from .loop import TrainConfig, train
from .nll import mean_token_nll


def answer_loss(model, batch):
    loss = mean_token_nll(model, batch)
    return loss, {}


def finetune(model, tokenizer, items: list[dict], cfg: TrainConfig = TrainConfig(), out_dir=None,
             fmt: PromptFormat = PromptFormat(), max_length: int = 512, source: str = "train data",
             progress: bool = True, desc: str = "fine-tune", **train_kwargs) -> dict:
    """Fine-tune `model` in place on `items` ([{question, answer}]); returns the training log."""
    examples = encode_items(tokenizer, items, fmt, max_length, source)
    pad_id = tokenizer.pad_token_id

    def batches_for_epoch(epoch: int):
        return list(batches(examples, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed + epoch))

    log = train(model, answer_loss, batches_for_epoch, cfg, out_dir=out_dir, progress=progress, desc=desc,
                **train_kwargs)
    log["n_examples"] = len(examples)
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "train_log.json", log)
    return log
