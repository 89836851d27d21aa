"""`sweep`: one unlearning run per grid point, each evaluated, and the forget-quality / model-utility frontier.

Comparing methods means comparing frontiers, not single points. A sweep shares what separate commands would redo:
one loaded copy of the target model (each point trains a fresh in-memory copy), the retain reference (read or
computed once), and — where it is exact — training itself: points that differ only in `epochs` / `max_steps`
under a constant learning rate without warm-up (every method's default schedule) follow the same trajectory, so
one run to the longest is evaluated at each shorter point's last step. The batches of an epoch depend on the seed
and the epoch only, so this equals separate runs (a test checks it); any other schedule trains each point alone.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field

from .errors import UserError

LENGTH_KEYS = ("epochs", "max_steps")


def parse_grid(items: list[str]) -> dict[str, list]:
    """`KEY=V1,V2,...` items (values parsed as YAML) → {key: [values]}; each key once."""
    import yaml

    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,...")
        if key in grid:
            raise UserError(f"--grid {key}: given twice; list all its values in one --grid")
        try:
            grid[key] = [_number(yaml.safe_load(v)) for v in values.split(",")]
        except yaml.YAMLError as e:
            raise UserError(f"--grid {item!r}: a value is not valid YAML ({str(e).splitlines()[0]})") from e
    if not grid:
        raise UserError("--grid: give at least one KEY=V1,V2,...")
    return grid


def _number(value):
    """YAML 1.1 reads 1e-5 as a string; a grid value that is a number is one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class Point:
    name: str
    overrides: dict
    config: dict            # resolved
    group: int = 0          # points of a group share one training run
    total_steps: int = 0
    summary: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def grid_points(method: str, grid: dict[str, list], base: dict | None = None) -> list[Point]:
    """Every combination, resolved (a bad value is an error naming key and value, before any work)."""
    from .unlearning import resolve_config

    points = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        name = ",".join(f"{k}={v}" for k, v in overrides.items())
        try:
            config = resolve_config(method, {**(base or {}), **overrides})
        except UserError as e:
            raise UserError(f"--grid point {name}: {e}") from None
        points.append(Point(name, overrides, config))
    return points


def shares_trajectory(config: dict) -> bool:
    """A run's first k steps do not depend on its length: constant learning rate, no warm-up."""
    return config["schedule"] == "constant" and config["warmup_ratio"] == 0


def group_points(points: list[Point], steps_of) -> list[list[Point]]:
    """Groups of points trained as one run; steps_of(config) → the point's number of optimizer steps."""
    groups: dict = {}
    for p in points:
        p.total_steps = steps_of(p.config)
        key = (repr(sorted((k, v) for k, v in p.config.items() if k not in LENGTH_KEYS))
               if shares_trajectory(p.config) else p.name)
        groups.setdefault(key, []).append(p)
    out = list(groups.values())
    for g, members in enumerate(out):
        for p in members:
            p.group = g
    return out


def run_sweep(base_model, tokenizer, method: str, points: list[Point], forget, retain, evaluate, *,
              fmt=None, progress: bool = True, share: bool = True, on_point=None) -> list[Point]:
    """Train and evaluate every point; `evaluate(model) -> SUMMARY dict`. base_model is never changed.

    share=False trains every point on its own (the reference the sharing is tested against)."""
    from .data.format import PromptFormat
    from .unlearning import total_steps, unlearn

    fmt = fmt or PromptFormat()
    steps_of = lambda config: total_steps(tokenizer, method, forget, retain, config, fmt)

    groups = group_points(points, steps_of) if share else [[p] for p in points]
    if not share:
        for g, p in enumerate(points):
            p.group, p.total_steps = g, steps_of(p.config)
    for members in groups:
        longest = max(members, key=lambda p: p.total_steps)
        at_step = {}
        for p in members:
            at_step.setdefault(p.total_steps, []).append(p)
        t0 = time.perf_counter()
        model = copy.deepcopy(base_model)

        class Snapshot:  # evaluate the shorter points on the way (a Monitor-like callback, no rule)
            def start(self, total_steps):
                pass

            def bind(self, model, params):
                self.model = model

            def on_step(self, step, entry):
                for p in at_step.get(step, []):
                    if p is not longest:
                        _evaluate_point(self.model, p, evaluate, entry, t0, shared=True)
                        if on_point:
                            on_point(p)

            def finish(self, last_step):
                return None

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass

        config = dict(longest.config)
        info = unlearn(model, tokenizer, method, forget, retain, config, fmt=fmt, progress=progress,
                       monitor=Snapshot() if len(members) > 1 else None)
        model = info.pop("model")
        for p in at_step[longest.total_steps]:
            _evaluate_point(model, p, evaluate, info["steps"][-1], t0, shared=len(members) > 1)
            if on_point:
                on_point(p)
        del model
    return points


def _evaluate_point(model, point: Point, evaluate, entry: dict, t0: float, shared: bool) -> None:
    import torch

    was_training = model.training
    model.eval()
    t1 = time.perf_counter()
    try:
        with torch.no_grad():
            point.summary = evaluate(model)
    finally:
        model.train(was_training)
    point.info = {"steps": point.total_steps, "final_loss": entry.get("loss"), "shared_run": shared,
                  "train_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}


def pareto(points: list[dict], x: str = "model_utility", y: str = "forget_quality") -> list[str]:
    """Names of the points no other point beats on both x and y (higher is better on both)."""
    ok = [p for p in points if _finite(p["summary"].get(x)) and _finite(p["summary"].get(y))]
    front = []
    for p in ok:
        px, py = p["summary"][x], p["summary"][y]
        if not any(q["summary"][x] >= px and q["summary"][y] >= py and (q["summary"][x] > px or q["summary"][y] > py)
                   for q in ok):
            front.append(p["name"])
    return front


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
