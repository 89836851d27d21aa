"""`unlearnkit report RUN_DIR... --out DIR`: every input checked (folders and their kinds, reference logs, the output
folder) before anything is written; the report folder is written aside and published whole (files.py rules)."""
from __future__ import annotations

from pathlib import Path

KIND = "report"


def add_commands(sub) -> None:
    from .kinds import describe

    p = sub.add_parser("report", help="HTML + Markdown report with figures over unlearn runs, evaluations, attacks, "
                       "analyses, sweeps and demos",
                       description="Finds what each folder holds — " + describe() + " — (a folder of none of these: "
                       "the folders of known kinds inside it) and writes DIR/report.html (self-contained: figures "
                       "embedded, no network, no script) and DIR/report.md with its PNG figures beside it.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folder of an unlearnkit command, or a folder "
                   "holding several")
    p.add_argument("--out", required=True, help="report folder: new, empty, or an earlier report (replaced)")
    p.add_argument("--retain-log", default=None, metavar="EVAL.json", help="the retain model's `eval tofu` log: the "
                   "reference of models that have none of their own (truth-ratio histograms, reference points)")
    p.add_argument("--target-log", default=None, metavar="EVAL.json", help="the target's `eval tofu` log: drawn as "
                   "the target reference")
    p.add_argument("--title", default=None, help="report title (default: unlearnkit report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.aggregate import load_log
    from ..files import check_out_dir, write_folder
    from .build import write_report
    from .collect import find

    items = find(args.runs)
    for option, path in (("--retain-log", args.retain_log), ("--target-log", args.target_log)):
        if path is not None:
            if not Path(path).exists():
                from ..errors import UserError

                raise UserError(f"{option} {path}: no such file or folder")
            load_log(path)  # a bad log fails now, not after the figures
    inputs = [i.path for i in items] + [p for p in (args.retain_log, args.target_log) if p]
    out = check_out_dir(args.out, KIND, inputs=inputs)
    written = {}

    def write(tmp: Path) -> None:
        written["html"] = write_report(items, tmp, title=args.title, retain_log=args.retain_log,
                                       target_log=args.target_log)

    write_folder(out, KIND, write)
    kinds = sorted({i.kind.title.lower() for i in items})
    print(f"report over {len(items)} folder{'s' if len(items) != 1 else ''} ({', '.join(kinds)}): "
          f"{out / 'report.html'} and {out / 'report.md'}")
    return 0
