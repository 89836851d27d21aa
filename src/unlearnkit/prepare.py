"""TOFU protocol, step 1: fine-tune the target model (forget + retain authors) and the retain model (retain
authors only) from the base model, and cache both. Unlearning then starts from the target, and the retain model is
the "never saw it" reference for forget quality."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from .data import tofu
from .data.format import PromptFormat
from .errors import UserError
from .files import check_out_dir, claim_out_dir
from .models import (DEFAULT_MODEL, cache_dir, check_device, default_device, load_model, model_fingerprint,
                     resolve_dtype, resolve_model_path, save_model)
from .train.finetune import finetune
from .train.live_log import TB_DIR
from .train.loop import TrainConfig

# lr 2e-4 for 5 epochs: lower settings leave a small model's facts half-learned, which makes every unlearning result
# look better than it is (docs/results.md).
FINETUNE_DEFAULTS = dict(lr=2e-4, epochs=5.0, batch_size=8, warmup_ratio=0.1, weight_decay=0.01,
                         checkpoint_every=10)  # an interrupted prepare resumes from its last checkpoint


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:] or "model"


EXECUTION_ONLY = ("checkpoint_every", "fsdp", "activation_checkpointing", "offload")


def prepared_dir(split: str, model: str | None, cfg: TrainConfig, fmt: PromptFormat, max_length: int,
                 dtype: str | None = "fp32") -> Path:
    """Cache folder keyed by the model's content (not its name: another model saved at the same path is another
    key), the split's training data and every setting that changes the result. Validates the model (cheap)."""
    task = tofu.task(split)
    # How a run is executed (checkpoint cadence, sharding, recomputation, offload) does not change the model beyond
    # float rounding, so it stays out of the key: caches survive new options of this kind.
    result_cfg = {k: v for k, v in asdict(cfg).items() if k not in EXECUTION_ONLY}
    data = hashlib.sha256(json.dumps([task.train_target, task.train_retain], sort_keys=True,
                                     default=str).encode()).hexdigest()
    key = json.dumps({"model": str(model or DEFAULT_MODEL), "content": model_fingerprint(model), "split": split,
                      "data": data, "cfg": result_cfg, "fmt": asdict(fmt), "max_length": max_length,
                      "dtype": str(dtype or "fp32")}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "tofu" / f"{_slug(str(model or DEFAULT_MODEL))}-{split}-{digest}"


def prepare_tofu(split: str = "mini", model: str | None = None, cfg: TrainConfig | None = None,
                 fmt: PromptFormat = PromptFormat(), max_length: int = 512, dtype: str | None = None,
                 device: str | None = None, force: bool = False, progress: bool = True,
                 trust_remote_code: bool = False, logs=None) -> dict[str, Path]:
    """Fine-tune (or reuse cached) target and retain models for a TOFU split; returns {"target": dir, "retain": dir}.

    Only ever replaces its own cache folders (marked by files.claim_out_dir / publish_dir); every input is checked
    before any training starts. logs: a train.live_log.LogOptions; each fine-tune then writes its live log into
    its work folder's tb/, which the prepared model folder keeps (`tensorboard --logdir` the split's cache folder)."""
    task = tofu.task(split)
    cfg = cfg or TrainConfig(**FINETUNE_DEFAULTS)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise UserError(f"--max-length: must be a whole number > 0 (got {max_length!r})")
    check_device(device)
    dtype = dtype or "fp32"
    resolve_dtype(dtype, device or default_device())
    root = prepared_dir(split, model, cfg, fmt, max_length, dtype)  # validates the model folder too
    inputs = [Path(p) for p in [resolve_model_path(model)] if Path(p).is_dir()]
    paths, todo = {}, []
    for role, items in (("target", task.train_target), ("retain", task.train_retain)):
        out, work = root / role, root / f".{role}-work"  # work: checkpoints, so an interrupted prepare resumes
        check_out_dir(out, "prepare", inputs=inputs)  # refuses anything we did not write, before training
        if (out / "model.safetensors").is_file() and not force:
            paths[role] = out
            continue
        check_out_dir(work, "prepare", inputs=inputs)
        todo.append((role, items, out, work))
    for role, items, out, work in todo:
        claim_out_dir(work, "prepare", files=["train_log.json"])
        net, tokenizer = load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        print(f"[prepare] {split}: fine-tuning the {role} model on {len(items)} QA", file=sys.stderr)
        live = logs.open(work, name=f"prepare-{split}-{role}", config=asdict(cfg)) if logs else None
        try:
            log = finetune(net, tokenizer, items, cfg, out_dir=work, fmt=fmt, max_length=max_length,
                           source=f"TOFU {split} {role}", progress=progress, desc=f"{role} fine-tune",
                           on_step=live.on_step if live else None)
        finally:
            if live is not None:
                live.close()
        meta = {"role": role, "split": split, "base_model": str(model or DEFAULT_MODEL), "n_train": len(items),
                "prompt_format": asdict(fmt), "max_length": max_length, "train_log": log}
        events = work / TB_DIR
        save_model(net, tokenizer, out, extra_files={"unlearnkit_prepare.json": json.dumps(meta, indent=1)},
                   kind="prepare", inputs=inputs, extra_dirs={TB_DIR: events} if live and live.log_dir and events.is_dir() else None)
        check_out_dir(work, "prepare")  # still only what we wrote: then it is ours to remove
        shutil.rmtree(work, ignore_errors=True)
        paths[role] = out
    return paths
