"""`unlearnkit bench generate`: generation throughput (docs/evaluation.md, "Generation throughput (issue 14)"), the
ratios measured in one process on the same prompts, after a warm-up of both engines.

1. speedup = HF `generate` (engine="hf", fixed batches of --batch-size) seconds ÷ ours (`greedy_generate`'s default
   engine, the batch from the memory budget or --gen-batch-size) seconds, greedy, on the first --n forget questions
   of --split rendered as `eval tofu --compat open-unlearning` renders them (the chat template with its own default
   system prompt, end-of-turn tokens hidden from attention); same_text: the new token ids are identical.
2. One decode step at --step-batch rows after CONTEXT tokens of left-padded context, ms per step (best of
   --repeats): transformers' sdpa with repeat_kv copies (stock) vs grouped KV heads (gqa_step_speedup), and grouped
   heads with vs without the KV buffer (buffer_step_speedup); step_max_abs_diff = largest |logit difference| of
   either variant from the stock path (the same tokens are fed to all three).
3. The cost per generated token and row at each of --batch-sizes (both parts on), same steps:
   batch_scaling = cost at the smallest batch ÷ cost at the largest.

Steps: CONTEXT_ROWS distinct context rows are prefilled once and tiled to each batch size (a prefill of 128 rows of
200 tokens would take longer than everything else). Each timing runs one untimed step first — where the buffer is
allocated; real decoding copies the history once per 32 steps, about 1 % of a step, which the timed steps leave out —
and then STEPS timed steps.
"""
from __future__ import annotations

import time

from . import add_json_arg, emit

CONTEXT = 200       # tokens of context before the timed decode steps (the longest row; the others are shorter)
CONTEXT_ROWS = 4    # distinct context rows, tiled to every batch size
STAGGER = 12        # their lengths differ by this many tokens, so the batch is left-padded as real decoding is
STEPS = 8           # timed decode steps per repeat, after one untimed (all within the buffer's 32 of room)
WARM_PROMPTS, WARM_TOKENS = 2, 4


def add_command(bsub) -> None:
    p = bsub.add_parser("generate", help="generation throughput: ours vs HF generate, grouped KV heads and the KV "
                        "buffer on/off per decode step, cost per token by batch size (one run)")
    p.add_argument("--model", default=None, help="model folder or hub id (default: the offline SmolLM2)")
    p.add_argument("--split", default="forget01", help="TOFU split whose forget questions are the prompts")
    p.add_argument("--n", type=int, default=32, help="prompts (the first N forget questions, >= 1)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="HF generate's fixed batch (default 32)")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="rows our decoding loop decodes at once (default: as many as fit the 2 GiB budget)")
    p.add_argument("--step-batch", type=int, default=64, help="rows of the timed decode steps (stock/gqa/buffer)")
    p.add_argument("--batch-sizes", default="16,32,64,128", help="comma-separated batch sizes for the cost per "
                   "generated token and row")
    p.add_argument("--repeats", type=int, default=2, help="timings per decode-step figure; the best counts")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def parse_batch_sizes(text: str) -> list[int]:
    """"16,32,64" → [16, 32, 64]: integers >= 1, at least one, each once."""
    from ..errors import UserError

    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--batch-sizes {text!r}: {part!r} is not an integer of at least 1 (e.g. 16,32,64)")
        if int(part) not in sizes:
            sizes.append(int(part))
    return sizes


def run(args) -> int:
    import torch

    from ..data import tofu
    from ..data.format import PromptFormat
    from ..errors import UserError
    from ..eval.conventions import OPEN_UNLEARNING
    from ..eval.generate import generation_batch_size
    from ..eval.limits import at_least, check_generation, model_context
    from ..models import load_model, load_tokenizer

    for option, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens),
                          ("--batch-size", args.batch_size), ("--step-batch", args.step_batch),
                          ("--repeats", args.repeats)):
        at_least(value, 1, option)
    at_least(args.gen_batch_size, 1, "--gen-batch-size", none_ok=True)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    rows = tofu.task(args.split).forget
    if args.n > len(rows):
        raise UserError(f"--n {args.n}: {args.split} has {len(rows)} forget questions")
    tokenizer = load_tokenizer(args.model)
    conv, fmt = OPEN_UNLEARNING, PromptFormat("chat")  # system prompt None: the template's own default
    prompt_ids = [conv.encode_prompt(tokenizer, r["question"], fmt) for r in rows[:args.n]]
    context = model_context(args.model)
    check_generation([len(p) for p in prompt_ids], lambda i: f"forget row {i}", max_new_tokens=args.max_new_tokens,
                     context=context)
    if context and CONTEXT + STEPS + 1 > context:
        raise UserError(f"--model: the decode steps need {CONTEXT + STEPS + 1} tokens of context, the model has "
                        f"{context}")

    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ours_batch = args.gen_batch_size or generation_batch_size(
        model.config, [len(p) for p in prompt_ids], args.max_new_tokens,
        dtype_bytes=next(model.parameters()).element_size())
    gen = dict(hidden_token=conv.hidden_token(tokenizer), decode=lambda ids: conv.decode(tokenizer, ids))

    figures = {"split": args.split, "n": args.n, "max_new_tokens": args.max_new_tokens, "device": str(device),
               "threads": torch.get_num_threads()}
    figures.update(generation_figures(model, tokenizer, prompt_ids, args.max_new_tokens, args.batch_size,
                                      ours_batch, gen, sync))
    ctx = prefill_context(model, tokenizer, prompt_ids)
    figures.update(step_figures(model, ctx, args.step_batch, args.repeats, sync))
    figures.update(batch_figures(model, ctx, batch_sizes, args.repeats, sync))
    emit(figures, args.json, bench="generate")
    return 0


