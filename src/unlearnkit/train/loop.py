"""The one training loop: fine-tuning and every unlearning method run through `train`.

A caller gives
- `batches_for_epoch(epoch)`: the list of micro-batches of that epoch (deterministic for a seed; any object the
  loss understands, e.g. a dict of tensors or a (forget, retain) pair),
- `step_loss(model, micro_batch)`: (loss tensor, {name: float} for the log).
The loop owns AdamW, warm-up + decay, clipping, accumulation, autocast, checkpoint/resume, NaN guard, the
progress bar and the JSON log.

Multi-process (torchrun / accelerate launch, any backend): rank r takes micro-batches r, r+W, ...; after the last
micro-batch of a step the gradients of the trained parameters are averaged across ranks with one all-reduce. We do
not wrap the model in DDP: losses may call parts of the model directly (the backbone without the LM head, RMU's
layer slices), which would bypass DDP's forward and silently skip its gradient sync.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import UserError


@dataclass
class TrainConfig:
    lr: float = 2e-4
    epochs: float = 5.0
    max_steps: int | None = None      # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    schedule: str = "linear"          # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    checkpoint_every: int = 0         # optimizer steps; 0 = only at the end of training (for resume)
    mixed_precision: str = "auto"     # auto (bf16 autocast on CUDA) | bf16 | no
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("lr", "batch_size", "grad_accum"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')}: must be > 0 (got {getattr(self, name)})")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise UserError(f"--schedule: unknown value {self.schedule!r}; choose linear, cosine or constant")
        if self.max_steps is None and not self.epochs > 0:
            raise UserError(f"--epochs: must be > 0 (got {self.epochs})")


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(round(cfg.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases are not decayed
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas,
                             eps=cfg.adam_eps)


def _autocast(cfg: TrainConfig, device: torch.device):
    use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _count_tokens(obj) -> int:
    if isinstance(obj, dict) and "attention_mask" in obj:
        return int(obj["attention_mask"].sum())
    if isinstance(obj, dict):  # e.g. {"forget": batch, "retain": batch}
        return sum(_count_tokens(o) for o in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tokens(o) for o in obj)
    return 0


def train(model, step_loss, batches_for_epoch, cfg: TrainConfig, out_dir: str | os.PathLike | None = None,
          params: list[torch.nn.Parameter] | None = None, resume: bool = True, progress: bool = True,
          desc: str = "train", stop_after_steps: int | None = None, on_step: Callable | None = None) -> dict:
    """Run the loop; returns the log {"config", "steps": [...], "seconds", ...}.

    `params`: the parameters to train (default: all with requires_grad). `out_dir/checkpoint/` holds the resume
    state; with resume=True an existing checkpoint is continued and the result equals an uninterrupted run.
    `stop_after_steps` simulates a kill (tests).
    """
    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    rank, world = _dist()
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("training: no trainable parameters")
    per_epoch = len(batches_for_epoch(0))
    if per_epoch == 0:
        raise UserError("training: no batches (empty data set)")
    micro_per_step = cfg.grad_accum * world
    total_steps = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs / micro_per_step))
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    ckpt_dir = Path(out_dir) / "checkpoint" if out_dir else None
    log = {"config": _jsonable(asdict(cfg)), "total_steps": total_steps, "world_size": world, "steps": []}
    step = 0
    if resume and ckpt_dir and (ckpt_dir / "state.pt").is_file():
        step, log = _load_checkpoint(ckpt_dir, model, params, optimizer, scheduler)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
    epoch_cache: dict[int, list] = {}

    def micro_batch(m: int):
        epoch, pos = divmod(m, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = batches_for_epoch(epoch)
        return epoch_cache[epoch][pos]

    model.train()
    start = time.perf_counter()
    while step < total_steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total_loss, tokens, metrics = 0.0, 0, {}
        for k in range(cfg.grad_accum):
            m = step * micro_per_step + k * world + rank
            batch = _to_device(micro_batch(m), device)
            tokens += _count_tokens(batch)
            with _autocast(cfg, device):
                loss, parts = step_loss(model, batch)
            if not torch.isfinite(loss):
                # Weights are untouched since the last optimizer step: save them as the last good checkpoint.
                where = ""
                if ckpt_dir:
                    if rank == 0:
                        _save_checkpoint(ckpt_dir, step, model, params, optimizer, scheduler, log)
                    where = f"; the weights after step {step} are kept in {ckpt_dir}"
                raise NonFiniteLoss(f"{desc}: loss is {loss.item()} at step {step + 1} (try a lower learning "
                                    f"rate); stopped{where}")
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
            for name, value in parts.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / cfg.grad_accum
        if world > 1:
            total_loss = _average_grads(params, world, device, total_loss)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        step += 1
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens * world,
                 "seconds": dt, **metrics}
        if grad_norm is not None:
            entry["grad_norm"] = grad_norm
        log["steps"].append(entry)
        bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{tokens * world / dt:.0f}")
        bar.update(1)
        if on_step:
            on_step(step, entry)
        if ckpt_dir and rank == 0 and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_dir, step, model, params, optimizer, scheduler, log)
        if stop_after_steps is not None and step >= stop_after_steps and step < total_steps:
            bar.close()
            if ckpt_dir and rank == 0:
                _save_checkpoint(ckpt_dir, step, model, params, optimizer, scheduler, log)
            log["interrupted_at"] = step
            return log
    bar.close()
    model.eval()
    log["seconds"] = log.get("seconds", 0.0) + time.perf_counter() - start
    total_tokens = sum(s["tokens"] for s in log["steps"])
    total_time = sum(s["seconds"] for s in log["steps"])
    log["tokens_per_second"] = total_tokens / total_time if total_time else None
    if ckpt_dir and ckpt_dir.exists() and rank == 0:
        import shutil

        shutil.rmtree(ckpt_dir)  # finished: the saved model is the result
    return log


def _average_grads(params, world: int, device, loss_value: float) -> float:
    """Mean of each trained parameter's gradient over ranks (= the gradient of the global batch), in one
    all-reduce; the logged loss is averaged too. A parameter a rank did not reach counts as zero gradient."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss_value], device=device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return float(flat[-1])


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _param_names(model, params):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _save_checkpoint(ckpt_dir: Path, step, model, params, optimizer, scheduler, log):
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    names = dict(model.named_parameters())
    trainable = {n: names[n].detach().cpu().clone() for n in _param_names(model, params)}
    state = {"step": step, "params": trainable, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "log": log,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    tmp = ckpt_dir / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / "state.pt")  # a kill mid-write leaves the previous checkpoint intact


def _load_checkpoint(ckpt_dir: Path, model, params, optimizer, scheduler):
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=False)
    names = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in state["params"].items():
            names[n].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["log"]
