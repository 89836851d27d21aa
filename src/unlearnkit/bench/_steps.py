"""Shared by the method benches: time optimizer steps of a built unlearning run, and measure its peak memory in a
fresh process.

Peak memory: on CUDA, torch.cuda.max_memory_allocated after reset (weights included). On CPU, the peak resident
set size (VmHWM) of a fresh process from just after the model is loaded (the peak is reset there through
/proc/self/clear_refs, so the load's transient copies do not count) to the end of the timed steps, minus the
resident size after imports: model weights + frozen copies + activations + gradients + optimizer state. The child
runs with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS and the resident size tracks live memory.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def time_steps(run, steps: int, warmup: int = 1, all_grads: bool = False) -> float:
    """Mean seconds per optimizer step (forward + backward + AdamW) after `warmup` steps."""
    import torch

    if not hasattr(run, "bench_state"):  # optimizer and position survive repeated calls (interleaved benches)
        run.bench_state = {"opt": torch.optim.AdamW(run.params, lr=run.cfg["lr"], eps=run.cfg["adam_eps"],
                                                    weight_decay=run.cfg["weight_decay"]),
                           "batches": run.schedule(0), "i": 0}
    state = run.bench_state
    opt, batches = state["opt"], state["batches"]
    device = next(run.model.parameters()).device
    run.model.train()
    times = []
    for i in range(warmup + steps):
        raw = batches[state["i"] % len(batches)]
        state["i"] += 1
        batch = {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v)
                 for k, v in raw.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run.model.zero_grad(set_to_none=True)
        loss, _ = run.step_loss(run.model, batch)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def _child(queue, fn, kwargs):
    try:
        queue.put(("ok", fn(**kwargs)))
    except BaseException as e:  # report to the parent instead of hanging it
        queue.put(("error", f"{type(e).__name__}: {e}"))


def in_fresh_process(fn, **kwargs) -> dict:
    """Run fn(**kwargs) → dict in a fresh (spawned) process, so its peak memory is its own."""
    from ..errors import UserError

    old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(queue, fn, kwargs))
        proc.start()
        status, value = queue.get()
        proc.join()
    finally:
        if old is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = old
    if status != "ok":
        raise UserError(f"bench child process failed: {value}")
    return value


def peak_since_reset(device, base_kib: int) -> int:
    """Bytes: CUDA max allocated, or CPU peak resident size since reset_peak() minus `base_kib` (after imports)."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return (rss_kib("VmHWM") - base_kib) * 1024


def start_measuring(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak()
