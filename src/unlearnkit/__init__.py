"""unlearnkit: LLM unlearning — weight-space methods, ECO, the field's evaluations, attacks and reports.

The Python API (the CLI only wraps it):
    model, tokenizer = unlearnkit.load_model()                 # offline SmolLM2-135M-Instruct, or a path / hub id
    task = unlearnkit.data.tofu.task("mini")                    # TOFU splits: forget01/05/10, mini
    paths = unlearnkit.prepare_tofu("mini")                     # fine-tuned target + retain models (cached)
    info = unlearnkit.unlearn(model, tokenizer, "simnpo", task.forget, task.retain_train_for_unlearning)
    result = unlearnkit.evaluate_tofu(model, tokenizer, task)   # per-sample EVAL dict + "summary"
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import data  # noqa: E402
from .models import load_model, load_tokenizer, save_model  # noqa: E402  (light: torch only)

_LAZY = {"prepare_tofu": ("prepare", "prepare_tofu"), "unlearn": ("unlearning", "unlearn"),
         "evaluate_tofu": ("eval", "evaluate_tofu"), "finetune": ("train.finetune", "finetune"),
         "TrainConfig": ("train.loop", "TrainConfig"), "PromptFormat": ("data.format", "PromptFormat")}


def __getattr__(name):  # heavy parts load on first use, so `unlearnkit --help` stays fast
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(name)


__all__ = ["load_model", "load_tokenizer", "save_model", *_LAZY]
