"""The one training loop: fine-tuning and every unlearning method run through `train`.

A caller gives
- `batches_for_epoch(epoch)`: the list of micro-batches of that epoch (deterministic for a seed; any object the
  loss understands, e.g. a dict of tensors or a (forget, retain) pair),
- `step_loss(model, micro_batch)`: (loss tensor, {name: float} for the log).
The loop owns AdamW, warm-up + decay, clipping, accumulation, autocast, checkpoint/resume, NaN guard, the
progress bar and the JSON log.

Multi-process (torchrun / accelerate launch, any backend): rank r takes micro-batches r, r+W, ...; W processes
with grad_accum A compute the update of one process with grad_accum W·A (the resume fingerprint records W·A, so a
run may resume on another number of processes). Two ways to share the work:
- replicated (default): every rank holds the whole model; after the last micro-batch of a step the gradients of the
  trained parameters are averaged across ranks with one all-reduce. Not DDP: losses call parts of the model directly
  (the backbone without the LM head, RMU's layer slices), which would bypass DDP's forward and silently skip its
  gradient sync (docs/methods.md).
- sharded (FSDP2, train/sharding.py; the caller shards the model before setting the method up): parameters,
  gradients and optimizer state are split across ranks; FSDP reduce-scatters gradients in backward, the loop only
  averages the logged loss. Checkpoints are then written with torch.distributed.checkpoint, every rank its shards.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
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
    fsdp: bool = False                # shard the model with FSDP2 under torchrun (train/sharding.py)
    activation_checkpointing: bool = False  # recompute each decoder layer's activations in backward
    offload: bool = False             # with fsdp: parameters, gradients and AdamW state in CPU memory
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        """Every option's range, checked before any work: a wrong value is a one-line error, never a silent
        change of meaning (a negative clipping norm would turn ascent into descent)."""
        def number(name, ok, what, optional=False, integer=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            bad_type = isinstance(v, bool) or not isinstance(v, int if integer else (int, float))
            if bad_type or not math.isfinite(v) or not ok(v):
                raise UserError(f"--{name.replace('_', '-')}: must be {what} (got {v!r})")

        number("lr", lambda v: v > 0, "a number > 0")
        number("epochs", lambda v: v > 0, "a number > 0")
        number("max_steps", lambda v: v >= 1, "an integer >= 1", optional=True, integer=True)
        number("batch_size", lambda v: v >= 1, "an integer >= 1", integer=True)
        number("grad_accum", lambda v: v >= 1, "an integer >= 1", integer=True)
        number("warmup_ratio", lambda v: 0 <= v < 1, "in [0, 1)")
        number("weight_decay", lambda v: v >= 0, "a number >= 0")
        number("adam_eps", lambda v: v > 0, "a number > 0")
        number("max_grad_norm", lambda v: v > 0, "a number > 0 (or unset: no clipping)", optional=True)
        number("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2^32)", integer=True)
        number("checkpoint_every", lambda v: v >= 0, "an integer >= 0 (0: only when interrupted)", integer=True)
        betas = self.adam_betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise UserError(f"config adam_betas: must be two numbers in [0, 1) (got {betas!r})")
        self.adam_betas = tuple(float(b) for b in betas)
        if self.schedule not in ("linear", "cosine", "constant"):
            raise UserError(f"--schedule: unknown value {self.schedule!r}; choose linear, cosine or constant")
        for name in ("fsdp", "activation_checkpointing", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"config {name}: expected true or false (got {getattr(self, name)!r})")
        if self.offload and not self.fsdp:
            raise UserError("--offload: needs --fsdp (it offloads FSDP's shards)")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise UserError(f"config mixed_precision: unknown value {self.mixed_precision!r}; choose auto, bf16 or no")


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


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and torch.device(device).type == "cuda")


def autocast_context(cfg: TrainConfig, device: torch.device):
    """The autocast state every step runs in (bf16 on CUDA by default); methods use it for anything they
    precompute so that it matches the step exactly."""
    if uses_bf16(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
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


def default_fingerprint(cfg: TrainConfig, world: int) -> dict:
    """What makes a run this run, for the resume check: every setting that changes the result."""
    values = _jsonable(asdict(cfg))
    # Not part of the result: when checkpoints are written, how the work is spread over devices and memory.
    for key in ("checkpoint_every", "extra", "fsdp", "activation_checkpointing", "offload", "grad_accum"):
        values.pop(key)
    return {**values, "micro_batches_per_step": cfg.grad_accum * world}


def train(model, step_loss, batches_for_epoch, cfg: TrainConfig, out_dir: str | os.PathLike | None = None,
          params: list[torch.nn.Parameter] | None = None, resume: bool = True, progress: bool = True,
          desc: str = "train", stop_after_steps: int | None = None, on_step: Callable | None = None,
          fingerprint: dict | None = None, remove_checkpoint: bool = True, extra_state=None,
          on_start: Callable | None = None) -> dict:
    """Run the loop; returns the log {"config", "steps": [...], "seconds", ...}.

    `params`: the parameters to train (default: all with requires_grad). `out_dir/checkpoint/` holds the resume
    state. With resume=True a checkpoint of the same run is continued and the result equals an uninterrupted run;
    a checkpoint of another run (its fingerprint — the training settings plus the caller's `fingerprint`, e.g.
    method, data and model hashes — differs) is an error naming the differing keys; resume=False discards it.
    Checkpoints hold only finite weights and optimizer state; a step that makes them non-finite stops training.
    `remove_checkpoint`: delete the checkpoint at the end (callers that save the result first pass False).
    `stop_after_steps` simulates a kill (tests). `extra_state`: an object with state_dict() / load_state_dict()
    saved in and restored from the checkpoint (e.g. train/monitor.py's best step). `on_start(total_steps)` runs
    once the checkpoint (if any) is loaded, before the first step.
    """
    from .sharding import compute_device, is_sharded, reshard

    seed_everything(cfg.seed)
    device = compute_device(model)
    sharded = is_sharded(model)
    if sharded:
        reshard(model)  # a forward in the method's setup left the root gathered
    rank, world = dist_info()
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
    run_identity = {**default_fingerprint(cfg, world), **_jsonable(fingerprint or {}),
                    "trained_parameters": sorted(_param_names(model, params))}  # FSDP reorders them
    log = {"config": _jsonable(asdict(cfg)), "total_steps": total_steps, "world_size": world, "steps": []}
    step = 0
    if ckpt_dir and (ckpt_dir / STATE_FILE).is_file():
        if resume:
            step, log = _load_checkpoint(ckpt_dir, model, params, optimizer, scheduler, run_identity, extra_state,
                                         sharded, device)
            if log.get("world_size") != world:
                log.setdefault("resumed_from_world_size", log.get("world_size"))
                log["world_size"] = world
        elif rank == 0:
            shutil.rmtree(ckpt_dir)  # asked to start over: the old checkpoint is discarded deliberately

    if on_start:
        on_start(total_steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, desc=desc, disable=not progress or rank != 0, dynamic_ncols=True)
    epoch_cache: dict[int, list] = {}

    def micro_batch(m: int):
        epoch, pos = divmod(m, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = batches_for_epoch(epoch)
        return epoch_cache[epoch][pos]

    def stop(what: str):
        bar.close()
        kept = ""
        if ckpt_dir and (ckpt_dir / STATE_FILE).is_file():
            kept = f"; the last finite checkpoint (step {_checkpoint_step(ckpt_dir)}) is kept in {ckpt_dir}"
        raise NonFiniteLoss(f"{desc}: {what} at step {step + 1}; stopped, nothing saved{kept}. Try a lower learning "
                            "rate (and --restart to discard the checkpoint)")

    model.train()
    start = time.perf_counter()
    while step < total_steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total_loss, tokens, metrics, bad_loss = 0.0, 0, {}, None
        for k in range(cfg.grad_accum):
            m = step * micro_per_step + k * world + rank
            batch = _to_device(micro_batch(m), device)
            tokens += _count_tokens(batch)
            with autocast_context(cfg, device):
                loss, parts = step_loss(model, batch)
            if not torch.isfinite(loss):
                if world == 1:
                    stop(f"loss is {loss.item()}")
                bad_loss = loss.item()  # the other ranks are in the same collective: stop together after it
            (loss / cfg.grad_accum).backward()
            total_loss += loss.item() / cfg.grad_accum
            for name, value in parts.items():
                metrics[name] = metrics.get(name, 0.0) + float(value) / cfg.grad_accum
        if world > 1:
            flags = [total_loss, 0.0 if bad_loss is None else 1.0]
            total_loss, any_bad = (_mean_over_ranks(flags, device) if sharded
                                   else _average_grads(params, world, device, flags))
            if any_bad:
                stop(f"loss is {bad_loss if bad_loss is not None else 'non-finite on another rank'}")
        # The total norm is computed either way: a non-finite gradient stops training before it reaches the weights.
        if cfg.max_grad_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = float(_full(grad_norm))  # under FSDP: the norm over all ranks' shards
        if not math.isfinite(grad_norm):
            stop(f"gradient norm is {grad_norm}")
        optimizer.step()
        scheduler.step()
        if not _finite_everywhere(params, sharded, device):
            stop("the weights became non-finite")
        step += 1
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": total_loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens * world,
                 "seconds": dt, **metrics, "grad_norm": grad_norm}
        log["steps"].append(entry)
        bar.set_postfix(loss=f"{total_loss:.4f}", tok_s=f"{tokens * world / dt:.0f}")
        bar.update(1)
        if on_step:
            on_step(step, entry)
        writes = ckpt_dir and (rank == 0 or sharded)  # sharded: every rank writes its shards
        if writes and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt_dir, step, model, params, optimizer, scheduler, log, run_identity, extra_state,
                             sharded, device)
        if stop_after_steps is not None and step >= stop_after_steps and step < total_steps:
            bar.close()
            if writes:
                _save_checkpoint(ckpt_dir, step, model, params, optimizer, scheduler, log, run_identity, extra_state,
                                 sharded, device)
            log["interrupted_at"] = step
            return log
    bar.close()
    model.eval()
    log["seconds"] = log.get("seconds", 0.0) + time.perf_counter() - start
    total_tokens = sum(s["tokens"] for s in log["steps"])
    total_time = sum(s["seconds"] for s in log["steps"])
    log["tokens_per_second"] = total_tokens / total_time if total_time else None
    if remove_checkpoint and ckpt_dir and ckpt_dir.exists() and rank == 0:
        shutil.rmtree(ckpt_dir)  # finished: the saved model is the result
    return log


def all_finite(tensors) -> bool:
    """True when every tensor holds only finite values (one device sync for the lot)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _finite_everywhere(tensors, sharded: bool, device) -> bool:
    """all_finite on every rank's shards (sharded: one all-reduce, so that every rank decides alike)."""
    if not sharded:
        return all_finite(tensors)
    from .sharding import all_ranks, local

    return all_ranks(all_finite([local(t) for t in tensors]), device)


def _mean_over_ranks(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def _average_grads(params, world: int, device, values: list[float]) -> list[float]:
    """Mean of each trained parameter's gradient over ranks (= the gradient of the global batch), in one
    all-reduce; `values` (the logged loss, flags) are averaged too. A parameter a rank did not reach counts as zero
    gradient."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor(values, device=device)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset:].tolist()


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def _param_names(model, params):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


STATE_FILE = "state.pt"
FINGERPRINT_FILE = "fingerprint.json"  # the same fingerprint, readable without torch


def _optimizer_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


SHARDS_PREFIX = "shards-"  # torch.distributed.checkpoint folders of sharded runs: shards-STEP/


def _save_checkpoint(ckpt_dir: Path, step, model, params, optimizer, scheduler, log, fingerprint,
                     extra_state=None, sharded: bool = False, device=None) -> bool:
    """Write the resume state atomically; never a non-finite one (the previous checkpoint is kept instead).

    Replicated runs: rank 0 writes state.pt (trained parameters, optimizer, scheduler, log, RNG). Sharded runs: every
    rank writes its shards of the trained parameters and AdamW state to shards-STEP/ (torch.distributed.checkpoint,
    which can be loaded on any number of processes), then rank 0 writes state.pt without them, naming that folder:
    state.pt is the commit point, so a kill mid-write leaves the previous checkpoint in force."""
    if not _finite_everywhere(list(params) + _optimizer_tensors(optimizer), sharded, device):
        return False
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rank = dist_info()[0]
    shards = None
    if sharded:
        import torch.distributed.checkpoint as dcp

        shards = f"{SHARDS_PREFIX}{step}"
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(ckpt_dir / shards))
        if rank != 0:
            return True
        trainable = None
    else:
        names = dict(model.named_parameters())
        trainable = {n: names[n].detach().cpu().clone() for n in _param_names(model, params)}
    state = {"step": step, "params": trainable, "shards": shards,
             "optimizer": None if sharded else optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "log": log, "fingerprint": fingerprint,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
             "extra": extra_state.state_dict() if extra_state is not None else None}
    tmp = ckpt_dir / f"{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / STATE_FILE)  # a kill mid-write leaves the previous checkpoint intact
    from ..files import write_json_atomic

    write_json_atomic(ckpt_dir / FINGERPRINT_FILE, {"step": step, "fingerprint": fingerprint})
    for old in ckpt_dir.glob(f"{SHARDS_PREFIX}*"):
        if old.name != shards:
            shutil.rmtree(old, ignore_errors=True)  # superseded (or left by a kill mid-write)
    return True


def _dcp_state(model, optimizer) -> dict:
    """The trained parameters and the optimizer state as torch.distributed.checkpoint state dicts (keyed by
    parameter name: loadable into a sharded or a plain model, on any number of processes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


def _load_shards(folder: Path, model, optimizer, sharded: bool, device) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from .sharding import local

    if not folder.is_dir():
        raise UserError(f"{folder}: the sharded checkpoint named by {folder.parent / STATE_FILE} is missing; "
                        "pass --restart to discard it")
    state = _dcp_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as e:  # noqa: BLE001 — damaged or foreign shards must refuse, whatever DCP raised
        raise UserError(f"{folder}: damaged sharded checkpoint ({type(e).__name__}); pass --restart to discard "
                        "it") from e
    if not _finite_everywhere([local(v) for v in state["model"].values() if torch.is_tensor(v)], sharded, device):
        raise UserError(f"{folder}: checkpoint holds non-finite weights; pass --restart to discard it")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))


def _checkpoint_step(ckpt_dir: Path):
    try:
        return json.loads((ckpt_dir / FINGERPRINT_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "?"


def _describe(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """'key: old → new' for every key whose value differs (missing keys included)."""
    missing = object()
    return [f"{k}: {_describe(old.get(k)) if k in old else '(none)'} → {_describe(new.get(k)) if k in new else '(none)'}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def _load_checkpoint(ckpt_dir: Path, model, params, optimizer, scheduler, fingerprint, extra_state=None,
                     sharded: bool = False, device=None):
    try:
        state = torch.load(ckpt_dir / STATE_FILE, map_location="cpu", weights_only=False)
        saved = state["fingerprint"] if isinstance(state, dict) and "fingerprint" in state else None
    except Exception as e:  # noqa: BLE001 — a damaged checkpoint must refuse, whatever the unpickler raised
        raise UserError(f"{ckpt_dir / STATE_FILE}: damaged checkpoint ({type(e).__name__}); pass --restart to "
                        "discard it") from e
    if saved is None:
        raise UserError(f"{ckpt_dir / STATE_FILE}: checkpoint has no run fingerprint (written by an older version); "
                        "pass --restart to discard it")
    diffs = fingerprint_differences(saved, _jsonable(fingerprint))
    if diffs:
        raise UserError(f"{ckpt_dir}: checkpoint of a different run ({'; '.join(diffs[:4])}"
                        f"{'; ...' if len(diffs) > 4 else ''}); re-run with the same arguments to resume it, or "
                        "pass --restart to discard it")
    if state.get("shards"):  # written by a sharded run: loads on any number of processes, sharded or not
        _load_shards(ckpt_dir / state["shards"], model, optimizer, sharded, device)
    elif sharded:
        raise UserError(f"{ckpt_dir}: checkpoint of a run without --fsdp; resume it without --fsdp, or pass "
                        "--restart to discard it")
    else:
        if not all_finite(state["params"].values()):
            raise UserError(f"{ckpt_dir / STATE_FILE}: checkpoint holds non-finite weights; pass --restart to "
                            "discard it")
        names = dict(model.named_parameters())
        with torch.no_grad():
            for n, value in state["params"].items():
                names[n].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if extra_state is not None and state.get("extra") is not None:
        extra_state.load_state_dict(state["extra"])
    return state["step"], state["log"]
