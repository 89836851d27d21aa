"""Evaluation: TOFU, MUSE, multiple choice and membership inference (docs/evaluation.md).

Every evaluator has one signature: evaluate_X(model, tokenizer, data, *, guard=None, retain_reference=None,
batch_size=32, progress=True, ...)."""
from .mcq import evaluate_mcq, load_mcq
from .muse import evaluate_muse, load_muse
from .tofu import evaluate_tofu, summary_table, write_eval

__all__ = ["evaluate_tofu", "evaluate_muse", "evaluate_mcq", "load_muse", "load_mcq", "write_eval", "summary_table"]
