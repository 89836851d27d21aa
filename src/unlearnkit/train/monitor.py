"""In-training evaluation and checkpoint selection.

Every `every` optimizer steps (and at the last step) the monitor runs a cheap evaluation — any function of the
model returning {metric: number}, e.g. TOFU's teacher-forced forget/retain numbers — and records it in the step's
log entry (so it is saved with the run and survives a resume). With a `KeepRule` it also remembers the trained
parameters of the best evaluated step; `finish` puts them back, so the saved model is the selected one, and says
which step that was.

Rule syntax (`--keep`): `last` (default), or `best:METRIC[,CONSTRAINT...]` where METRIC is a known metric (its
direction is known: forget_quality higher is better, forget_prob lower, ...) or `max:NAME` / `min:NAME`, and each
CONSTRAINT is `NAME>=X`, `NAME<=X`, `NAME>X` or `NAME<X`. Example: `best:forget_quality,retain_prob>=0.9` keeps the
step with the highest forget quality among those whose retain p(a|q) is at least 0.9.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import UserError

DIRECTIONS = {"forget_quality": "max", "forget_prob": "min", "forget_truth_ratio": "max", "retain_prob": "max",
              "retain_truth_ratio": "max", "model_utility": "max", "forget_rougeL_recall": "min",
              "retain_rougeL_recall": "max"}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w]*)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class KeepRule:
    metric: str
    direction: str                        # max | min
    constraints: tuple = ()               # ((name, op, value), ...)
    text: str = ""

    @classmethod
    def parse(cls, text: str | None) -> "KeepRule | None":
        """None for `last` / None; else the rule (a one-line error naming the bad part)."""
        if text is None or text.strip() == "last":
            return None
        if not text.startswith("best:"):
            raise UserError(f"--keep {text!r}: expected last or best:METRIC[,NAME>=X...]")
        head, *rest = [p.strip() for p in text[len("best:"):].split(",")]
        direction, _, name = head.rpartition(":")
        if direction and direction not in ("max", "min"):
            raise UserError(f"--keep {text!r}: {direction!r} is not max or min")
        if not direction:
            if name not in DIRECTIONS:
                raise UserError(f"--keep {text!r}: unknown metric {name!r}; use one of {', '.join(DIRECTIONS)} or "
                                "max:NAME / min:NAME")
            direction = DIRECTIONS[name]
        constraints = []
        for part in rest:
            m = _CONSTRAINT.match(part)
            if not m:
                raise UserError(f"--keep {text!r}: constraint {part!r} is not NAME>=X, NAME<=X, NAME>X or NAME<X")
            try:
                value = float(m.group(3))
            except ValueError:
                raise UserError(f"--keep {text!r}: {m.group(3)!r} is not a number") from None
            constraints.append((m.group(1), m.group(2), value))
        return cls(name, direction, tuple(constraints), text)

    def names(self) -> set[str]:
        return {self.metric} | {c[0] for c in self.constraints}

    def admissible(self, metrics: dict) -> bool:
        return all(_finite(metrics.get(n)) and _OPS[op](metrics[n], v) for n, op, v in self.constraints)

    def better(self, metrics: dict, best: dict | None) -> bool:
        value = metrics.get(self.metric)
        if not _finite(value) or not self.admissible(metrics):
            return False
        if best is None:
            return True
        return value > best[self.metric] if self.direction == "max" else value < best[self.metric]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Monitor:
    """Feed `on_step` to the training loop (and `self` as its extra_state, so a resume keeps the best step)."""
    evaluate: Callable[[torch.nn.Module], dict]
    every: int
    total_steps: int | None = None
    keep: KeepRule | None = None
    model: torch.nn.Module | None = None
    params: list = field(default_factory=list)   # (name, parameter) of what training changes
    before: dict | None = None                   # the evaluation at step 0
    best_step: int | None = None
    best_metrics: dict | None = None
    best_params: dict | None = None

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise UserError(f"--eval-every: must be a whole number >= 1 (got {self.every!r})")

    def bind(self, model, named_params: list) -> None:
        self.model, self.params = model, list(named_params)

    def run_eval(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return dict(self.evaluate(self.model))
        finally:
            self.model.train(was_training)

    def start(self, total_steps: int) -> None:
        self.total_steps = total_steps
        if self.before is None:  # a resumed run keeps the evaluation made before its first step
            self.before = self.run_eval()

    def on_step(self, step: int, entry: dict) -> None:
        if step % self.every and step != self.total_steps:
            return
        metrics = self.run_eval()
        entry["eval"] = metrics
        if self.keep is not None and self.keep.better(metrics, self.best_metrics):
            self.best_step, self.best_metrics = step, metrics
            self.best_params = {n: p.detach().to("cpu", copy=True) for n, p in self.params}

    # extra_state of the training loop's checkpoint
    def state_dict(self) -> dict:
        return {"before": self.before, "best_step": self.best_step, "best_metrics": self.best_metrics,
                "best_params": self.best_params}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.best_step = state.get("before"), state.get("best_step")
        self.best_metrics, self.best_params = state.get("best_metrics"), state.get("best_params")

    def finish(self, last_step: int) -> dict:
        """Restore the best step's parameters (when a rule selected one); the record for run.json."""
        record = {"eval_every": self.every, "before": self.before, "rule": self.keep.text if self.keep else "last"}
        if self.keep is None:
            return {**record, "kept_step": last_step}
        if self.best_params is None:
            return {**record, "kept_step": last_step,
                    "note": "no evaluated step satisfied the rule: the last step's model is kept"}
        names = dict(self.params)
        with torch.no_grad():
            for n, value in self.best_params.items():
                names[n].copy_(value.to(names[n].device))
        return {**record, "kept_step": self.best_step, "kept_metrics": self.best_metrics}
