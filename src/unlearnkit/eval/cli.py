"""`unlearnkit eval {tofu,muse,mcq,aggregate}`: thin wrappers over the Python API.

Every command checks all its input before any work starts (option ranges, model folders, output folder, data,
retain log, sequence lengths against --max-length and the model's context, read from config.json with the tokenizer
only), then writes its results into a temporary folder beside --out and publishes it whole (files.py rules)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_common import add_format_args, add_model_args, check_model_args, prompt_format
from ..errors import UserError
from ..files import check_out_dir, write_folder, write_json_atomic
from .limits import GEN_MEMORY_GB, at_least

BATCH_SIZE = 32  # the evaluators' default too
KIND = {"tofu": "eval tofu", "muse": "eval muse", "mcq": "eval mcq", "aggregate": "eval aggregate"}


def add_commands(sub) -> None:
    p = sub.add_parser("eval", help="evaluate: TOFU, MUSE, multiple choice, or re-aggregate per-sample logs")
    esub = p.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    t = esub.add_parser("tofu", help="TOFU metrics (forget quality, model utility, ROUGE, truth ratio, MIA)")
    add_model_args(t)
    add_format_args(t)  # --max-length: every question + answer must fit (else an error naming set and row)
    t.add_argument("--split", default="mini", help="forget01 | forget05 | forget10 | mini (default: mini)")
    ref = t.add_mutually_exclusive_group()
    ref.add_argument("--retain-model", default=None, help="retain model folder: evaluated too, as the reference "
                     "(its results go to OUT/retain)")
    ref.add_argument("--retain-log", default=None, help="retain model's EVAL.json or TOFU eval logs (file/folder)")
    t.add_argument("--holdout", default=None, help="QA file never trained on (JSON/JSONL/CSV) for MIA; "
                   "default: the split's own (mini has one)")
    _common(t)
    t.add_argument("--truth-ratio", default="tofu", choices=["tofu", "arith", "para_share"],
                   help="truth-ratio variant used in the headline numbers (all are reported)")
    t.add_argument("--es-convention", default=None, choices=["unlearnkit", "open-unlearning"],
                   help="extraction strength when the last answer token misses: 0 (unlearnkit, the default) or "
                        "1/L (open-unlearning's code); docs/evaluation.md")
    t.add_argument("--compat", default="unlearnkit", metavar="{unlearnkit,open-unlearning}",
                   help="open-unlearning: render, label, attend, decode and aggregate exactly as open-unlearning's "
                        "TOFU evaluation, to compare with its numbers (docs/evaluation.md, 'Differences from "
                        "open-unlearning')")
    t.add_argument("--no-generate", action="store_true", help="skip generation (ROUGE and model utility null)")
    t.add_argument("--gen-batch-size", type=int, default=None,
                   help="rows decoded at once (default: as many as fit --gen-memory-gb; --batch-size is the "
                        "teacher-forced batch)")
    t.add_argument("--gen-memory-gb", type=float, default=GEN_MEMORY_GB,
                   help=f"GiB for the decoding batch's KV cache and activations, which sets the default "
                        f"--gen-batch-size (default {GEN_MEMORY_GB:g})")
    t.add_argument("--limit", type=int, default=None, help="evaluate only the first N (>= 1) rows of each set")
    t.set_defaults(func=run_tofu)

    m = esub.add_parser("muse", help="MUSE VerbMem / KnowMem (ROUGE-L F1) on MUSE-layout data")
    add_model_args(m)
    m.add_argument("--data", required=True, help="MUSE data folder (raw/, verbmem/, knowmem/ subfolders)")
    m.add_argument("--max-new-tokens-verbmem", type=int, default=128)
    m.add_argument("--max-new-tokens-knowmem", type=int, default=32)
    m.add_argument("--verbmem-prompt-tokens", type=int, default=None,
                   help="cut VerbMem prompts to their last N tokens (default: as given in the data)")
    m.add_argument("--limit", type=int, default=None, help="evaluate only the first N (>= 1) items of each set")
    m.add_argument("--retain-log", default=None, help="retain model's MUSE EVAL.json (for PrivLeak)")
    _common(m, max_new=False)
    m.set_defaults(func=run_muse)

    q = esub.add_parser("mcq", help="multiple choice accuracy (WMDP/MMLU schema: question, choices, answer)")
    add_model_args(q)
    q.add_argument("--data", required=True, nargs="+", help="JSON/JSONL/CSV files (one subject each, or a "
                   "'subject' field per row)")
    q.add_argument("--subject", default=None, help="subject named in the prompt (default: from file or row)")
    q.add_argument("--limit", type=int, default=None, help="evaluate only the first N (>= 1) items")
    q.add_argument("--retain-log", default=None, help="retain model's `eval mcq` EVAL.json on the same items "
                   "(adds retain_accuracy, accuracy_minus_retain)")
    _common(q, max_new=False)
    q.set_defaults(func=run_mcq)

    a = esub.add_parser("aggregate", help="headline numbers from EVAL.json or original-TOFU eval logs, no model")
    a.add_argument("paths", nargs="+", metavar="EVAL_OR_TOFU_LOG", help="EVAL.json, TOFU log file or folder")
    a.add_argument("--retain-log", default=None, help="retain model's EVAL.json or TOFU logs (forget quality)")
    a.add_argument("--truth-ratio", default="tofu", choices=["tofu", "arith", "para_share"])
    a.add_argument("--out", required=True, help="folder for SUMMARY.json (new, empty, or an earlier "
                   "`eval aggregate` output)")
    a.set_defaults(func=run_aggregate)


def _common(p, max_new: bool = True) -> None:
    p.add_argument("--out", required=True, help="run folder for EVAL.json and SUMMARY.json: new, empty, or an "
                   "earlier output of the same command (replaced)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    if max_new:
        p.add_argument("--max-new-tokens", type=int, default=200,
                       help="greedy answer length; the longest prompt + this must fit the model's context")
    p.add_argument("--eco", default=None, metavar="ART", help="evaluate behind an ECO guard artefact")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # old name


def _inputs(*paths) -> list:
    """The inputs an output folder must stay clear of: those that are paths here (hub ids are not)."""
    return [p for p in paths if p and Path(p).expanduser().exists()]


def _check_eco(args) -> None:
    """A damaged or missing artifact is refused before any model loads (never evaluate without the guard asked for)."""
    if args.eco:
        from ..eco import read_artifact

        read_artifact(args.eco)


def _context(args, option: str):
    """(tokenizer, context length) of the model named by `option`, without loading its weights."""
    from ..models import load_tokenizer
    from .limits import model_context

    path = getattr(args, option)
    flag = "--" + option.replace("_", "-")
    return load_tokenizer(path), model_context(path, args.trust_remote_code, flag)


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
    from .aggregate import check_same_conventions, load_log
    from .tofu import check_lengths, check_options, evaluate_tofu, limit_task, summary_table, task_sets, write_eval

    check_options(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                  truth_ratio=args.truth_ratio, es_convention=args.es_convention, compat=args.compat,
                  gen_batch_size=args.gen_batch_size, gen_memory_gb=args.gen_memory_gb)
    at_least(args.limit, 1, "--limit", none_ok=True)
    check_model_args(args, "model", "retain_model")
    out = check_out_dir(args.out, KIND["tofu"], inputs=_inputs(args.model, args.retain_model, args.retain_log,
                                                                 args.holdout, args.eco))
    _check_eco(args)
    fmt = prompt_format(args)
    holdout = load_qa(args.holdout) if args.holdout else None
    holdout = holdout[:args.limit] if holdout and args.limit else holdout
    task, sets = task_sets(limit_task(tofu.task(args.split), args.limit), holdout)
    reference = load_log(args.retain_log) if args.retain_log else None
    if reference is not None:
        check_same_conventions(args.compat, reference)
    max_new = None if args.no_generate else args.max_new_tokens
    for option in ("retain_model", "model") if args.retain_model else ("model",):
        tok, context = _context(args, option)
        try:
            check_lengths(tok, sets, fmt, max_length=args.max_length, max_new_tokens=max_new, context=context,
                          compat=args.compat)
        except UserError as e:
            if not args.retain_model:
                raise
            # two models, possibly two tokenizers and contexts: say which one
            raise UserError(f"--{option.replace('_', '-')} {getattr(args, option) or '(default)'}: {e}") from e
    kw = dict(fmt=fmt, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
              progress=not args.quiet, holdout=holdout, truth_ratio=args.truth_ratio,
              es_convention=args.es_convention, generate=not args.no_generate, compat=args.compat,
              gen_batch_size=args.gen_batch_size, gen_memory_gb=args.gen_memory_gb)
    rows, timings = {}, {}

    def write(tmp: Path) -> None:
        nonlocal reference
        if args.retain_model:  # the retain model is evaluated without a guard: it is the reference
            model, tok = _load(args, args.retain_model)
            ev = evaluate_tofu(model, tok, task, **kw)
            write_eval(tmp / "retain", ev)
            rows["retain"], reference = ev["summary"], ev
            del model
        model, tok = _load(args, args.model)
        ev = evaluate_tofu(model, tok, task, retain_reference=reference, guard=_guard(args, model, tok),
                           timings=timings, **kw)
        write_eval(tmp, ev)
        rows["model"] = ev["summary"]

    write_folder(out, KIND["tofu"], write)
    print(summary_table({"model": rows["model"], **({"retain": rows["retain"]} if "retain" in rows else {})}))
    print(f"wrote {out / 'EVAL.json'} and {out / 'SUMMARY.json'}" + (f" (retain model: {out / 'retain'})"
                                                                        if args.retain_model else ""))
    # where an evaluation's time goes, without making EVAL.json differ between identical runs
    print(f"model evaluation: teacher-forced {timings['teacher_forced_seconds']:.1f} s, "
          f"generation {timings['generation_seconds']:.1f} s")
    return 0


def run_aggregate(args) -> int:
    from .aggregate import aggregate
    from .tofu import summary_table

    out = check_out_dir(args.out, KIND["aggregate"], inputs=_inputs(*args.paths, args.retain_log))
    summaries = [(p, aggregate(p, args.retain_log, args.truth_ratio)) for p in args.paths]  # all checked first
    rows = {}

    def write(tmp: Path) -> None:
        for i, (p, s) in enumerate(summaries):
            folder = tmp if len(summaries) == 1 else tmp / f"{i}_{Path(p).stem}"
            write_json_atomic(folder / "SUMMARY.json", s)
            rows[Path(p).name or str(p)] = s

    write_folder(out, KIND["aggregate"], write)
    print(summary_table(rows))
    match = {s.get("retain_log_match") for _, s in summaries} - {None}
    if match:
        print(f"retain log matched by {', '.join(sorted(match))} (SUMMARY.json: retain_log_match)")
    print(f"wrote SUMMARY.json under {out}")
    return 0


def run_muse(args) -> int:
    from .muse import check_lengths, check_options, evaluate_muse, load_muse, reference_summary
    from .tofu import write_eval

    check_options(batch_size=args.batch_size, verbmem_tokens=args.max_new_tokens_verbmem,
                  knowmem_tokens=args.max_new_tokens_knowmem, verbmem_prompt_tokens=args.verbmem_prompt_tokens)
    at_least(args.limit, 1, "--limit", none_ok=True)
    check_model_args(args, "model")
    out = check_out_dir(args.out, KIND["muse"], inputs=_inputs(args.model, args.data, args.retain_log, args.eco))
    _check_eco(args)
    data = load_muse(args.data, limit=args.limit)
    reference_summary(args.retain_log)
    tok, context = _context(args, "model")
    check_lengths(tok, data, verbmem_tokens=args.max_new_tokens_verbmem, knowmem_tokens=args.max_new_tokens_knowmem,
                  verbmem_prompt_tokens=args.verbmem_prompt_tokens, context=context)
    evs = {}

    def write(tmp: Path) -> None:
        model, tok = _load(args, args.model)
        evs["model"] = evaluate_muse(model, tok, data, guard=_guard(args, model, tok),
                                     retain_reference=args.retain_log, batch_size=args.batch_size,
                                     progress=not args.quiet, verbmem_tokens=args.max_new_tokens_verbmem,
                                     knowmem_tokens=args.max_new_tokens_knowmem,
                                     verbmem_prompt_tokens=args.verbmem_prompt_tokens)
        write_eval(tmp, evs["model"])

    write_folder(out, KIND["muse"], write)
    _print_summary(evs["model"]["summary"])
    return 0


def run_mcq(args) -> int:
    from .mcq import check_lengths, evaluate_mcq, load_mcq, reference_accuracy
    from .tofu import write_eval

    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.limit, 1, "--limit", none_ok=True)
    check_model_args(args, "model")
    out = check_out_dir(args.out, KIND["mcq"], inputs=_inputs(args.model, *args.data, args.retain_log, args.eco))
    _check_eco(args)
    items = [row for path in args.data for row in load_mcq(path, subject=args.subject)]
    items = items[:args.limit] if args.limit else items
    reference_accuracy(args.retain_log, items)
    tok, context = _context(args, "model")
    check_lengths(tok, items, context=context)
    evs = {}

    def write(tmp: Path) -> None:
        model, tok = _load(args, args.model)
        evs["model"] = evaluate_mcq(model, tok, items, guard=_guard(args, model, tok),
                                    retain_reference=args.retain_log, batch_size=args.batch_size,
                                    progress=not args.quiet)
        write_eval(tmp, evs["model"])

    write_folder(out, KIND["mcq"], write)
    _print_summary(evs["model"]["summary"])
    return 0


def _print_summary(summary: dict) -> None:
    shown = {k: v for k, v in summary.items() if not isinstance(v, (dict, str))}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        print(f"{k:<{width}}  {'-' if v is None else f'{v:.4f}' if isinstance(v, float) else v}")
    for k, why in summary.get("null_reasons", {}).items():
        print(f"  {k}: null ({why})")
