"""`unlearnkit bench npo`: with the reference log-likelihoods cached once, an NPO step costs what a SimNPO step
costs. Same model, data and batches; the three variants' steps are interleaved round-robin in one process so drift
hits them alike, and the median step of each is compared. npo_over_simnpo = NPO ÷ SimNPO seconds per step;
speedup = naive NPO (reference model held and run every step) ÷ our NPO."""
from __future__ import annotations

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("npo", help="NPO (cached reference) vs SimNPO vs naive NPO: step time")
    p.add_argument("--model", default=None, help="default: offline SmolLM2-135M-Instruct")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (after one warm-up round); the median counts")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import statistics

    import torch

    from ..data import tofu
    from ..models import load_model
    from ..unlearning import build
    from ._steps import time_steps

    forget, retain = tofu.load("forget01"), tofu.load("full")[:40]
    config = {"batch_size": args.batch_size, "lr": 1e-5}
    runs = {}
    for name, method, kw in (("npo", "npo", {}), ("simnpo", "simnpo", {}), ("naive_npo", "npo", {"naive": True})):
        torch.manual_seed(0)
        model, tok = load_model(args.model, dtype="fp32", device=args.device)
        runs[name] = build(model, tok, method, forget, retain, config, setup_kwargs=kw)
    times = {name: [] for name in runs}
    for r in runs.values():
        time_steps(r, steps=1, warmup=0)  # warm-up (first AdamW step allocates its state)
    for _ in range(args.steps):
        for name, r in runs.items():
            times[name].append(time_steps(r, steps=1, warmup=0))
    per = {k: statistics.median(v) for k, v in times.items()}  # robust to a busy machine
    emit({"npo_seconds_per_step": per["npo"], "simnpo_seconds_per_step": per["simnpo"],
          "naive_npo_seconds_per_step": per["naive_npo"], "npo_over_simnpo": per["npo"] / per["simnpo"],
          "speedup": per["naive_npo"] / per["npo"]}, args.json, bench="npo")
    return 0
