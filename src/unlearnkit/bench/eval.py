"""`unlearnkit bench eval`: our TOFU evaluation (one pooled length-sorted forward per sequence, head at labelled
positions, pooled generation) vs a straightforward per-metric implementation (eval/reference.py: one full-logits
forward per metric, batches in data order, generation per set), same model, split and settings, one run.
speedup = reference time ÷ ours. Both produce the same per-sample numbers; the max difference is reported."""
from __future__ import annotations

import time

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("eval", help="our TOFU evaluation vs per-metric forwards (time)")
    p.add_argument("--model", default=None)
    p.add_argument("--split", default="mini")
    p.add_argument("--n", type=int, default=20, help="rows per evaluation set (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-generate", action="store_true", help="teacher-forced metrics only")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..data import tofu
    from ..eval import evaluate_tofu
    from ..eval.reference import evaluate_tofu_reference
    from ..eval.tofu import limit_task
    from ..models import load_model

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
    n_seq = sum(len(r) * (1 + (s in ("forget", "retain")) + len(r[0].get("perturbed_answer", [])))
                for s, r in task.eval_sets().items()) + len(task.holdout)
    emit({"split": args.split, "rows_per_set": args.n, "sequences": n_seq, "generate": not args.no_generate,
          "device": str(next(model.parameters()).device), "ours_seconds": t_ours, "reference_seconds": t_ref,
          "max_abs_diff_gt_loss": diff, "same_generations": same_text, "speedup": t_ref / t_ours}, args.json)
    return 0
