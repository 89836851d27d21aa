"""`unlearnkit bench rmu`: our RMU step (forward stops at layer l, shared no-grad prefix, frozen copies of the
trained layers only, only trained parameters require grad) vs the naive one (full forwards with all hidden states
and the LM head, a full frozen model copy, every parameter requiring grad — as the reference code runs), same
model, data and layer, each in a fresh process of this one run. speedup = naive ÷ ours seconds per step;
memory_ratio = ours ÷ naive peak memory (see bench/_steps.py for how memory is measured)."""
from __future__ import annotations

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("rmu", help="RMU fast path vs naive: step time and peak memory")
    p.add_argument("--model", default=None, help="default: offline SmolLM2-135M-Instruct")
    p.add_argument("--layer", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (raw-text chunks)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def corpus(seq_len: int):
    """Raw-text forget/retain sets from TOFU answers: one document per author, cut into seq_len-token chunks."""
    from ..data import tofu

    full = tofu.load("full")
    doc = lambda a: {"text": " ".join(r["answer"] for r in full[20 * a:20 * a + 20])}
    return [doc(a) for a in range(190, 200)], [doc(a) for a in range(0, 10)]


def _child(model, variant, layer, batch_size, seq_len, steps, device):
    import torch

    from ..models import load_model
    from ..unlearning import build
    from ._steps import peak_since_reset, rss_kib, start_measuring, time_steps

    torch.manual_seed(0)
    base = rss_kib("VmRSS")
    net, tok = load_model(model, dtype="fp32", device=device)
    start_measuring(next(net.parameters()).device)
    forget, retain = corpus(seq_len)
    config = {"layer": layer, "batch_size": batch_size, "max_length": seq_len}
    run = build(net, tok, "rmu", forget, retain, config, setup_kwargs={"naive": variant == "naive"})
    if variant == "naive":
        net.requires_grad_(True)  # the reference code never turns gradients off; AdamW gets the trained ones
    seconds = time_steps(run, steps)
    return {"seconds_per_step": seconds, "peak_bytes": peak_since_reset(next(net.parameters()).device, base),
            "tokens_per_step": sum(int(b["forget"]["attention_mask"].sum() + b["retain"]["attention_mask"].sum())
                                   for b in run.schedule(0)[1:1 + steps]) / steps}


def run(args) -> int:
    from ._steps import in_fresh_process

    kw = dict(model=args.model, layer=args.layer, batch_size=args.batch_size, seq_len=args.seq_len,
              steps=args.steps, device=args.device)
    ours = in_fresh_process(_child, variant="ours", **kw)
    naive = in_fresh_process(_child, variant="naive", **kw)
    emit({"layer": args.layer, "batch_size": args.batch_size, "seq_len": args.seq_len,
          "ours_seconds_per_step": ours["seconds_per_step"], "naive_seconds_per_step": naive["seconds_per_step"],
          "ours_peak_mib": ours["peak_bytes"] / 2**20, "naive_peak_mib": naive["peak_bytes"] / 2**20,
          "speedup": naive["seconds_per_step"] / ours["seconds_per_step"],
          "memory_ratio": ours["peak_bytes"] / naive["peak_bytes"]}, args.json, bench="rmu")
    return 0
