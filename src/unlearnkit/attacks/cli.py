"""`unlearnkit attack {relearn,jailbreak}`: attack unlearned models (and ECO-guarded ones) next to the controls.

Both commands check every input before any work (options, model folders, ECO artifacts, the retain log against the
split, the output folder), run the attack on each subject — the models given, then the controls (retain model:
never saw the forget authors; target: never unlearned) — and write OUT/ATTACK.json (settings, per-subject results,
`summary`), OUT/SAMPLES.json (per-sample values) and a figure, all published whole (files.py rules)."""
from __future__ import annotations

import time
from pathlib import Path

from ..cli_common import add_format_args, check_model_args, prompt_format
from ..errors import UserError
from ..files import check_out_dir, write_folder, write_json_atomic
from .subjects import ECO_NOTE, Subject, named, unique_names

KIND = {"relearn": "attack relearn", "jailbreak": "attack jailbreak"}
CONTROLS = ("retain", "target")


def add_commands(sub) -> None:
    p = sub.add_parser("attack", help="attack unlearned models: relearning, jailbreak / extraction (incl. GCG)")
    asub = p.add_subparsers(dest="attack_command", metavar="ATTACK", required=True)

    r = asub.add_parser("relearn", help="fine-tune on K forget QA; held-out forget metrics every E steps")
    _subject_args(r)
    r.add_argument("--relearn-set", default="random", choices=["random", "shortest"],
                   help="the K relearned QA: a seeded random choice, or the K shortest answers")
    r.add_argument("--n", type=int, default=10, help="K: forget QA relearned (the others are held out)")
    r.add_argument("--steps", type=int, default=20, help="optimizer steps of relearning")
    r.add_argument("--lr", type=float, default=5e-5)
    r.add_argument("--batch-size", type=int, default=4, help="relearning batch size")
    r.add_argument("--eval-every", type=int, default=5, help="score the held-out QA every E steps")
    r.add_argument("--lora-r", type=int, default=0, help="relearn LoRA adapters of this rank (0: all weights)")
    _common_args(r)
    r.set_defaults(func=run_relearn)

    j = asub.add_parser("jailbreak", help="prompt attacks, answer prefill and GCG suffixes on the forget QA")
    _subject_args(j)
    from .jailbreak import ATTACKS

    j.add_argument("--attacks", default="all", help=f"all, or a comma list of: {', '.join(ATTACKS)} (the clean "
                   "question is always scored as the baseline)")
    j.add_argument("--k", type=int, default=3, help="context / icl: the author's other facts shown")
    j.add_argument("--prefill-tokens", type=int, default=8, help="prefill: answer tokens given to the model")
    g = j.add_argument_group("GCG budget (per question: --gcg-n rows; universal: fitted on --gcg-universal-n rows, "
                             "scored on the others)")
    g.add_argument("--gcg-n", type=int, default=5)
    g.add_argument("--gcg-universal-n", type=int, default=5)
    g.add_argument("--gcg-steps", type=int, default=20)
    g.add_argument("--gcg-suffix-len", type=int, default=20)
    g.add_argument("--gcg-top-k", type=int, default=256)
    g.add_argument("--gcg-candidates", type=int, default=64)
    g.add_argument("--gcg-target-tokens", type=int, default=None,
                   help="optimise p of the first N answer tokens only (default: the whole answer)")
    j.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    _common_args(j)
    j.set_defaults(func=run_jailbreak)


def _subject_args(p) -> None:
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]DIR",
                   help="unlearned model folder to attack (repeatable)")
    p.add_argument("--eco", action="append", default=[], metavar="[NAME=]ART",
                   help="ECO artifact (repeatable): attacks --eco-model behind this guard")
    p.add_argument("--eco-model", default=None, metavar="DIR",
                   help="the model the ECO artifacts guard (default: the split's target model)")
    p.add_argument("--split", default="mini", choices=["mini", "forget01", "forget05", "forget10"])
    p.add_argument("--controls", default="retain,target",
                   help="controls attacked the same way: retain,target (default), retain, target or none")
    p.add_argument("--retain-model", default=None, metavar="DIR", help="retain control (default: the split's "
                   "prepared retain model, fine-tuned from --base-model on first use)")
    p.add_argument("--target-model", default=None, metavar="DIR", help="target control (default: the split's "
                   "prepared target model)")
    p.add_argument("--base-model", default=None, help="base model the split's prepared models come from "
                   "(default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--retain-log", default=None, metavar="EVAL.json",
                   help="the retain model's `eval tofu` log of this split: forget quality against its clean values")
    p.add_argument("--limit", type=int, default=None, help="attack only the first N forget rows (quick runs)")


def _common_args(p) -> None:
    add_format_args(p)
    p.add_argument("--max-new-tokens", type=int, default=200, help="greedy answer length (ROUGE-L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier output of this command")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ---- checks and subjects ------------------------------------------------------------------------------------------

