"""`unlearnkit bench eval`: our TOFU evaluation (one pooled length-sorted forward per sequence, head at labelled
positions, pooled generation) vs a straightforward per-metric implementation (eval/reference.py: one full-logits
forward per metric, batches in data order, generation per set), same model, split and settings, one run.
speedup = reference time ÷ ours. Both produce the same per-sample numbers; the max difference is reported.

Two of our fast paths are also timed against themselves switched off, on the same sequences and prompts:
shared_prompt_speedup = teacher-forced statistics with one row per example ÷ with shared-prompt rows;
continuous_speedup = greedy decoding on fixed batches (finished rows dropped) ÷ continuous batching."""
from __future__ import annotations

import time

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("eval", help="our TOFU evaluation vs per-metric forwards (time)")
    p.add_argument("--model", default=None)
    p.add_argument("--split", default="mini")
    p.add_argument("--n", type=int, default=20, help="rows per evaluation set (>= 0; 0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-generate", action="store_true", help="teacher-forced metrics only")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..cli_common import check_model_args
    from ..data import tofu
    from ..eval import evaluate_tofu
    from ..eval.reference import evaluate_tofu_reference
    from ..data.format import encode_prompt, encode_qa
    from ..eval.generate import greedy_generate
    from ..eval.limits import at_least
    from ..eval.logprobs import sequence_stats
    from ..eval.tofu import eval_sequences, limit_task
    from ..files import check_out_file
    from ..models import load_model

    at_least(args.n, 0, "--n")
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    check_model_args(args, "model")
    if args.json:
        check_out_file(args.json, option="--json", key="speedup")
    task = limit_task(tofu.task(args.split), args.n)
    model, tokenizer = load_model(args.model, device=args.device)
    kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, generate=not args.no_generate)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    ours, t_ours = timed(lambda: evaluate_tofu(model, tokenizer, task, progress=False, **kw))
    ref, t_ref = timed(lambda: evaluate_tofu_reference(model, tokenizer, task, **kw))
    diff = max(float(np.max(np.abs(np.subtract(ours["sets"][s]["avg_gt_loss"], ref[s]["avg_gt_loss"]))))
               for s in ref)
    same_text = all(ours["sets"][s].get("generated_text") == ref[s].get("generated_text") for s in ref)
    sets = dict(task.eval_sets(), holdout=task.holdout)
    examples = [encode_qa(tokenizer, q, a) for _, _, _, q, a in eval_sequences(sets)]
    tf = {share: timed(lambda: sequence_stats(model, examples, batch_size=args.batch_size,
                                              pad_id=tokenizer.pad_token_id, share_prompts=share))
          for share in (True, False)}
    shared_diff = max(float(np.max(np.abs(a.logp - b.logp))) for a, b in zip(tf[True][0], tf[False][0]))
    figures = {"split": args.split, "rows_per_set": args.n, "sequences": len(examples),
               "generate": not args.no_generate, "device": str(next(model.parameters()).device),
               "ours_seconds": t_ours, "reference_seconds": t_ref, "max_abs_diff_gt_loss": diff,
               "same_generations": same_text, "speedup": t_ref / t_ours,
               "shared_prompt_seconds": tf[True][1], "one_row_per_example_seconds": tf[False][1],
               "shared_prompt_max_abs_diff_logp": shared_diff, "shared_prompt_speedup": tf[False][1] / tf[True][1]}
    if not args.no_generate:
        prompts = [encode_prompt(tokenizer, r["question"]) for rows in task.eval_sets().values() for r in rows]
        gen = {engine: timed(lambda: greedy_generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                                     batch_size=args.batch_size, engine=engine))
               for engine in ("continuous", "pruned")}
        figures.update({"continuous_seconds": gen["continuous"][1], "fixed_batch_seconds": gen["pruned"][1],
                        "continuous_same_text": gen["continuous"][0] == gen["pruned"][0],
                        "continuous_speedup": gen["pruned"][1] / gen["continuous"][1]})
    emit(figures, args.json, bench="eval")
    return 0
