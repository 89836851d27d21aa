"""The method contract: one small record per unlearning method. `unlearnkit.unlearn` and the training loop read
only this record, so a new method is one new file and one line in methods/__init__.py (docs/methods.md shows how).

A method's `setup(model, data, cfg)` runs once before training and returns `step_loss(model, batch) -> (loss,
{name: float})`; each batch is {"forget": batch, "retain": batch or None, "topic": k}. `data` is an `UnlearnData`
(encoded examples, the batch schedule, the loop's autocast) and `data.report` collects what the method reports
(the keys listed in `reports`), recorded in run.json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    defaults: dict                               # the method's own keys + its training-loop defaults
    setup: Callable                              # (model, data, cfg, **options) -> step_loss
    uses_retain: Callable[[dict], bool] = lambda cfg: False   # does a run with this config need the retain set?
    choices: dict = field(default_factory=dict)  # key -> allowed values
    check: Callable[[dict], None] | None = None  # config-only checks (ranges, combinations): before any work
    check_model: Callable | None = None          # (model, cfg) checks that need the model, before setup
    default_params: Callable[[dict], str | None] = lambda cfg: None   # regex of trained parameters; None = all
    padding_side: Callable[[dict], str] = lambda cfg: "right"        # how its batches are padded
    position_ids: Callable[[dict], bool] = lambda cfg: True          # batches carry explicit position ids
    reports: tuple[str, ...] = ()                # keys setup puts in data.report
    per_topic: tuple[str, ...] = ()              # keys that may be a list with one value per forget topic


def when_alpha(cfg: dict) -> bool:
    """The retain set is used when the retain weight α is non-zero (for any topic)."""
    alpha = cfg["alpha"]
    return any(a != 0 for a in alpha) if isinstance(alpha, (list, tuple)) else alpha != 0


# ---- config checks methods share --------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def require(cfg: dict, key: str, ok: Callable[[float], bool], what: str) -> None:
    """cfg[key] (or each of its per-topic values) is a finite number satisfying ok; else a one-line error."""
    values = cfg[key] if isinstance(cfg[key], (list, tuple)) else [cfg[key]]
    for v in values:
        if not _is_number(v) or not ok(v):
            raise UserError(f"config {key}: must be {what} (got {v!r})")


def positive(cfg: dict, *keys: str) -> None:
    for key in keys:
        require(cfg, key, lambda v: v > 0, "a number > 0")


def non_negative(cfg: dict, *keys: str) -> None:
    for key in keys:
        require(cfg, key, lambda v: v >= 0, "a number >= 0")
