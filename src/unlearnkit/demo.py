"""`unlearnkit demo`: the whole TOFU story on the default model, sized for a 2-core CPU.

1. prepare mini TOFU: fine-tune the target (forget + retain authors) and the retain model (retain authors) — cached;
2. evaluate the retain and target models — cached next to them;
3. unlearn the forget authors from the target with SimNPO;
4. evaluate the unlearned model against the retain model (forget quality, model utility, ROUGE, MIA);
5. write the run folder and its report (report/report.html, report.md), print the summary table and the
   report's path.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

DEMO_METHOD = "simnpo"
# 10 SimNPO steps (2 epochs of the 40 forget QA, lr 2e-4) instead of the method's 20-step defaults: closer to the
# retain model and cheaper on 2 cores (the comparison is in docs/results.md).
DEMO_CONFIG = {"simnpo": {"epochs": 2.0, "lr": 2e-4}}


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="prepare mini TOFU, unlearn with SimNPO, evaluate, report (CPU-sized)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo); an earlier demo run there "
                   "is replaced, any other non-empty folder is refused")
    p.add_argument("--model", default=None, help="base model (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--method", default=DEMO_METHOD, help="unlearning method (default: simnpo)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--full-retain-eval", action="store_true",
                   help="evaluate the retain model on every set, not only what forget quality needs (~3 CPU min)")
    p.set_defaults(func=run)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _cached_eval(model_dir: Path, task, device, retain_reference=None, full: bool = True,
                 progress: bool = True) -> dict:
    """EVAL of a prepared model, cached beside it (the prepared models never change once written)."""
    from .eval import evaluate_tofu
    from .files import write_json_atomic
    from .models import load_model

    cache = model_dir.parent / f"eval-{model_dir.name}{'' if full else '-reference'}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass  # damaged cache entry: evaluate again and rewrite it
    model, tokenizer = load_model(str(model_dir), device=device)
    result = evaluate_tofu(model, tokenizer, task, retain_reference=retain_reference, generate=full, progress=progress,
                           only_sets=None if full else ("forget", "holdout"))
    write_json_atomic(cache, result, indent=None)
    return result


def check_args(args) -> Path:
    """Every demo input, checked before the first (minutes-long) step: device, model, method, run folder."""
    from .files import check_out_dir
    from .models import cache_dir, check_device, resolve_model_path
    from .unlearning import resolve_config

    check_device(args.device)
    resolve_config(args.method, DEMO_CONFIG.get(args.method))
    inputs = [cache_dir() / "tofu"]  # the prepared models the demo reads
    if args.model not in (None, "", "default", "smollm2-135m"):
        model = Path(resolve_model_path(args.model))
        if model.is_dir():
            inputs.append(model)
    return check_out_dir(args.out, "demo", inputs=inputs)


def run(args) -> int:
    from .data import tofu
    from .eval import evaluate_tofu, summary_table, write_eval
    from .files import publish_dir, temp_dir_beside
    from .models import load_model, save_model
    from .prepare import prepare_tofu
    from .report import find, write_report
    from .unlearning import unlearn

    t0 = time.perf_counter()
    out = check_args(args)
    task = tofu.task("mini")
    _log("1/5 prepare mini TOFU target + retain models (cached after the first run)")
    progress = not args.quiet
    paths = prepare_tofu("mini", args.model, device=args.device, progress=progress)
    _log("2/5 evaluate the retain and target models (cached)")
    # The retain model is the reference for forget quality and PrivLeak: teacher-forced numbers on the forget and
    # holdout sets. Its full evaluation (--full-retain-eval) costs ~3 more CPU minutes on the first run.
    retain_eval = _cached_eval(paths["retain"], task, args.device, full=args.full_retain_eval, progress=progress)
    target_eval = _cached_eval(paths["target"], task, args.device, retain_reference=retain_eval, progress=progress)

    work = temp_dir_beside(out)  # nothing half-written at --out: the run folder appears whole at the end
    try:
        _log(f"3/5 unlearn the forget authors with {args.method}")
        model, tokenizer = load_model(str(paths["target"]), device=args.device)
        # No out_dir: the run folder is fresh each time (nothing to resume), and the demo saves the model itself.
        info = unlearn(model, tokenizer, args.method, task.forget, task.retain_train_for_unlearning,
                       config=DEMO_CONFIG.get(args.method), progress=progress)
        run_info = {k: v for k, v in info.items() if k != "model"}
        save_model(info["model"], tokenizer, work / "unlearned", kind="unlearn",
                   extra_files={"run.json": json.dumps(run_info, indent=1, default=str)})
        _log("4/5 evaluate the unlearned model")
        unlearned_eval = evaluate_tofu(info["model"], tokenizer, task, retain_reference=retain_eval,
                                       progress=progress)
        _log("5/5 write the run folder")
        evals = {"retain": retain_eval, "target": target_eval, f"unlearned ({args.method})": unlearned_eval}
        for name, result in evals.items():
            write_eval(work / "eval" / name.split(" ")[0], result)
        table = summary_table({name: result["summary"] for name, result in evals.items()})
        summary = {"split": "mini", "method": args.method, "models": {k: str(v) for k, v in paths.items()},
                   "unlearned_model": str(out / "unlearned"), "seconds": time.perf_counter() - t0,
                   "summaries": {name: result["summary"] for name, result in evals.items()}}
        (work / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
        (work / "summary.txt").write_text(table + "\n", encoding="utf-8")
        _log("writing the report")
        # Read from the work folder, named as the run folder it becomes; published with it.
        write_report(find([work], labels=[str(out)]), _new_dir(work / "report"), title=f"unlearnkit demo: "
                     f"{args.method} on mini TOFU", labelled=True)
        publish_dir(work, out, "demo")  # re-checks --out: a folder that changed meanwhile is never deleted
    finally:
        shutil.rmtree(work, ignore_errors=True)  # our fresh temporary folder; gone already once published
    print(table)
    print(f"\nrun folder: {out}  (unlearned model: {out / 'unlearned'}; per-sample values: {out}/eval/*/EVAL.json)")
    print(f"total time: {time.perf_counter() - t0:.0f} s")
    print(f"report: {out / 'report' / 'report.html'}  (Markdown beside it: report.md)")
    return 0


def _new_dir(path: Path) -> Path:
    path.mkdir()
    return path
