"""`unlearn(...)`: run one weight-space unlearning method on any HF causal LM through the shared training loop.

The config is the method's DEFAULTS, updated by the caller's dict (YAML + CLI overrides); unknown keys are errors.
Each step sees {"forget": batch, "retain": batch, "topic": k}: forget batches of the topics interleave step by step,
and retain batches are paired with them by `pairing` ("cycle": the shuffled retain set flows on across epochs;
"random": a seeded random retain batch each step). Everything is checked before training starts.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from .data.batching import batches, encode_corpus, encode_items
from .data.format import PromptFormat
from .errors import UserError
from .methods import METHODS
from .train.loop import TrainConfig, _dist, train

# Keys every method accepts besides TrainConfig's and its own.
COMMON = dict(pairing="cycle", retain_batch_size=None, max_length=512, params=None,
              lora_r=0, lora_alpha=None, lora_dropout=0.0, lora_targets="all-linear", lora_merge=True)
_TRAIN_KEYS = {f.name for f in fields(TrainConfig)} - {"extra"}


def resolve_config(method: str, config: dict | None = None) -> dict:
    """Method defaults + common keys + TrainConfig defaults, updated by `config`; unknown keys/values → UserError."""
    if method not in METHODS:
        raise UserError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    module, defaults = METHODS[method]
    resolved = {f.name: f.default for f in fields(TrainConfig) if f.name in _TRAIN_KEYS}
    resolved["adam_betas"] = tuple(resolved["adam_betas"])
    resolved.update(COMMON)
    resolved.update(defaults)
    for key, value in (config or {}).items():
        if key not in resolved:
            raise UserError(f"config: unknown key {key!r} for method {method} "
                            f"(known: {', '.join(sorted(resolved))})")
        resolved[key] = value
    for key, allowed in {**getattr(module, "CHOICES", {}), "pairing": ("cycle", "random")}.items():
        if resolved[key] not in allowed:
            raise UserError(f"config {key}: unknown value {resolved[key]!r}; choose one of {', '.join(allowed)}")
    if method == "adaptive_rmu" and not resolved["adaptive"]:
        raise UserError("config adaptive: adaptive_rmu needs adaptive=true (use --method rmu instead)")
    return resolved


@dataclass
class UnlearnData:
    """What a method's setup may look at: encoded examples, padding id, topics, trained parameter names, and the
    batch schedule (the same one the loop uses)."""
    forget: list[dict]
    retain: list[dict]
    pad_id: int
    n_topics: int
    param_names: list[str]
    batches_for_epoch: Callable[[int], list]


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


def check_data(method: str, cfg: dict, forget: list[dict] | None, retain: list[dict] | None) -> bool:
    """Empty sets and forget/retain overlap are errors. Returns whether the method uses the retain set."""
    module, _ = METHODS[method]
    if not forget:
        raise UserError("forget: empty data set")
    uses_retain = getattr(module, "NEEDS_RETAIN", False) and cfg.get("alpha", 1) != 0
    if uses_retain and not retain:
        raise UserError(f"retain: empty data set (method {method} needs a retain set)")
    if uses_retain:
        retain_keys = {_key(r) for r in retain}
        both = [f for f in forget if _key(f) in retain_keys]
        if both:
            what = both[0].get("question") or both[0].get("text")
            raise UserError(f"forget and retain overlap in {len(both)} rows, e.g. {str(what)[:60]!r}")
    return uses_retain


def select_params(model, cfg: dict, method: str) -> list[str]:
    """Names of the parameters to train: those matching cfg["params"] (RMU: its default regex), else all."""
    regex = cfg["params"]
    if regex is None and METHODS[method][0].__name__.endswith(".rmu"):
        from .methods.rmu import default_param_regex

        regex = default_param_regex(cfg["layer"])
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


def make_schedule(forget: list[dict], retain: list[dict], cfg: dict, pad_id: int, n_topics: int):
    """batches_for_epoch(epoch) → [{"forget", "retain", "topic"}]: topics interleaved step by step (a topic with
    fewer batches starts again), retain batches paired by cfg["pairing"]. Deterministic for the seed."""
    bs, rbs, seed = cfg["batch_size"], cfg["retain_batch_size"] or cfg["batch_size"], cfg["seed"]
    reference_padding = cfg.get("padding") == "reference"  # RMU reference code: left padding, arange positions
    side = "left" if reference_padding else "right"
    by_topic = [[i for i, ex in enumerate(forget) if ex["topic"] == k] for k in range(n_topics)]

    def make(examples, idx, size, shuffle_seed):
        out = []
        for b in batches([examples[i] for i in idx], size, pad_id, shuffle=True, seed=shuffle_seed,
                         padding_side=side):
            b["index"] = torch.tensor([idx[i] for i in b["index"].tolist()])  # index into the full set
            if reference_padding:
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


def _maybe_init_distributed():
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
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


def build(model, tokenizer, method: str, forget: list[dict], retain: list[dict] | None = None,
          config: dict | None = None, fmt: PromptFormat = PromptFormat(), setup_kwargs: dict | None = None) -> Run:
    """Resolve the config, check and encode the data, choose the trained parameters (LoRA if asked) and set the
    method up. Every error is raised here, before any training. setup_kwargs: e.g. {"naive": True} for benches."""
    cfg = resolve_config(method, config)
    uses_retain = check_data(method, cfg, forget, retain)
    module, _ = METHODS[method]
    train_cfg = TrainConfig(**{k: cfg[k] for k in _TRAIN_KEYS})
    topics: dict = {}
    forget_ex = _encode(tokenizer, forget, fmt, cfg["max_length"], "forget", topics)
    retain_ex = _encode(tokenizer, retain, fmt, cfg["max_length"], "retain") if uses_retain else []
    if hasattr(module, "validate"):
        module.validate(model, cfg)
    chosen = select_params(model, cfg, method)
    all_params = cfg["params"] is None and not module.__name__.endswith(".rmu")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if cfg["lora_r"]:
        model = _apply_lora(model, cfg, chosen, all_params)
    else:
        keep = set(chosen)
        for n, p in model.named_parameters():
            p.requires_grad_(n in keep)  # only trained parameters carry gradients
    params = [p for p in model.parameters() if p.requires_grad]
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    schedule = make_schedule(forget_ex, retain_ex, cfg, tokenizer.pad_token_id, len(topics))
    data = UnlearnData(forget_ex, retain_ex, tokenizer.pad_token_id, len(topics), param_names, schedule)
    step_loss = module.setup(model, data, cfg, **(setup_kwargs or {}))  # may raise UserError (e.g. RMU layer out of range)
    return Run(model, step_loss, schedule, params, data, cfg, train_cfg, uses_retain, list(topics), requires_grad)


def unlearn(model, tokenizer, method: str, forget: list[dict], retain: list[dict] | None = None,
            config: dict | None = None, out_dir: str | os.PathLike | None = None, fmt: PromptFormat = PromptFormat(),
            progress: bool = True, resume: bool = True, stop_after_steps: int | None = None) -> dict:
    """Unlearn `forget` from `model` (in place) with `method`; keep `retain`.

    forget / retain: [{"question", "answer"}] QA rows or [{"text"}] raw-text rows; an optional "topic" field splits
    the forget set into topics (RMU: one u, coefficient and α per topic). config: overrides of the method's
    DEFAULTS (see `resolve_config`). out_dir: where the HF model + tokenizer + run.json go (and the resume
    checkpoint while training). Returns the run info (what run.json holds) plus "model": the unlearned model.
    """
    t_start = time.perf_counter()
    _maybe_init_distributed()
    run = build(model, tokenizer, method, forget, retain, config, fmt)
    cfg, model = run.cfg, run.model
    setup_seconds = time.perf_counter() - t_start
    log = train(model, run.step_loss, run.schedule, run.train_cfg, out_dir=out_dir, params=run.params,
                resume=resume, progress=progress, desc=method, stop_after_steps=stop_after_steps)
    if cfg["lora_r"] and cfg["lora_merge"]:
        model = model.merge_and_unload()
    for n, p in model.named_parameters():
        p.requires_grad_(run.restore_requires_grad.get(n, p.requires_grad))
    steps = log["steps"]
    info = {"method": method, "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "seed": cfg["seed"], "n_forget": len(forget), "n_retain": len(retain) if run.uses_retain else 0,
            "topics": run.topics, "trained_parameters": run.data.param_names,
            "n_trained_parameters": sum(p.numel() for p in run.params),
            "resolved_coefficients": getattr(run.step_loss, "coeffs", None),
            "prompt_format": {"kind": fmt.kind, "system_prompt": fmt.system_prompt},
            "setup_seconds": setup_seconds, "train_seconds": log.get("seconds"),
            "seconds_per_step": sum(s["seconds"] for s in steps) / len(steps) if steps else None,
            "peak_memory_bytes": peak_memory_bytes(next(model.parameters()).device),
            "total_steps": log["total_steps"], "world_size": log["world_size"], "steps": steps,
            "interrupted_at": log.get("interrupted_at"), "versions": _versions(), "command": " ".join(sys.argv)}
    info = json.loads(json.dumps(info, default=str))
    if out_dir is not None and log.get("interrupted_at") is None and _dist()[0] == 0:
        from .models import save_model

        save_model(model, tokenizer, out_dir, extra_files={"run.json": json.dumps(info, indent=1)})
    info["model"] = model
    return info
