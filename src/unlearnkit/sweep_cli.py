"""`unlearnkit sweep --method M --grid KEY=V1,V2 ... --split mini --out DIR`: the command-line face of sweep.py.

Writes OUT/SWEEP.json (settings, every point's overrides, steps, SUMMARY and timing, the Pareto set), OUT/points/
<name>/SUMMARY.json + EVAL.json, and OUT/FRONTIER.png (forget quality against model utility, Pareto set joined,
the retain model and the target as reference points when their logs are given)."""
from __future__ import annotations

import time
from pathlib import Path

from .cli_common import add_format_args, add_model_args, check_model_args, prompt_format

KIND = "sweep"


def add_commands(sub) -> None:
    from . import methods

    p = sub.add_parser("sweep", help="one run per grid point, each evaluated: the forget-quality / utility frontier")
    p.add_argument("--method", required=True, choices=list(methods.METHODS))
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="config key and its values (repeatable: the points are every combination)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed config override")
    add_model_args(p)
    p.add_argument("--split", default="mini", choices=["mini", "forget01", "forget05", "forget10"])
    add_format_args(p)
    p.add_argument("--retain-log", default=None, metavar="EVAL.json", help="the retain model's `eval tofu` log "
                   "(default: the split's prepared retain model is evaluated once, teacher-forced, forget + holdout)")
    p.add_argument("--target-log", default=None, metavar="EVAL.json",
                   help="the target's `eval tofu` log: drawn as a reference point")
    p.add_argument("--max-new-tokens", type=int, default=200, help="greedy answer length (ROUGE, model utility)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each set (quick runs)")
    p.add_argument("--no-share", action="store_true", help="train every point on its own, even where a shorter "
                   "point is a prefix of a longer one (same results, slower; for checking)")
    p.add_argument("--out", required=True, help="output folder: new, empty, or an earlier sweep output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from .data import tofu
    from .eval.aggregate import load_log
    from .eval.limits import at_least
    from .eval.tofu import evaluate_tofu, limit_task, write_eval
    from .files import check_out_dir, write_folder, write_json_atomic
    from .methods.cli import parse_sets
    from .sweep import grid_points, pareto, parse_grid, run_sweep

    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    at_least(args.batch_size, 1, "--batch-size")
    at_least(args.limit, 1, "--limit", none_ok=True)
    check_model_args(args)
    grid = parse_grid(args.grid)
    base = parse_sets(args.set)
    points = grid_points(args.method, grid, base)
    inputs = [p for p in (args.model, args.retain_log, args.target_log) if p and Path(p).exists()]
    out = check_out_dir(args.out, KIND, inputs=inputs)
    fmt = prompt_format(args)
    task = limit_task(tofu.task(args.split), args.limit)
    reference = load_log(args.retain_log) if args.retain_log else None
    target = load_log(args.target_log) if args.target_log else None

    from .models import load_model
    from .prepare import prepare_tofu

    paths = prepare_tofu(args.split, args.model, fmt=fmt, max_length=args.max_length, dtype=args.dtype,
                         device=args.device, progress=not args.quiet)
    t0 = time.perf_counter()
    if reference is None:  # computed once for every point: what separate commands would each need a log for
        retain_model, tok = load_model(str(paths["retain"]), dtype=args.dtype, device=args.device)
        reference = evaluate_tofu(retain_model, tok, task, fmt=fmt, generate=False, batch_size=args.batch_size,
                                  only_sets=("forget", "holdout"), progress=not args.quiet)
        del retain_model
    base_model, tokenizer = load_model(str(paths["target"]), dtype=args.dtype, device=args.device)
    last, done = [], {}

    def evaluate(model) -> dict:
        last[:] = [evaluate_tofu(model, tokenizer, task, retain_reference=reference, fmt=fmt,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 progress=not args.quiet)]
        return last[0]["summary"]

    def on_point(p) -> None:  # right after evaluate(): the point's whole EVAL
        done[p.name] = last[0]
        print(f"[sweep] {p.name}: {p.total_steps} steps, forget_quality {_fmt(p.summary.get('forget_quality'))}, "
              f"model_utility {_fmt(p.summary.get('model_utility'))}", flush=True)

    run_sweep(base_model, tokenizer, args.method, points, task.forget, task.retain_train_for_unlearning, evaluate,
              fmt=fmt, progress=not args.quiet, share=not args.no_share, on_point=on_point)
    rows = [{"name": p.name, "overrides": p.overrides, "group": p.group, **p.info, "summary": p.summary}
            for p in points]
    front = pareto(rows)
    doc = {"method": args.method, "split": args.split, "grid": grid,
           "fixed": {k: points[0].config[k] for k in base}, "shared_training":
           not args.no_share, "seconds": time.perf_counter() - t0, "points": rows, "pareto": front,
           "retain_reference": args.retain_log or "the prepared retain model, evaluated once",
           "target": target["summary"] if target and "summary" in target else None}

    def write(tmp: Path) -> None:
        for p in points:
            write_eval(tmp / "points" / point_folder(p.name), done[p.name])
        write_json_atomic(tmp / "SWEEP.json", doc)
        frontier_figure(rows, front, tmp / "FRONTIER.png", reference=reference.get("summary"),
                        target=doc["target"], title=f"{args.method} on {args.split}: forget quality vs utility")

    write_folder(out, KIND, write)
    print(f"{'point':<40} {'steps':>6} {'FQ':>10} {'MU':>8}  pareto")
    for r in rows:
        s = r["summary"]
        print(f"{r['name'][:40]:<40} {r['steps']:>6} {_fmt(s.get('forget_quality')):>10} "
              f"{_fmt(s.get('model_utility')):>8}  {'*' if r['name'] in front else ''}")
    print(f"wrote {out / 'SWEEP.json'} and {out / 'FRONTIER.png'}")
    return 0


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}"


def point_folder(name: str) -> str:
    """The folder of a point under OUT/points/ (its name, with unsafe characters replaced)."""
    import re

    return re.sub(r"[^A-Za-z0-9._=,-]+", "_", name)


def frontier_figure(rows, front, path, reference=None, target=None, title=""):
    from .plots import PALETTE, REFERENCE_STYLE, pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    ok = [r for r in rows if r["summary"].get("forget_quality") and r["summary"].get("model_utility") is not None]
    for r in ok:
        on = r["name"] in front
        ax.scatter(r["summary"]["model_utility"], r["summary"]["forget_quality"], s=36 if on else 22,
                   color=PALETTE[0] if on else "#9ecae1", zorder=3)
        ax.annotate(r["name"], (r["summary"]["model_utility"], r["summary"]["forget_quality"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    line = sorted((r["summary"]["model_utility"], r["summary"]["forget_quality"]) for r in ok if r["name"] in front)
    if len(line) > 1:
        ax.plot(*zip(*line), color=PALETTE[0], label="Pareto set")
    for name, s in (("target", target), ("retain", reference)):
        if s and s.get("model_utility") is not None:
            ax.axvline(s["model_utility"], **REFERENCE_STYLE[name], label=f"{name} model utility")
    if target and target.get("forget_quality"):
        ax.axhline(target["forget_quality"], **REFERENCE_STYLE["target"], label="target forget quality")
    ax.set_yscale("log")
    ax.set_xlabel("model utility (higher is better)")
    ax.set_ylabel("forget quality, KS p-value (log; higher is better)")
    if not ok:
        ax.text(0.5, 0.5, "no point has both forget quality and model utility", ha="center", transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    if title:
        ax.set_title(title)
    return save(fig, path)