# ---- 1. ours vs HF generate --------------------------------------------------------------------------------------

def generation_figures(model, tokenizer, prompt_ids, max_new_tokens, hf_batch, ours_batch, gen, sync) -> dict:
    from ..eval.generate import greedy_generate

    def timed(engine, batch_size, ids=prompt_ids, tokens=max_new_tokens):
        new_ids = []

        def decode(x):  # called with each row's new ids (cut at EOS), in input order: same_text compares them
            new_ids.append(list(x))
            return gen["decode"](x)

        sync()
        t0 = time.perf_counter()
        greedy_generate(model, tokenizer, ids, max_new_tokens=tokens, batch_size=batch_size, engine=engine,
                        hidden_token=gen["hidden_token"], decode=decode)
        sync()
        return time.perf_counter() - t0, new_ids

    for engine in ("continuous", "hf"):  # warm-up: first-call set-up (allocator, kernels) is paid by neither
        timed(engine, WARM_PROMPTS, prompt_ids[:WARM_PROMPTS], WARM_TOKENS)
    ours_s, ours_ids = timed("continuous", ours_batch)
    hf_s, hf_ids = timed("hf", hf_batch)
    return {"hf_batch_size": hf_batch, "ours_batch_size": ours_batch, "hf_seconds": hf_s, "ours_seconds": ours_s,
            "speedup": hf_s / ours_s, "same_text": ours_ids == hf_ids,
            "generated_tokens": sum(map(len, ours_ids))}


# ---- 2. and 3. decode steps ---------------------------------------------------------------------------------------

