"""`unlearnkit bench ...`: speed/memory comparisons measured within one run, printed as ratios.

Each bench module adds one subcommand; every bench accepts --json PATH and writes its figures there. Inputs
(--json, --device, --model) are checked before a bench starts: benches take minutes.
"""
from __future__ import annotations

import functools

JSON_KEY = "bench"  # every figures file we write holds it: only such a file is ever overwritten


def add_bench_commands(sub) -> None:
    from . import allocator, eco, eval as eval_bench, eval_tofu, finetune, fsdp, gcg, generate, npo, rmu, serve, sweep

    p = sub.add_parser("bench", help="benchmarks: ratios measured in one run (--json PATH writes the figures)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for module in (allocator, finetune, eval_bench, eval_tofu, generate, rmu, npo, fsdp, eco, serve, gcg, sweep):
        module.add_command(bsub)
    for parser in bsub.choices.values():
        run = parser.get_default("func")
        if run is not None:
            parser.set_defaults(func=_checked_first(run))


def _checked_first(run):
    @functools.wraps(run)
    def checked(args):
        check_args(args)
        return run(args)

    return checked


def check_args(args) -> None:
    """The cheap checks every bench needs before it starts: --json, --device and --model (when it has them)."""
    from ..cli_common import check_model_args

    check_json_arg(getattr(args, "json", None))
    check_model_args(args)


def add_json_arg(p) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to this JSON file (an existing "
                   "file is replaced only if it holds figures of an earlier bench)")


def check_json_arg(json_path: str | None) -> None:
    """--json: a file path (not a folder) in a writable place; an existing file only if an earlier bench wrote it."""
    if json_path:
        from ..files import check_out_file

        check_out_file(json_path, option="--json", key=JSON_KEY)


def emit(figures: dict, json_path: str | None, bench: str | None = None) -> None:
    """Print the figures as a table and write them to --json (atomically, with a "bench" key naming the bench)."""
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if json_path:
        from ..files import write_json_atomic

        check_json_arg(json_path)  # again: the file may have appeared while the bench ran
        write_json_atomic(json_path, {JSON_KEY: bench or "unlearnkit", **figures})
