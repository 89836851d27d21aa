"""`unlearnkit bench gcg`: one GCG step, fast vs naive, on one TOFU forget question (chat format).

fast  = prefix KV cache computed once (inside the timed step, to be conservative), gradient and candidates run
        against it, candidates in batches, LM head only at the rows that predict the answer;
naive = full forward without cache for the gradient and for each candidate.
Both steps start from the same suffix with the same generator seed, so they sample the same candidates (unless the
two gradients order two tokens differently at the top-k boundary: then the naive losses of the fast candidates are
computed, untimed, for the comparison). One untimed warm-up step of each (with min(candidates, batch size)
candidates: the timed shapes at a fraction of the naive cost), then --rounds interleaved rounds; the median step
counts. speedup = naive ÷ fast seconds; max_loss_difference = largest |fast − naive| candidate loss.
"""
from __future__ import annotations

import time

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("gcg", help="GCG step: prefix-cached batched candidates vs a full forward per candidate")
    p.add_argument("--model", default=None, help="default: offline SmolLM2-135M-Instruct")
    p.add_argument("--candidates", type=int, default=128, help="candidate suffixes per step")
    p.add_argument("--suffix-len", type=int, default=20)
    p.add_argument("--top-k", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="candidates per forward on the fast path")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round); the median counts")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses
    import statistics

    import torch

    from ..attacks.gcg import (GCGConfig, allowed_mask, candidate_losses, gcg_step, gcg_targets,
                               initial_suffix)
    from ..data import tofu
    from ..data.format import PromptFormat
    from ..errors import UserError
    from ..models import load_model

    for option, value in (("--candidates", args.candidates), ("--suffix-len", args.suffix_len),
                          ("--top-k", args.top_k), ("--batch-size", args.batch_size), ("--rounds", args.rounds)):
        if value < 1:
            raise UserError(f"{option}: must be >= 1, got {value}")
    config = GCGConfig(suffix_len=args.suffix_len, top_k=args.top_k, candidates=args.candidates,
                       batch_size=args.batch_size, steps=1)
    model, tokenizer = load_model(args.model, dtype="fp32", device=args.device)
    row = tofu.task("mini").forget[0]
    target = gcg_targets(tokenizer, [(row["question"], row["answer"])], PromptFormat())[0]
    allowed = allowed_mask(model, tokenizer)
    suffix = initial_suffix(tokenizer, config, allowed, torch.Generator().manual_seed(0))
    device = allowed.device

    def step(fast: bool, seed: int, cfg=config):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        cands, losses = gcg_step(model, target, suffix, allowed, cfg, torch.Generator().manual_seed(seed),
                                 fast=fast)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, cands, losses

    # Warm-up (allocator, kernels): one full fast batch and as many naive forwards, the timed steps' shapes.
    warm = dataclasses.replace(config, candidates=min(args.candidates, args.batch_size))
    step(True, 0, warm)
    step(False, 0, warm)
    fast_times, naive_times, diffs, same = [], [], [], True
    for r in range(args.rounds):  # interleaved, so drift in machine load hits both alike
        t_fast, cands, fast_losses = step(True, r)
        t_naive, naive_cands, naive_losses = step(False, r)
        fast_times.append(t_fast)
        naive_times.append(t_naive)
        if not torch.equal(cands, naive_cands):
            same = False
            naive_losses = candidate_losses(model, target, cands, fast=False)
        diffs.append(float((fast_losses - naive_losses).abs().max()))
    fast_s, naive_s = statistics.median(fast_times), statistics.median(naive_times)
    emit({"fast_seconds": fast_s, "naive_seconds": naive_s, "speedup": naive_s / fast_s,
          "max_loss_difference": max(diffs), "same_candidates": same, "candidates": args.candidates,
          "suffix_len": args.suffix_len, "top_k": args.top_k, "batch_size": args.batch_size,
          "prompt_tokens": len(target.prompt_ids(suffix.tolist())), "target_tokens": len(target.target),
          "rounds": args.rounds, "threads": torch.get_num_threads(), "device": str(device)}, args.json, bench="gcg")
    return 0
