"""Attacks on (unlearned) models: optimisation-based probes of whether a model still holds forgotten knowledge."""
