"""`unlearn(...)`: run one weight-space unlearning method on any HF causal LM through the shared training loop.

The config is the method's defaults, updated by the caller's dict (YAML + CLI overrides); unknown keys, wrong types
and out-of-range values are errors. Each step sees {"forget": batch, "retain": batch, "topic": k}: forget batches
of the topics interleave step by step, and retain batches are paired with them by `pairing` ("cycle": the shuffled
retain set flows on across epochs; "random": a seeded random retain batch each step). Everything is checked before
training starts. This module knows methods only through their `Method` record (methods/contract.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import sys
import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from . import methods
from .data.batching import batches, encode_corpus, encode_items
from .data.format import PromptFormat
from .errors import UserError
from .files import check_out_dir, claim_out_dir
from .train.loop import TrainConfig, autocast_context, dist_info, train, uses_bf16
from .train.sharding import (check_shardable, compute_device, gather_full, is_sharded, set_activation_checkpointing,
                             shard)

# Keys every method accepts besides TrainConfig's and its own.
COMMON = dict(pairing="cycle", retain_batch_size=None, max_length=512, params=None,
              lora_r=0, lora_alpha=None, lora_dropout=0.0, lora_targets="all-linear", lora_merge=True)
_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"extra"}


# Types of the keys whose default is None (the others take their default's type).
_NONE_DEFAULT_TYPES = {"max_steps": int, "max_grad_norm": float, "retain_batch_size": int, "params": str,
                       "lora_alpha": float}


def _typed(key: str, value, default, per_topic: bool):
    """value converted to the type `default` (or the declared type) implies; UserError naming the key otherwise."""
    kind = _NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    if kind is None or (value is None and (default is None or key in _NONE_DEFAULT_TYPES)):
        return value  # None is a real setting of the optional keys (e.g. max_grad_norm: null = no clipping)
    if per_topic and isinstance(value, (list, tuple)):
        return [_typed(key, v, default, False) for v in value]
    if kind in (int, float) and isinstance(value, str):  # YAML reads 1e-5 as a string
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            pass
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          tuple: lambda v: isinstance(v, (list, tuple))}.get(kind, lambda v: True)
    if not ok(value):
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                tuple: "a list"}.get(kind, kind.__name__)
        raise UserError(f"config {key}: expected {what}{' (or one per topic)' if per_topic else ''}, got {value!r:.40}")
    return float(value) if kind is float else tuple(value) if kind is tuple else value


def _check_common(cfg: dict) -> None:
    def at_least(key, lo, what):
        v = cfg[key]
        if v is not None and v < lo:
            raise UserError(f"config {key}: must be {what} (got {v!r})")

    at_least("retain_batch_size", 1, "an integer >= 1")
    at_least("max_length", 1, "an integer >= 1")
    at_least("lora_r", 0, "an integer >= 0 (0: no LoRA)")
    if cfg["lora_alpha"] is not None and not cfg["lora_alpha"] > 0:
        raise UserError(f"config lora_alpha: must be > 0 (got {cfg['lora_alpha']!r})")
    if not 0 <= cfg["lora_dropout"] < 1:
        raise UserError(f"config lora_dropout: must be in [0, 1) (got {cfg['lora_dropout']!r})")


def resolve_config(method: str, config: dict | None = None) -> dict:
    """Method defaults + common keys + TrainConfig defaults, updated by `config`. Unknown keys, wrong types, unknown
    choices and out-of-range values are UserErrors — all checked here, before any model is loaded."""
    m = methods.get(method)
    base = {f.name: f.default for f in fields(TrainConfig) if f.name in _TRAIN_KEYS}
    base.update(COMMON)
    base.update(m.defaults)
    resolved = dict(base)
    for key, value in (config or {}).items():
        if key not in resolved:
            raise UserError(f"config: unknown key {key!r} for method {method} "
                            f"(known: {', '.join(sorted(resolved))})")
        resolved[key] = _typed(key, value, base[key], key in m.per_topic)
    resolved["adam_betas"] = tuple(resolved["adam_betas"])
    for key, allowed in {**m.choices, "pairing": ("cycle", "random")}.items():
        if resolved[key] not in allowed or isinstance(resolved[key], bool) != isinstance(allowed[0], bool):
            raise UserError(f"config {key}: unknown value {resolved[key]!r}; choose one of "
                            f"{', '.join(map(str, allowed))}")
    TrainConfig(**{k: resolved[k] for k in _TRAIN_KEYS})  # the loop's own range checks
    _check_common(resolved)
    if m.check:
        m.check(resolved)
    return resolved


@dataclass
class UnlearnData:
    """What a method's setup may look at: encoded examples, padding id, topics, trained parameter names, the batch
    schedule (the same one the loop uses), the loop's autocast (for anything precomputed), and `report`, where
    setup records what the method reports (its `Method.reports` keys; they go to run.json)."""
    forget: list[dict]
    retain: list[dict]
    pad_id: int
    n_topics: int
    param_names: list[str]
    batches_for_epoch: Callable[[int], list]
    autocast: Callable = contextlib.nullcontext
    report: dict = field(default_factory=dict)


def _kind(items: list[dict], source: str) -> str:
    kinds = {"text" if "text" in it and "question" not in it else "qa" for it in items}
    if len(kinds) > 1:
        raise UserError(f"{source}: mixes QA rows and raw-text rows")
    return kinds.pop()


def _encode(tokenizer, items, fmt, max_length, source, topics: dict | None = None) -> list[dict]:
    """Tokenised examples; each keeps a topic number (order of first appearance)."""
    out = []
    if _kind(items, source) == "text":
        for item in items:
            for ex in encode_corpus(tokenizer, [item["text"]], max_length, source):
                out.append({**ex, "topic": item.get("topic")})
    else:
        for item, ex in zip(items, encode_items(tokenizer, items, fmt, max_length, source)):
            out.append({**ex, "topic": item.get("topic")})
    if topics is not None:
        for ex in out:
            ex["topic"] = topics.setdefault(ex["topic"], len(topics))
    return out


def _key(item: dict) -> tuple:
    if "text" in item and "question" not in item:
        return ("text", " ".join(str(item["text"]).split()))
    return ("qa", " ".join(str(item.get("question")).split()), " ".join(str(item.get("answer")).split()))


def check_data(method: methods.Method, cfg: dict, forget: list[dict] | None, retain: list[dict] | None) -> bool:
    """Empty sets and forget/retain overlap are errors. Returns whether the method uses the retain set."""
    if not forget:
        raise UserError("forget: empty data set")
    uses_retain = method.uses_retain(cfg)
    if uses_retain and not retain:
        raise UserError(f"retain: empty data set (method {method.name} needs a retain set with this config)")
    if uses_retain:
        retain_keys = {_key(r) for r in retain}
        both = [f for f in forget if _key(f) in retain_keys]
        if both:
            what = both[0].get("question") or both[0].get("text")
            raise UserError(f"forget and retain overlap in {len(both)} rows, e.g. {str(what)[:60]!r}")
    return uses_retain


def select_params(model, regex: str | None) -> list[str]:
    """Names of the parameters to train: those matching `regex`, else all."""
    names = [n for n, _ in model.named_parameters()]
    if regex is None:
        return names
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise UserError(f"config params: invalid regex {regex!r} ({e})") from e
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise UserError(f"config params: regex {regex!r} matches no parameter of the model "
                        f"(e.g. {names[len(names) // 2]})")
    return chosen


def _apply_lora(model, cfg: dict, chosen: list[str], all_names: bool):
    from peft import LoraConfig, get_peft_model

    if all_names:
        targets = cfg["lora_targets"]
    else:  # LoRA on the linear modules whose weights were chosen
        modules = dict(model.named_modules())
        targets = sorted({n.rsplit(".", 1)[0] for n in chosen
                          if isinstance(modules.get(n.rsplit(".", 1)[0]), torch.nn.Linear)})
        if not targets:
            raise UserError(f"config params: LoRA needs linear layers; {cfg['params']!r} matches none")
    lcfg = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"] or 2 * cfg["lora_r"],
                      lora_dropout=cfg["lora_dropout"], target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def make_schedule(forget: list[dict], retain: list[dict], cfg: dict, pad_id: int, n_topics: int,
                  padding_side: str = "right", position_ids: bool = True):
    """batches_for_epoch(epoch) → [{"forget", "retain", "topic"}]: topics interleaved step by step (a topic with
    fewer batches starts again), retain batches paired by cfg["pairing"]. Deterministic for the seed.
    position_ids=False leaves them out (HF numbers positions 0..T-1, padding included)."""
    bs, rbs, seed = cfg["batch_size"], cfg["retain_batch_size"] or cfg["batch_size"], cfg["seed"]
    by_topic = [[i for i, ex in enumerate(forget) if ex["topic"] == k] for k in range(n_topics)]

    def make(examples, idx, size, shuffle_seed):
        out = []
        for b in batches([examples[i] for i in idx], size, pad_id, shuffle=True, seed=shuffle_seed,
                         padding_side=padding_side):
            b["index"] = torch.tensor([idx[i] for i in b["index"].tolist()])  # index into the full set
            if not position_ids:
                b.pop("position_ids", None)
            out.append(b)
        return out

    retain_passes: dict[int, list] = {}

    def retain_batch(g: int, rng: random.Random):
        n_per_pass = -(-len(retain) // rbs)
        if cfg["pairing"] == "random":
            p, j = rng.randrange(1 << 30), None
        else:
            p, j = divmod(g, n_per_pass)
        if p not in retain_passes:
            if len(retain_passes) > 2:
                retain_passes.clear()
            retain_passes[p] = make(retain, list(range(len(retain))), rbs, seed + 7919 * (p + 1))
        passes = retain_passes[p]
        return passes[j if j is not None else rng.randrange(len(passes))]

    def batches_for_epoch(epoch: int) -> list[dict]:
        per_topic = [make(forget, idx, bs, seed + epoch + 104729 * k) for k, idx in enumerate(by_topic)]
        n = n_topics * max(len(t) for t in per_topic)
        rng = random.Random(seed * 1_000_003 + epoch)
        steps = []
        for i in range(n):
            k = i % n_topics
            fb = per_topic[k][(i // n_topics) % len(per_topic[k])]
            steps.append({"forget": fb, "retain": retain_batch(epoch * n + i, rng) if retain else None, "topic": k})
        return steps

    return batches_for_epoch


def _check_fsdp_world() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError("--fsdp: needs a process group: launch with torchrun --nproc_per_node N (or accelerate "
                        "launch); one process trains unsharded without --fsdp")


def launched() -> bool:
    """Started by torchrun / accelerate launch (the variables a process group is created from)?"""
    return all(k in os.environ for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE"))


def _maybe_init_distributed():
    """Under torchrun / accelerate launch: join the process group (gloo on CPU, nccl on GPU). One process joins too
    when it is launched that way (--fsdp --offload on one GPU needs the group)."""
    import torch.distributed as dist

    if launched() and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["unlearnkit"] = version("unlearnkit")
        out["peft"] = version("peft")
    except Exception:  # metadata missing in odd installs: versions are informative only
        pass
    return out


def peak_memory_bytes(device) -> int:
    """Peak memory of this process so far: CUDA max allocated on GPU, else peak resident set size."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model) -> str:
    """A checksum of the model as given (architecture + every parameter's sum and squared sum): a resume on
    another model is refused. Cheap next to a training step."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    sums = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = p.detach().double()
            sums.append((name, list(p.shape), str(p.dtype), float(x.sum()), float(x.square().sum())))
    return _sha([config, sums])


def _data_identity(examples: list[dict]) -> str:
    return _sha([(ex["input_ids"], ex["labels"], ex.get("topic")) for ex in examples])


def _events_to_keep(live_log, out_dir) -> dict:
    """{"tb": folder} when the live log writes into out_dir/tb: the published run folder keeps its events."""
    from .train.live_log import TB_DIR

    if live_log is None:
        return {}
    live_log.close_files()  # complete on disk before the copy; publishing replaces the folder it was in
    own = os.path.realpath(os.path.join(out_dir, TB_DIR))
    if live_log.log_dir is not None and os.path.realpath(live_log.log_dir) == own and os.path.isdir(own):
        return {TB_DIR: own}
    return {}


@dataclass
class Run:
    """A method ready to train: what `unlearn` passes to the loop (tests use it to check losses step by step)."""
    model: torch.nn.Module
    step_loss: Callable
    schedule: Callable[[int], list]
    params: list
    data: UnlearnData
    cfg: dict
    train_cfg: TrainConfig
    uses_retain: bool
    topics: list
    restore_requires_grad: dict
    fingerprint: dict


def total_steps(tokenizer, method: str, forget: list[dict], retain: list[dict] | None = None,
                config: dict | None = None, fmt: PromptFormat = PromptFormat()) -> int:
    """Optimizer steps a run of this config takes (one process), without a model: sweeps group points by it."""
    m = methods.get(method)
    cfg = resolve_config(method, config)
    uses_retain = check_data(m, cfg, forget, retain)
    topics: dict = {}
    forget_ex = _encode(tokenizer, forget, fmt, cfg["max_length"], "forget", topics)
    retain_ex = _encode(tokenizer, retain, fmt, cfg["max_length"], "retain") if uses_retain else []
    schedule = make_schedule(forget_ex, retain_ex, cfg, tokenizer.pad_token_id, len(topics), m.padding_side(cfg),
                             m.position_ids(cfg))
    per_epoch = len(schedule(0))
    return cfg["max_steps"] or max(1, math.ceil(per_epoch * cfg["epochs"] / cfg["grad_accum"]))


def build(model, tokenizer, method: str, forget: list[dict], retain: list[dict] | None = None,
          config: dict | None = None, fmt: PromptFormat = PromptFormat(), setup_kwargs: dict | None = None) -> Run:
    """Resolve the config, check and encode the data, choose the trained parameters (LoRA if asked) and set the
    method up. Every error is raised here, before any training. setup_kwargs: e.g. {"naive": True} for benches."""
    m = methods.get(method)
    cfg = resolve_config(method, config)
    uses_retain = check_data(m, cfg, forget, retain)
    train_cfg = TrainConfig(**{k: cfg[k] for k in _TRAIN_KEYS})
    if train_cfg.fsdp:
        _check_fsdp_world()
        check_shardable(model)
    topics: dict = {}
    forget_ex = _encode(tokenizer, forget, fmt, cfg["max_length"], "forget", topics)
    retain_ex = _encode(tokenizer, retain, fmt, cfg["max_length"], "retain") if uses_retain else []
    if m.check_model:
        m.check_model(model, cfg)
    fingerprint = {"method": method, "method_config": {k: v for k, v in cfg.items() if k not in _TRAIN_KEYS},
                   "model": model_identity(model), "forget_data": _data_identity(forget_ex),
                   "retain_data": _data_identity(retain_ex)}
    regex = cfg["params"] if cfg["params"] is not None else m.default_params(cfg)
    chosen = select_params(model, regex)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if cfg["lora_r"]:
        model = _apply_lora(model, cfg, chosen, all_names=regex is None)
    else:
        keep = set(chosen)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)  # only trained parameters carry gradients
    device = next(model.parameters()).device
    if train_cfg.activation_checkpointing:
        set_activation_checkpointing(model)
    if train_cfg.fsdp:
        # Sharded before the method's setup: its precomputations (NPO's reference NLLs, RMU's coefficients) and
        # frozen copies then run in the step's own precision, on the sharded model.
        model = shard(model, device, bf16=uses_bf16(train_cfg, device), offload=train_cfg.offload)
    params = [p for p in model.parameters() if p.requires_grad]
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    schedule = make_schedule(forget_ex, retain_ex, cfg, tokenizer.pad_token_id, len(topics),
                             m.padding_side(cfg), m.position_ids(cfg))
    data = UnlearnData(forget_ex, retain_ex, tokenizer.pad_token_id, len(topics), param_names, schedule,
                       autocast=lambda: autocast_context(train_cfg, compute_device(model)))
    step_loss = m.setup(model, data, cfg, **(setup_kwargs or {}))
    if set(data.report) != set(m.reports):
        raise RuntimeError(f"method {method}: setup reported {sorted(data.report)}, its record declares "
                           f"{sorted(m.reports)}")
    return Run(model, step_loss, schedule, params, data, cfg, train_cfg, uses_retain, list(topics), requires_grad,
               fingerprint)


def _step_callbacks(monitor, live_log):
    """The loop's on_step: the in-training evaluation first (it adds entry["eval"]), then the live log."""
    if monitor is None and live_log is None:
        return None

    def on_step(step: int, entry: dict) -> None:
        if monitor is not None:
            monitor.on_step(step, entry)
        if live_log is not None:
            live_log.on_step(step, entry)
            if entry.get("eval"):
                live_log.log_scalars(step, entry["eval"], prefix="eval")

    return on_step


