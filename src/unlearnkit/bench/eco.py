"""`unlearnkit bench eco`: what the ECO guard costs at inference, measured in one run on one model.

- classifier latency per prompt: batched (all prompts in one call) and single (one call per prompt),
- generation time with the guard vs the plain model on the same prompts (half forget-set questions, which get
  flagged and corrupted, half general questions). Every answer is forced to the same length (min_new_tokens), so
  both sides generate exactly the same number of tokens. overhead = guarded ÷ plain (wall clock); overhead_cpu is
  the same ratio in process CPU time.
"""
from __future__ import annotations

import time

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("eco", help="ECO guard overhead: classifier latency, guarded vs plain generation")
    p.add_argument("--model", default=None, help="model (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--eco", default=None, help="ECO artifact (default: fit a classifier on mini TOFU, sigma 1)")
    p.add_argument("--n", type=int, default=16, help="prompts (half forget, half general)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared, busy machine)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each side (interleaved)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _guard(args, model, tokenizer):
    from ..eco.guard import EcoGuard

    if args.eco:
        return EcoGuard.load(args.eco, model, tokenizer)
    from ..eco.classifier import fit_classifier
    from ..eco.corrupt import CorruptionConfig
    from ..eco.entities import extract_entities
    from ..eco.fit import tofu_prompt_sets
    from ..eco.search import embedding_scale

    forget, negatives = tofu_prompt_sets("mini")
    questions = [r["question"] for r in forget]
    clf, _ = fit_classifier(questions, negatives)
    entities = extract_entities(questions + [r["answer"] for r in forget], [t for v in negatives.values() for t in v])
    return EcoGuard(model, tokenizer, clf, CorruptionConfig(sigma=embedding_scale(model)), "entity", entities)


def run(args) -> int:
    from ..data import tofu
    from ..errors import UserError
    from ..models import load_model

    if args.n < 2 or args.batch_size < 1 or args.max_new_tokens < 1 or args.repeats < 1:
        raise UserError("--n must be >= 2; --batch-size, --max-new-tokens and --repeats >= 1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    guard = _guard(args, model, tokenizer)
    task = tofu.task("mini")
    half = args.n // 2
    prompts = [r["question"] for r in task.forget[:half]] + [r["question"] for r in task.world_facts[:args.n - half]]

    guard.flags(prompts[:2])  # load the encoder before timing
    t0 = time.perf_counter()
    flags = guard.flags(prompts)
    batched = (time.perf_counter() - t0) / len(prompts)
    t0 = time.perf_counter()
    for p in prompts:
        guard.flags([p])
    single = (time.perf_counter() - t0) / len(prompts)

    def generate_all(guarded: bool) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        for s in range(0, len(prompts), args.batch_size):
            guard.generate(prompts[s:s + args.batch_size], max_new_tokens=args.max_new_tokens,
                           min_new_tokens=args.max_new_tokens, guard=guarded)
        return time.perf_counter() - t, time.process_time() - c

    generate_all(False)  # warm-up (allocator, kernels)
    plain = guarded = plain_cpu = guarded_cpu = 0.0
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both sides alike
        wall, cpu = generate_all(False)
        plain, plain_cpu = plain + wall, plain_cpu + cpu
        wall, cpu = generate_all(True)
        guarded, guarded_cpu = guarded + wall, guarded_cpu + cpu
    emit({"threads": _threads(), "prompts": len(prompts), "flagged": int(sum(flags)), "max_new_tokens": args.max_new_tokens,
          "classifier_ms_per_prompt": batched * 1000, "classifier_ms_single": single * 1000,
          "plain_seconds": plain / args.repeats, "guarded_seconds": guarded / args.repeats,
          "overhead": guarded / plain,
          # CPU seconds of this process: less sensitive than wall time to other jobs on a shared machine
          "overhead_cpu": guarded_cpu / plain_cpu}, args.json, bench="eco")
    return 0


def _threads() -> int:
    import torch

    return torch.get_num_threads()
