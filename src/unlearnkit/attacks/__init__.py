"""Attacks on unlearning results: relearning, jailbreak / extraction prompts, GCG suffixes (docs/attacks.md)."""
