"""`unlearnkit bench ...`: speed/memory comparisons measured within one run, printed as ratios.

Each bench module adds one subcommand; every bench accepts --json PATH and writes its figures there.
"""
from __future__ import annotations

import json
from pathlib import Path


def add_bench_commands(sub) -> None:
    from . import eco, eval as eval_bench, finetune, npo, rmu, serve

    p = sub.add_parser("bench", help="benchmarks: ratios measured in one run (--json PATH writes the figures)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for module in (finetune, eval_bench, rmu, npo, eco, serve):
        module.add_command(bsub)


def add_json_arg(p) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to this JSON file")


def emit(figures: dict, json_path: str | None) -> None:
    """Print the figures as a table and write them to --json."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(figures, indent=1))