def _controls(value: str) -> list[str]:
    if value.strip() == "none":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in CONTROLS]
    if bad or not names:
        raise UserError(f"--controls: unknown value {bad[0] if bad else value!r}; choose retain,target, retain, "
                        "target or none")
    return list(dict.fromkeys(names))


def _subjects(args, controls: list[str]) -> list[Subject]:
    """Given models, ECO subjects, controls; folders checked (cheaply) and artifacts read, nothing loaded."""
    from ..eco import read_artifact
    from ..models import resolve_model_path

    if not args.model and not args.eco:
        raise UserError("nothing to attack: give --model DIR and/or --eco ARTIFACT")
    subjects = []
    for value in args.model:
        name, path = named(value)
        subjects.append(Subject(name, resolve_model_path(path, option="--model")))
    for value in args.eco:
        name, path = named(value)
        read_artifact(path)  # a damaged artifact is refused now: never attack "ECO" without its guard
        subjects.append(Subject(f"eco:{name}", args.eco_model, path))
    for option in ("eco_model", "retain_model", "target_model", "base_model"):
        if getattr(args, option):
            resolve_model_path(getattr(args, option), option="--" + option.replace("_", "-"))
    for role in controls:
        subjects.append(Subject(role, getattr(args, f"{role}_model"), role=role))
    return unique_names(subjects)


def _prepared(args, subjects: list[Subject], fmt) -> list[Subject]:
    """Fill in the split's prepared target/retain folders where a subject needs one (fine-tuned on first use)."""
    need = [s for s in subjects if s.model is None and (s.role in CONTROLS or s.eco)]
    if not need:
        return subjects
    from ..prepare import prepare_tofu

    paths = prepare_tofu(args.split, args.base_model, fmt=fmt, max_length=args.max_length, dtype=args.dtype,
                         device=args.device, progress=not args.quiet)
    fill = lambda s: str(paths["retain" if s.role == "retain" else "target"]) if s.model is None and (
        s.role in CONTROLS or s.eco) else s.model
    return [Subject(s.name, fill(s), s.eco, s.role) for s in subjects]


def _check(args, kind: str):
    """Everything cheap, before any model loads: returns (out, subjects, controls, retain log, forget rows, fmt)."""
    from ..data import tofu
    from ..eval.aggregate import load_log
    from ..eval.limits import at_least

    check_model_args(args, "base_model")
    controls = _controls(args.controls)
    subjects = _subjects(args, controls)
    inputs = [p for s in subjects for p in (s.model, s.eco) if p and Path(p).exists()]
    inputs += [p for p in (args.retain_log, args.eco_model, args.retain_model, args.target_model) if p]
    out = check_out_dir(args.out, kind, inputs=[p for p in inputs if Path(p).exists()])
    fmt = prompt_format(args)
    at_least(args.limit, 1, "--limit", none_ok=True)
    rows = tofu.task(args.split).forget
    rows = rows[:args.limit] if args.limit else rows
    log = None
    if args.retain_log:
        log = load_log(args.retain_log)
        if "forget" not in log["sets"]:
            raise UserError(f"--retain-log {args.retain_log}: has no forget set")
        if log.get("split") not in (None, args.split):
            raise UserError(f"--retain-log {args.retain_log}: is a log of split {log['split']!r}, not {args.split!r}")
        _reference(log, rows)  # every attacked row must be in it
    return out, subjects, controls, log, rows, fmt


def _reference(log, rows):
    from ..eval.aggregate import reference_rows

    return reference_rows(log, rows) if log is not None else None


def _cache(out: Path, args, attack: str, settings: dict):
    """Finished subjects of an earlier, unfinished run with these settings are reused (attacks/partial.py)."""
    from .partial import SubjectCache, input_stamp

    return SubjectCache(out, {"attack": attack, "split": args.split, "limit": args.limit, "seed": args.seed,
                              "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": args.device,
                              "retain_log": input_stamp(args.retain_log), **settings})


def _ident(subject) -> dict:
    from .partial import input_stamp

    return {**subject.describe(), "model_files": input_stamp(subject.model), "eco_files": input_stamp(subject.eco)}


def _load(args, subject):
    from .subjects import load

    return load(subject, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)


def _table(summary: dict, keys, columns) -> str:
    """Rows: subject × column; values formatted, '-' for null."""
    fmt = lambda v: "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    head = f"{'subject':<18} {'':<16} " + " ".join(f"{k:>12}" for k in keys)
    lines = [head]
    for name, per in summary.items():
        for col in columns(per):
            lines.append(f"{name[:18]:<18} {col[:16]:<16} " + " ".join(f"{fmt(per[col].get(k)):>12}" for k in keys))
    return "\n".join(lines)


