"""`unlearnkit demo`: the whole TOFU story on the default model — prepare mini TOFU (cached), unlearn, evaluate
target / retain / unlearned, write a run folder, print a summary table."""
from __future__ import annotations


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="prepare mini TOFU, unlearn, evaluate, report (default model, CPU-sized)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--model", default=None, help="base model (default: offline SmolLM2-135M-Instruct)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .prepare import prepare_tofu

    paths = prepare_tofu("mini", args.model)
    for role, path in paths.items():
        print(f"{role}\t{path}")
    return 0
