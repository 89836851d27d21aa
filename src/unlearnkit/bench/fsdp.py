"""`unlearnkit bench fsdp`: what sharding buys per rank. In one run: one unsharded process, then 2 FSDP ranks
(gloo on CPU, nccl on GPUs), same model, method and global batch (the single process takes both micro-batches of a
step). Each runs the training step (forward, backward, clipping, AdamW) and reports the bytes its parameters,
gradients and optimizer state occupy after a step — the tensors themselves, this rank's shards under FSDP — and the
median step time. memory_ratio = per-rank bytes under 2-rank FSDP ÷ bytes in one process (goal ≤ 0.6; the plan's
prediction is printed beside it); step_time_ratio = FSDP ÷ single-process seconds per step (same global batch)."""
from __future__ import annotations

from . import add_json_arg, emit

METHODS = ("ga", "graddiff", "npo", "simnpo", "rmu")


def add_command(bsub) -> None:
    p = bsub.add_parser("fsdp", help="2-rank FSDP vs one process: per-rank parameter+gradient+optimizer bytes, "
                        "step time")
    p.add_argument("--model", default=None, help="default: offline SmolLM2-135M-Instruct")
    p.add_argument("--method", default="npo", choices=METHODS)
    p.add_argument("--batch-size", type=int, default=2, help="sequences per rank and micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step); the median counts")
    p.add_argument("--device", default=None, help="cpu, or cuda (needs 2 GPUs for the FSDP ranks)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _state_bytes(model, optimizer) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards of sharded tensors)."""
    import torch

    from ..train.sharding import local

    tensors = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    seen, total = set(), 0
    for t in tensors:
        t = local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:  # tied weights count once
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _measure(model, method, batch_size, steps, device, fsdp, rank=0, world=1, micro=1) -> dict:
    import statistics
    import time

    import torch

    from ..data import tofu
    from ..models import load_model
    from ..train.loop import autocast_context, make_optimizer
    from ..unlearning import build

    torch.manual_seed(0)
    net, tok = load_model(model, dtype="fp32", device=device)
    config = {"batch_size": batch_size, "lr": 1e-5, "fsdp": fsdp, **({"layer": 7} if method == "rmu" else {})}
    run = build(net, tok, method, tofu.load("forget05"), tofu.load("full")[:200], config)
    opt = make_optimizer(run.params, run.train_cfg)
    batches = run.schedule(0)
    dev = torch.device(device or "cpu")
    times, state = [], 0
    run.model.train()
    for i in range(1 + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for k in range(micro):
            raw = batches[(i * micro * world + k * world + rank) % len(batches)]
            batch = {key: ({kk: vv.to(dev) for kk, vv in v.items()} if isinstance(v, dict) else v)
                     for key, v in raw.items()}
            with autocast_context(run.train_cfg, dev):
                loss, _ = run.step_loss(run.model, batch)
            (loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 1:
            times.append(time.perf_counter() - t0)
        state = max(state, _state_bytes(run.model, opt))
    out = {"seconds_per_step": statistics.median(times), "state_bytes": state}
    if dev.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    return out


def _rank(rank, world, port, kw, queue):
    import os

    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    cuda = (kw["device"] or "cpu").startswith("cuda")
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        result = _measure(**{**kw, "device": f"cuda:{rank}" if cuda else "cpu"}, fsdp=True, rank=rank, world=world)
        queue.put(("ok", rank, result))
    except BaseException as e:  # report to the parent instead of hanging it
        queue.put(("error", rank, f"{type(e).__name__}: {e}"))
        raise
    finally:
        torch.distributed.destroy_process_group()


def _fsdp_ranks(world: int, kw: dict) -> list[dict]:
    import multiprocessing as mp
    import socket

    from ..errors import UserError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, kw, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    errors = [f"rank {r}: {v}" for status, r, v in results if status != "ok"]
    if errors:
        raise UserError(f"bench fsdp: {'; '.join(errors)}")
    return [v for _, _, v in sorted(results, key=lambda x: x[1])]


def run(args) -> int:
    import torch

    from ..errors import UserError
    from ..plan import plan, shape_from_config
    from ._steps import in_fresh_process

    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps, --batch-size: must be >= 1")
    if (args.device or "cpu").startswith("cuda") and torch.cuda.device_count() < 2:
        raise UserError(f"--device {args.device}: bench fsdp needs 2 GPUs for its 2 ranks (found "
                        f"{torch.cuda.device_count()}); use --device cpu")
    kw = dict(model=args.model, method=args.method, batch_size=args.batch_size, steps=args.steps,
              device=args.device)
    single = in_fresh_process(_measure, **kw, fsdp=False, micro=2)  # the same global batch as 2 ranks
    ranks = _fsdp_ranks(2, kw)
    sharded_bytes = max(r["state_bytes"] for r in ranks)
    sharded_seconds = max(r["seconds_per_step"] for r in ranks)
    shape = shape_from_config(_config(args.model))
    kw_plan = dict(precision="fp32", rmu_layer=7)
    predicted = (plan(shape, args.method, 2, **kw_plan)["persistent_bytes_per_gpu"]
                 / plan(shape, args.method, 1, **kw_plan)["persistent_bytes_per_gpu"])
    figures = {"method": args.method, "batch_size_per_rank": args.batch_size, "device": args.device or "cpu",
               "single_state_mib": single["state_bytes"] / 2**20,
               **{f"fsdp_state_mib_rank{i}": r["state_bytes"] / 2**20 for i, r in enumerate(ranks)},
               "single_seconds_per_step": single["seconds_per_step"],
               "fsdp_seconds_per_step": sharded_seconds,
               "memory_ratio": sharded_bytes / single["state_bytes"],
               "plan_memory_ratio": predicted,
               "step_time_ratio": sharded_seconds / single["seconds_per_step"]}
    if "cuda_peak_bytes" in single:
        figures["cuda_peak_ratio"] = max(r["cuda_peak_bytes"] for r in ranks) / single["cuda_peak_bytes"]
    emit(figures, args.json, bench="fsdp")
    return 0


def _config(model) -> dict:
    from transformers import AutoConfig

    from ..models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(model)).to_dict()