# ---- relearn ------------------------------------------------------------------------------------------------------

def run_relearn(args) -> int:
    from .relearn import RelearnConfig, relearn_curve, split_forget

    cfg = RelearnConfig(n=args.n, relearn_set=args.relearn_set, steps=args.steps, lr=args.lr,
                        batch_size=args.batch_size, eval_every=args.eval_every, lora_r=args.lora_r, seed=args.seed,
                        max_new_tokens=args.max_new_tokens)
    out, subjects, controls, log, rows, fmt = _check(args, KIND["relearn"])
    cache = _cache(out, args, "relearn", {**vars_of(cfg), "prompt_format": vars(fmt)})
    subjects = _prepared(args, subjects, fmt)
    results, samples, summary = {}, {}, {}
    taught = held = None
    for s in subjects:
        ident = _ident(s)
        saved = cache.get(s.name, ident)
        if saved is None:
            t0 = time.perf_counter()
            model, tokenizer, guard = _load(args, s)
            if taught is None:
                taught, held = split_forget(rows, cfg, tokenizer, fmt)
                reference = _reference(log, held)
            print(f"[attack relearn] {s.name}: relearning {len(taught)} forget QA, {len(held)} held out", flush=True)
            res = relearn_curve(model, tokenizer, taught, held, cfg, reference=reference, guard=guard, fmt=fmt,
                                progress=not args.quiet, split=args.split)
            saved = {"samples": res.pop("samples"), "result": {**s.describe(), **res,
                                                                "seconds": time.perf_counter() - t0},
                     "taught": taught, "held": held}
            cache.put(s.name, ident, saved)
            del model, guard
        else:
            print(f"[attack relearn] {s.name}: reusing its result from {cache.dir}", flush=True)
        if taught is None:
            taught, held = saved["taught"], saved["held"]
            reference = _reference(log, held)
        samples[s.name], results[s.name] = saved["samples"], saved["result"]
    if log is None and "retain" in samples:
        # No retain log: the retain control before relearning is the same reference, measured here.
        from .score import summarize_forget

        reference = samples["retain"]["step_0"]
        for name, res in results.items():
            for point in res["curve"]:
                point.pop("null_reasons", None)
                point.update(summarize_forget(samples[name][f"step_{point['step']}"], reference, args.split))
    for name, res in results.items():
        summary[name] = {f"step_{p['step']}": {k: v for k, v in p.items() if k not in ("step", "eval_seconds")}
                         for p in res["curve"]}
    doc = {"attack": "relearn", "split": args.split, "settings": {**vars_of(cfg), "prompt_format": vars(fmt)},
           "relearn_questions": [r["question"] for r in taught], "heldout_questions": [r["question"] for r in held],
           "forget_quality_reference": ("the retain log's values on the held-out rows" if log is not None else
                                        "the retain control before relearning" if "retain" in samples else None),
           "notes": _notes(subjects), "subjects": results, "summary": summary}

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "ATTACK.json", doc)
        write_json_atomic(tmp / "SAMPLES.json", samples, indent=None)
        from .figures import relearn_figure

        relearn_figure(results, tmp / "RELEARN.png", title=f"Relearning on {len(taught)} forget QA "
                       f"({cfg.relearn_set}), {len(held)} held out — {args.split}")

    write_folder(out, KIND["relearn"], write)
    cache.done()
    print(_table(summary, ("forget_prob", "forget_truth_ratio", "forget_quality", "forget_rougeL_recall",
                           "relearned_prob"), lambda per: [c for c in per]))
    print(f"wrote {out / 'ATTACK.json'}, {out / 'SAMPLES.json'} and {out / 'RELEARN.png'}")
    return 0


def vars_of(obj) -> dict:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else dict(vars(obj))


def _notes(subjects) -> list[str]:
    return [ECO_NOTE] if any(s.eco for s in subjects) else []


# ---- jailbreak ----------------------------------------------------------------------------------------------------

