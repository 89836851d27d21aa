"""`unlearnkit bench finetune`: train tokens/s of our fine-tune loop vs a plain HF `Trainer`, same model, data and
number of epochs, measured in one run. speedup = Trainer time ÷ ours (same real tokens)."""
from __future__ import annotations

import time

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("finetune", help="our fine-tune loop vs HF Trainer (tokens/s)")
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=40, help="TOFU QA pairs to train on")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of each (after one untimed warm-up round)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _hf_trainer_seconds(model, tokenizer, examples, args) -> float:
    import torch
    from transformers import Trainer, TrainingArguments
    import tempfile

    class Collator:
        def __call__(self, rows):
            from ..data.batching import collate

            return collate(rows, tokenizer.pad_token_id)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size,
                                  num_train_epochs=args.epochs, learning_rate=2e-4, warmup_ratio=0.1,
                                  weight_decay=0.01, max_grad_norm=1.0, save_strategy="no", report_to=[],
                                  logging_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
                                  dataloader_num_workers=0, seed=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=targs, train_dataset=examples, data_collator=Collator())
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0


def run(args) -> int:
    import statistics

    from ..data import tofu
    from ..data.batching import encode_items
    from ..models import load_model
    from ..train.finetune import finetune
    from ..train.loop import TrainConfig

    items = tofu.load("full")[: args.n]
    _, tokenizer = load_model(args.model, dtype="fp32")
    examples = encode_items(tokenizer, items)
    tokens = sum(len(e["input_ids"]) for e in examples) * args.epochs
    cfg = TrainConfig(lr=2e-4, epochs=args.epochs, batch_size=args.batch_size)

    def ours() -> float:
        model, _ = load_model(args.model, dtype="fp32")
        t0 = time.perf_counter()
        finetune(model, tokenizer, items, cfg, progress=False)
        return time.perf_counter() - t0

    def theirs() -> float:
        model, _ = load_model(args.model, dtype="fp32")
        model.train()
        return _hf_trainer_seconds(model, tokenizer, examples, args)

    # One untimed round first (thread pools, allocator, lazy imports), then interleaved rounds; medians.
    ours(), theirs()
    times = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        times["ours"].append(ours())
        times["hf"].append(theirs())
    mine, hf = statistics.median(times["ours"]), statistics.median(times["hf"])
    emit({"rounds": args.rounds, "ours_seconds": mine, "hf_trainer_seconds": hf,
          "ours_tokens_per_s": tokens / mine, "hf_trainer_tokens_per_s": tokens / hf, "speedup": hf / mine},
         args.json, bench="finetune")
    return 0