def prefill_context(model, tokenizer, prompt_ids) -> dict:
    """CONTEXT_ROWS left-padded rows of CONTEXT, CONTEXT - STAGGER, ... tokens (the prompts one after another),
    prefilled once: cache, attention mask, positions, and the tokens each step feeds (fixed, so that every variant
    computes on the same input)."""
    import inspect

    import torch

    stream = [t for p in prompt_ids for t in p]
    stream = stream * (CONTEXT // max(len(stream), 1) + 1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, attn = [], []
    for r in range(CONTEXT_ROWS):
        n = max(1, CONTEXT - r * STAGGER)
        ids.append([pad] * (CONTEXT - n) + stream[r:r + n])
        attn.append([0] * (CONTEXT - n) + [1] * n)
    device = next(model.parameters()).device
    ids, attn = torch.tensor(ids, device=device), torch.tensor(attn, device=device)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True, **keep)
    feed = torch.cat([out.logits[:, -1].argmax(-1, keepdim=True), ids[:, -STEPS:]], 1)  # step s feeds feed[:, s]
    return {"cache": out.past_key_values, "attn": attn, "positions": positions[:, -1:], "feed": feed}


def decode_steps(model, ctx, batch: int, *, grouped: bool, buffer: bool, sync, keep_logits: bool = False):
    """One untimed and STEPS timed decode steps at `batch` rows from the prefilled context. Returns (ms per timed
    step, each timed step's last-position logits when keep_logits, else [])."""
    import copy

    import torch

    from ..eval.generate import add_kv_buffer, grouped_kv_attention

    rows = torch.arange(batch, device=ctx["attn"].device) % CONTEXT_ROWS
    cache = copy.deepcopy(ctx["cache"])  # the prefilled cache stays as it is for the next timing
    cache.batch_select_indices(rows)     # tiled to the batch
    attn, positions, feed = ctx["attn"][rows], ctx["positions"][rows], ctx["feed"][rows]
    if buffer:
        add_kv_buffer(cache)
    logits, t0 = [], None
    with torch.no_grad(), grouped_kv_attention(model, enabled=grouped):
        for s in range(STEPS + 1):
            if s == 1:
                sync()
                t0 = time.perf_counter()
            attn = torch.cat([attn, attn.new_ones(batch, 1)], 1)
            positions = positions + 1
            out = model(input_ids=feed[:, s:s + 1], attention_mask=attn, position_ids=positions,
                        past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            if s >= 1 and keep_logits:
                logits.append(out.logits[:, -1])
        sync()
    return (time.perf_counter() - t0) * 1000 / STEPS, logits


def step_figures(model, ctx, batch, repeats, sync) -> dict:
    """Stock vs grouped heads vs grouped heads + buffer, interleaved per repeat (machine drift hits all alike)."""
    variants = {"stock": (False, False), "gqa": (True, False), "gqa_buffer": (True, True)}
    best = {name: float("inf") for name in variants}
    reference, diff = None, 0.0
    for _ in range(repeats):
        for name, (grouped, buffer) in variants.items():
            ms, logits = decode_steps(model, ctx, batch, grouped=grouped, buffer=buffer, sync=sync,
                                      keep_logits=True)
            best[name] = min(best[name], ms)
            if reference is None:
                reference = logits  # the stock path's, first repeat
            diff = max([diff] + [float((a - b).abs().max()) for a, b in zip(logits, reference)])
    return {"context_tokens": CONTEXT, "step_batch": batch, "steps": STEPS, "repeats": repeats,
            "step_ms_stock": best["stock"], "step_ms_gqa": best["gqa"], "step_ms_gqa_buffer": best["gqa_buffer"],
            "gqa_step_speedup": best["stock"] / best["gqa"],
            "buffer_step_speedup": best["gqa"] / best["gqa_buffer"],
            "step_speedup": best["stock"] / best["gqa_buffer"], "step_max_abs_diff": diff}


def batch_figures(model, ctx, batch_sizes, repeats, sync) -> dict:
    """ms per generated token and row (a decode step ÷ its rows, both parts on) at each batch size."""
    cost = {}
    for b in batch_sizes:
        best = min(decode_steps(model, ctx, b, grouped=True, buffer=True, sync=sync)[0] for _ in range(repeats))
        cost[str(b)] = best / b
    small, large = cost[str(min(batch_sizes))], cost[str(max(batch_sizes))]
    return {"batch_sizes": batch_sizes, "ms_per_token_row": cost, "batch_scaling": small / large}
