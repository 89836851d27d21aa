"""`unlearnkit` command line: a thin layer over the Python API. Each area adds its own subcommands."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import demo, plan, prepare_cli, sweep_cli
    from .bench import add_bench_commands
    from .eval.cli import add_commands as add_eval_commands
    from .methods.cli import add_commands as add_unlearn_commands
    from .eco.cli import add_commands as add_eco_commands
    from .serve.cli import add_commands as add_serve_commands
    from .attacks.cli import add_commands as add_attack_commands
    from .analysis.cli import add_commands as add_analysis_commands
    from .report.cli import add_commands as add_report_commands

    parser = _Parser(prog="unlearnkit", description="LLM unlearning: unlearn, evaluate, attack, "
                                     "report. Run `unlearnkit demo` for the whole TOFU story on the default model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    demo.add_commands(sub)
    prepare_cli.add_commands(sub)
    add_bench_commands(sub)
    add_unlearn_commands(sub)
    add_eval_commands(sub)
    add_eco_commands(sub)
    add_serve_commands(sub)
    add_attack_commands(sub)
    sweep_cli.add_commands(sub)
    add_analysis_commands(sub)
    add_report_commands(sub)
    plan.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import provenance
    from .allocator import keep_freed_memory

    provenance.start(sys.argv[1:] if argv is None else list(argv))
    try:
        keep_freed_memory()  # before any tensor; acts only with UNLEARNKIT_MALLOC=keep (allocator.py)
        result = args.func(args)
    except UserError as e:
        print(f"unlearnkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unlearnkit: interrupted", file=sys.stderr)
        return 130
    finally:
        provenance.stop()  # later API calls in this process are not this command
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
