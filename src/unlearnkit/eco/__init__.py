"""ECO (embedding-corrupted prompts): inference-time unlearning without changing weights.

A classifier flags prompts about the forget target; for flagged prompts a forward hook corrupts the input embeddings
of selected prompt tokens at prefill. See docs/eco.md.
"""
from .corrupt import CORRUPTIONS, CorruptionConfig
from .guard import EcoGuard, read_artifact

__all__ = ["CORRUPTIONS", "CorruptionConfig", "EcoGuard", "read_artifact"]
