"""Evaluation: TOFU, MUSE, multiple choice and membership inference (docs/evaluation.md)."""
from .tofu import evaluate_tofu, summary_table, write_eval

__all__ = ["evaluate_tofu", "write_eval", "summary_table"]
