"""`unlearnkit bench allocator`: one `eval tofu` with glibc's malloc as it is against the same command with freed
memory kept in the process (allocator.py, UNLEARNKIT_MALLOC=keep), alternated in fresh processes in one run.

The figures: each setting's best and mean wall time, its minor page faults and kernel (system) seconds per run
(getrusage of the child), speedup = default ÷ keep on the means, and the largest difference between the two
settings' SUMMARY.json numbers (0 expected: the allocator changes where memory comes from, not any value)."""
from __future__ import annotations

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("allocator", help="eval tofu with glibc's malloc as it is vs freed memory kept in the "
                        "process (UNLEARNKIT_MALLOC=keep): wall time, page faults")
    p.add_argument("--split", default="forget01", choices=["mini", "forget01", "forget05", "forget10"])
    p.add_argument("--model", default=None, help="model folder (default: the offline SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=40, help="evaluate the first N rows of each set (default 40)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternated (default 2)")
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from ..allocator import ENV
    from ..eval.limits import at_least

    at_least(args.limit, 1, "--limit")
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    at_least(args.repeats, 1, "--repeats")
    cmd = [sys.executable, "-m", "unlearnkit.cli", "eval", "tofu", "--split", args.split, "--limit", str(args.limit),
           "--max-new-tokens", str(args.max_new_tokens), "--quiet"]
    cmd += (["--model", args.model] if args.model else []) + (["--device", args.device] if args.device else [])
    runs: dict[str, list[dict]] = {"default": [], "keep": []}
    with tempfile.TemporaryDirectory(prefix="unlearnkit-bench-allocator-") as tmp:
        for r in range(args.repeats):
            for mode in runs:
                out = Path(tmp) / f"{mode}{r}"
                env = {**os.environ, ENV: mode}
                for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):  # both sides start from glibc's own
                    env.pop(v, None)
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL)
                _, status, usage = os.wait4(proc.pid, 0)
                seconds = time.perf_counter() - t0
                if os.waitstatus_to_exitcode(status) != 0:
                    raise RuntimeError(f"bench allocator: {' '.join(cmd)} failed ({ENV}={mode})")
                runs[mode].append({"seconds": seconds, "minflt": usage.ru_minflt, "sys": usage.ru_stime,
                                   "summary": json.loads((out / "SUMMARY.json").read_text())})
    mean = {m: sum(x["seconds"] for x in v) / len(v) for m, v in runs.items()}
    first = runs["default"][0]["summary"]
    diff = max((abs(x["summary"][k] - v) for x in runs["keep"] + runs["default"] for k, v in first.items()
                if _number(v) and _number(x["summary"].get(k))), default=0.0)
    figures = {"runs_per_setting": args.repeats}
    for m, v in runs.items():
        figures.update({f"{m}_mean_seconds": mean[m], f"{m}_best_seconds": min(x["seconds"] for x in v),
                        f"{m}_minor_faults": sum(x["minflt"] for x in v) // len(v),
                        f"{m}_system_seconds": sum(x["sys"] for x in v) / len(v)})
    figures.update({"speedup": mean["default"] / mean["keep"], "max_summary_difference": diff})
    emit(figures, args.json, bench="allocator")
    return 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