def run_jailbreak(args) -> int:
    from ..eval.limits import at_least
    from .jailbreak import GCG_ATTACKS, AttackContext, attack_model, gcg_plan, parse_attacks
    from .score import summarize_forget

    attacks = parse_attacks(args.attacks)
    for option, low in (("k", 1), ("prefill_tokens", 1), ("gcg_n", 1), ("gcg_universal_n", 1), ("batch_size", 1),
                        ("max_new_tokens", 1)):
        at_least(getattr(args, option), low, "--" + option.replace("_", "-"))
    gcg_cfg = None
    if any(a in GCG_ATTACKS for a in attacks):
        from .gcg import GCGConfig

        gcg_cfg = GCGConfig(suffix_len=args.gcg_suffix_len, top_k=args.gcg_top_k, candidates=args.gcg_candidates,
                            steps=args.gcg_steps, seed=args.seed, target_tokens=args.gcg_target_tokens)
    out, subjects, controls, log, rows, fmt = _check(args, KIND["jailbreak"])
    plan = None
    if gcg_cfg is not None:
        if args.gcg_n > len(rows):
            raise UserError(f"--gcg-n {args.gcg_n}: the forget set has {len(rows)} rows")
        plan = gcg_plan(len(rows), args.gcg_n, args.gcg_universal_n, args.seed)
    cache = _cache(out, args, "jailbreak", {
        "attacks": attacks, "k": args.k, "prefill_tokens": args.prefill_tokens, "batch_size": args.batch_size,
        "prompt_format": vars(fmt), "gcg": vars_of(gcg_cfg) if gcg_cfg else None,
        "gcg_plan": vars_of(plan) if plan else None})
    subjects = _prepared(args, subjects, fmt)
    results, samples = {}, {}
    for s in subjects:
        ident = _ident(s)
        saved = cache.get(s.name, ident)
        if saved is None:
            t0 = time.perf_counter()
            model, tokenizer, guard = _load(args, s)
            ctx = AttackContext(tokenizer, fmt, rows, k=args.k, prefill_tokens=args.prefill_tokens, seed=args.seed)
            print(f"[attack jailbreak] {s.name}: {', '.join(attacks)}", flush=True)
            res = attack_model(model, tokenizer, rows, attacks, ctx, guard=guard, gcg_config=gcg_cfg, plan=plan,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                               progress=not args.quiet)
            saved = {"samples": {a: r.pop("cols") | {"rows": r["rows"]} for a, r in res.items()},
                     "result": {**s.describe(), "attacks": res, "seconds": time.perf_counter() - t0}}
            cache.put(s.name, ident, saved)
            del model, guard
        else:
            print(f"[attack jailbreak] {s.name}: reusing its result from {cache.dir}", flush=True)
        samples[s.name], results[s.name] = saved["samples"], saved["result"]
    # Forget quality under an attack: against the retain model under the same attack when it ran (the attack's
    # own effect cancels), else against the retain log's clean values, else null.
    summary = {}
    for name, per in samples.items():
        summary[name] = {}
        for attack, cols in per.items():
            idx = cols["rows"]
            if "retain" in samples:
                ref = _same_rows(samples["retain"][attack], idx)
                where = "retain model, same attack"
            else:
                ref, where = _reference(log, [rows[i] for i in idx]), "retain log (clean)" if log else None
            summary[name][attack] = {**summarize_forget(cols, ref, args.split), "forget_quality_reference": where}
            if attack in GCG_ATTACKS:  # the clean baseline on the same rows, for a like-for-like comparison
                clean = _same_rows(per["clean"], idx)
                clean_ref = _same_rows(samples["retain"]["clean"], idx) if "retain" in samples else (
                    _reference(log, [rows[i] for i in idx]))
                summary[name][f"clean@{attack}"] = {**summarize_forget(clean, clean_ref, args.split),
                                                    "forget_quality_reference": where}
    settings = {"attacks": attacks, "k": args.k, "prefill_tokens": args.prefill_tokens, "seed": args.seed,
                "max_new_tokens": args.max_new_tokens, "prompt_format": vars(fmt),
                "gcg": vars_of(gcg_cfg) if gcg_cfg else None,
                "gcg_rows": plan.per_question if plan else None,
                "gcg_universal_fit_rows": plan.universal_fit if plan else None}
    doc = {"attack": "jailbreak", "split": args.split, "settings": settings, "notes": _notes(subjects),
           "subjects": results, "summary": summary}

    def write(tmp: Path) -> None:
        write_json_atomic(tmp / "ATTACK.json", doc)
        write_json_atomic(tmp / "SAMPLES.json", samples, indent=None)
        from .figures import jailbreak_figure

        jailbreak_figure(summary, {s.name: s.role for s in subjects}, tmp / "JAILBREAK.png",
                         title=f"Forget p(a|q) under attack — {args.split}")

    write_folder(out, KIND["jailbreak"], write)
    cache.done()
    print(_table(summary, ("forget_prob", "forget_truth_ratio", "forget_quality", "forget_rougeL_recall",
                           "flag_rate"), lambda per: list(per)))
    print(f"wrote {out / 'ATTACK.json'}, {out / 'SAMPLES.json'} and {out / 'JAILBREAK.png'}")
    return 0


def _same_rows(cols: dict, idx: list[int]) -> dict:
    """Columns restricted to the forget rows `idx` (cols carries the row indices it was scored on)."""
    where = {r: k for k, r in enumerate(cols["rows"])}
    return {key: [v[where[i]] for i in idx] for key, v in cols.items()
            if key != "rows" and isinstance(v, list) and len(v) == len(cols["rows"])}
