"""`unlearnkit eval {tofu,muse,mcq,aggregate}`: thin wrappers over the Python API."""
from __future__ import annotations

from pathlib import Path

from ..cli_common import add_format_args, add_model_args, prompt_format
from ..errors import UserError


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: TOFU, MUSE, multiple choice, or re-aggregate per-sample logs")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    t = esub.add_parser("tofu", help="TOFU metrics (forget quality, model utility, ROUGE, truth ratio, MIA)")
    add_model_args(t)
    add_format_args(t)
    t.add_argument("--split", default="mini", help="forget01 | forget05 | forget10 | mini (default: mini)")
    ref = t.add_mutually_exclusive_group()
    ref.add_argument("--retain-model", default=None, help="retain model folder: evaluated too, as the reference")
    ref.add_argument("--retain-log", default=None, help="retain model's EVAL.json or TOFU eval logs (file/folder)")
    t.add_argument("--holdout", default=None, help="QA file never trained on (JSON/JSONL/CSV) for MIA; "
                   "default: the split's own (mini has one)")
    _common(t)
    t.add_argument("--truth-ratio", default="tofu", choices=["tofu", "arith", "para_share"],
                   help="truth-ratio variant used in the headline numbers (all are reported)")
    t.add_argument("--no-generate", action="store_true", help="skip generation (ROUGE and model utility null)")
    t.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each set (quick runs)")
    t.set_defaults(func=run_tofu)

    m = esub.add_parser("muse", help="MUSE VerbMem / KnowMem (ROUGE-L F1) on MUSE-layout data")
    add_model_args(m)
    m.add_argument("--data", required=True, help="MUSE data folder (raw/, verbmem/, knowmem/ subfolders)")
    m.add_argument("--max-new-tokens-verbmem", type=int, default=128)
    m.add_argument("--max-new-tokens-knowmem", type=int, default=32)
    m.add_argument("--verbmem-prompt-tokens", type=int, default=None,
                   help="cut VerbMem prompts to this many tokens (default: as given in the data)")
    m.add_argument("--limit", type=int, default=None, help="evaluate only the first N items of each set")
    m.add_argument("--retain-log", default=None, help="retain model's MUSE EVAL.json (for PrivLeak)")
    _common(m, max_new=False)
    m.set_defaults(func=run_muse)

    q = esub.add_parser("mcq", help="multiple choice accuracy (WMDP/MMLU schema: question, choices, answer)")
    add_model_args(q)
    q.add_argument("--data", required=True, nargs="+", help="JSON/JSONL/CSV files (one subject each, or a "
                   "'subject' field per row)")
    q.add_argument("--subject", default=None, help="subject named in the prompt (default: from file or row)")
    q.add_argument("--limit", type=int, default=None)
    _common(q, max_new=False)
    q.set_defaults(func=run_mcq)

    a = esub.add_parser("aggregate", help="headline numbers from EVAL.json or original-TOFU eval logs, no model")
    a.add_argument("paths", nargs="+", metavar="EVAL_OR_TOFU_LOG", help="EVAL.json, TOFU log file or folder")
    a.add_argument("--retain-log", default=None, help="retain model's EVAL.json or TOFU logs (forget quality)")
    a.add_argument("--truth-ratio", default="tofu", choices=["tofu", "arith", "para_share"])
    a.add_argument("--out", required=True, help="folder for SUMMARY.json")
    a.set_defaults(func=run_aggregate)


def _common(p, max_new: bool = True) -> None:
    p.add_argument("--out", required=True, help="run folder for EVAL.json and SUMMARY.json")
    p.add_argument("--batch-size", type=int, default=16)
    if max_new:
        p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--eco", default=None, metavar="ART", help="evaluate behind an ECO guard artefact")
    p.add_argument("--no-progress", action="store_true")


def _load(args, path):
    from ..models import load_model

    return load_model(path, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def _guard(args, model, tokenizer):
    if not args.eco:
        return None
    from ..eco import EcoGuard  # built separately; imported only when asked for

    return EcoGuard.load(args.eco, model, tokenizer, device=str(next(model.parameters()).device))


def run_tofu(args) -> int:
    from ..data import tofu
    from ..data.qa import load_qa
    from .tofu import evaluate_tofu, limit_task, summary_table, write_eval

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    fmt = prompt_format(args)
    holdout = load_qa(args.holdout) if args.holdout else None
    task = limit_task(tofu.task(args.split), args.limit)
    holdout = holdout[:args.limit] if holdout and args.limit else holdout
    kw = dict(fmt=fmt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=not args.no_progress,
              holdout=holdout, truth_ratio=args.truth_ratio, generate=not args.no_generate)
    out, rows = Path(args.out), {}
    reference = args.retain_log
    if args.retain_model:  # the retain model is evaluated without a guard: it is the reference
        model, tok = _load(args, args.retain_model)
        ev = evaluate_tofu(model, tok, task, **kw)
        write_eval(out / "retain", ev)
        rows["retain"], reference = ev["summary"], ev
        del model
    model, tok = _load(args, args.model)
    ev = evaluate_tofu(model, tok, task, retain_reference=reference, guard=_guard(args, model, tok), **kw)
    write_eval(out, ev)
    rows = {"model": ev["summary"], **rows}
    print(summary_table(rows))
    print(f"wrote {out / 'EVAL.json'} and {out / 'SUMMARY.json'}")
    return 0


def run_aggregate(args) -> int:
    from .aggregate import aggregate
    from .tofu import summary_table, write_json_atomic

    out, rows = Path(args.out), {}
    summaries = [(p, aggregate(p, args.retain_log, args.truth_ratio)) for p in args.paths]  # all checked first
    for i, (p, s) in enumerate(summaries):
        folder = out if len(summaries) == 1 else out / f"{i}_{Path(p).stem}"
        write_json_atomic(folder / "SUMMARY.json", s)
        rows[Path(p).name or str(p)] = s
    print(summary_table(rows))
    print(f"wrote SUMMARY.json under {out}")
    return 0


def run_muse(args) -> int:
    from .muse import evaluate_muse, load_muse
    from .tofu import write_eval

    data = load_muse(args.data, limit=args.limit)
    model, tok = _load(args, args.model)
    ev = evaluate_muse(model, tok, data, batch_size=args.batch_size, guard=_guard(args, model, tok),
                       verbmem_tokens=args.max_new_tokens_verbmem, knowmem_tokens=args.max_new_tokens_knowmem,
                       verbmem_prompt_tokens=args.verbmem_prompt_tokens, retain_reference=args.retain_log,
                       progress=not args.no_progress)
    write_eval(args.out, ev)
    _print_summary(ev["summary"])
    return 0


def run_mcq(args) -> int:
    from .mcq import evaluate_mcq, load_mcq
    from .tofu import write_eval

    items = [row for path in args.data for row in load_mcq(path, subject=args.subject)]
    items = items[:args.limit] if args.limit else items
    model, tok = _load(args, args.model)
    ev = evaluate_mcq(model, tok, items, batch_size=args.batch_size, guard=_guard(args, model, tok),
                      progress=not args.no_progress)
    write_eval(args.out, ev)
    _print_summary(ev["summary"])
    return 0


def _print_summary(summary: dict) -> None:
    shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, str))}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        print(f"{k:<{width}}  {'-' if v is None else f'{v:.4f}' if isinstance(v, float) else v}")
    for k, why in summary.get("null_reasons", {}).items():
        print(f"  {k}: null ({why})")