def unlearn(model, tokenizer, method: str, forget: list[dict], retain: list[dict] | None = None,
            config: dict | None = None, out_dir: str | os.PathLike | None = None, fmt: PromptFormat = PromptFormat(),
            progress: bool = True, resume: bool = True, stop_after_steps: int | None = None,
            monitor=None, live_log=None) -> dict:
    """Unlearn `forget` from `model` (in place) with `method`; keep `retain`.

    forget / retain: [{"question", "answer"}] QA rows or [{"text"}] raw-text rows; an optional "topic" field splits
    the forget set into topics (RMU: one u, coefficient and α per topic). config: overrides of the method's
    defaults (see `resolve_config`). out_dir: where the HF model + tokenizer + run.json go (and the resume
    checkpoint while training): new, empty, or an earlier folder of `unlearn` (files.py). resume=True continues a
    checkpoint of the same run there (another run's checkpoint is an error); resume=False discards it.
    monitor: a train/monitor.py Monitor — evaluation every N steps, recorded per step, and the kept step's weights
    restored before saving (run.json "in_training_eval").
    live_log: a train.live_log.LiveLog fed every step (TensorBoard / wandb); when it writes into out_dir/tb, the
    published folder carries the events. The caller closes it (it may log more, e.g. an evaluation, afterwards).
    Returns the run info (what run.json holds) plus "model": the unlearned model.
    """
    t_start = time.perf_counter()
    if out_dir is not None:
        check_out_dir(out_dir, "unlearn")
    _maybe_init_distributed()
    if monitor is not None and (config or {}).get("fsdp"):
        raise UserError("--eval-every / monitor: in-training evaluation is not supported with --fsdp")
    run = build(model, tokenizer, method, forget, retain, config, fmt)
    cfg, model = run.cfg, run.model
    setup_seconds = time.perf_counter() - t_start
    rank = dist_info()[0]
    if out_dir is not None and rank == 0:
        claim_out_dir(out_dir, "unlearn")
    if monitor is not None:
        monitor.bind(model, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    log = train(model, run.step_loss, run.schedule, run.train_cfg, out_dir=out_dir, params=run.params,
                resume=resume, progress=progress, desc=method, stop_after_steps=stop_after_steps,
                fingerprint=run.fingerprint, remove_checkpoint=False, extra_state=monitor,
                on_step=_step_callbacks(monitor, live_log),
                on_start=monitor.start if monitor is not None else None)
    kept = monitor.finish(len(log["steps"])) if monitor is not None and log.get("interrupted_at") is None else None
    peak = peak_memory_bytes(compute_device(model))
    sharded = is_sharded(model)
    if sharded:  # the full model, once, on rank 0 (CPU); None on the other ranks
        model = gather_full(model, rank)
    if model is not None and cfg["lora_r"] and cfg["lora_merge"]:
        model = model.merge_and_unload()
    for n, p in model.named_parameters() if model is not None else ():
        p.requires_grad_(run.restore_requires_grad.get(n, p.requires_grad))
    steps = log["steps"]
    info = {"method": method, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "seed": cfg["seed"], "n_forget": len(forget), "n_retain": len(retain) if run.uses_retain else 0,
            "topics": run.topics, "trained_parameters": run.data.param_names,
            "n_trained_parameters": sum(p.numel() for p in run.params), "method_report": run.data.report,
            "prompt_format": {"kind": fmt.kind, "system_prompt": fmt.system_prompt},
            "fingerprint": run.fingerprint,
            "setup_seconds": setup_seconds, "train_seconds": log.get("seconds"),
            "seconds_per_step": sum(s["seconds"] for s in steps) / len(steps) if steps else None,
            "peak_memory_bytes": peak, "sharded": sharded,
            "total_steps": log["total_steps"], "world_size": log["world_size"], "steps": steps,
            "interrupted_at": log.get("interrupted_at"), "versions": _versions(), "command": " ".join(sys.argv)}
    if kept is not None:
        info["in_training_eval"] = kept
    info = json.loads(json.dumps(info, default=str))
    if out_dir is not None and log.get("interrupted_at") is None and rank == 0:
        from .models import save_model

        # Replaces the run folder (checkpoint included) in one rename, only after the model is written.
        save_model(model, tokenizer, out_dir, extra_files={"run.json": json.dumps(info, indent=1)}, kind="unlearn",
                   extra_dirs=_events_to_keep(live_log, out_dir))
    info["model"] = model
    return info
