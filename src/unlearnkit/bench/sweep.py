"""`unlearnkit bench sweep`: a sweep's wall time against the same points run as separate commands.

Both sides run as fresh processes, in one bench run, on the same prepared models: the sweep (`unlearnkit sweep`)
and, for the separate workflow, one `eval tofu` of the retain model (the retain log every point needs), then per
point `unlearnkit unlearn` + `unlearnkit eval tofu`. speedup = separate ÷ sweep. The per-point forget quality and
model utility of both sides are compared too (same numbers expected: `max_summary_difference`)."""
from __future__ import annotations

from . import add_json_arg, emit


def add_command(bsub) -> None:
    p = bsub.add_parser("sweep", help="sweep vs the same points as separate unlearn + eval commands: wall time")
    p.add_argument("--method", default="simnpo")
    p.add_argument("--grid", action="append", default=None, metavar="KEY=V1,V2",
                   help="default: epochs=1,2 and lr=5e-5,1e-4")
    p.add_argument("--split", default="mini", choices=["mini", "forget01", "forget05", "forget10"])
    p.add_argument("--model", default=None, help="base model (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows of each set only")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--device", default=None)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from ..eval.limits import at_least
    from ..prepare import prepare_tofu
    from ..sweep import grid_points, parse_grid

    at_least(args.limit, 1, "--limit", none_ok=True)
    at_least(args.max_new_tokens, 1, "--max-new-tokens")
    grid_args = args.grid or ["epochs=1,2", "lr=5e-5,1e-4"]
    points = grid_points(args.method, parse_grid(grid_args))
    paths = prepare_tofu(args.split, args.model, device=args.device)  # both sides start from the cached models
    cli = [sys.executable, "-m", "unlearnkit.cli"]
    extra = (["--limit", str(args.limit)] if args.limit else []) + (["--device", args.device] if args.device else [])
    common = ["--split", args.split, "--quiet", "--max-new-tokens", str(args.max_new_tokens), *extra]
    model = ["--model", args.model] if args.model else []

    def timed(cmd) -> float:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="unlearnkit-bench-sweep-") as tmp:
        tmp = Path(tmp)
        grid = [g for item in grid_args for g in ("--grid", item)]
        sweep_seconds = timed(cli + ["sweep", "--method", args.method, *grid, *model, *common,
                                     "--out", str(tmp / "sweep")])
        separate = timed(cli + ["eval", "tofu", "--model", str(paths["retain"]), "--split", args.split, "--quiet",
                                "--no-generate", *extra, "--out", str(tmp / "retain")])
        for i, p in enumerate(points):
            sets = [s for k, v in p.overrides.items() for s in ("--set", f"{k}={v}")]
            separate += timed(cli + ["unlearn", "--method", args.method, "--split", args.split, *model, *sets,
                                     "--quiet", "--no-tensorboard", "--out", str(tmp / f"p{i}")]
                              + (["--device", args.device] if args.device else []))
            separate += timed(cli + ["eval", "tofu", "--model", str(tmp / f"p{i}"), *common,
                                     "--retain-log", str(tmp / "retain" / "EVAL.json"), "--out", str(tmp / f"e{i}")])
        swept = json.loads((tmp / "sweep" / "SWEEP.json").read_text())["points"]
        diff = 0.0
        for i, row in enumerate(swept):
            alone = json.loads((tmp / f"e{i}" / "SUMMARY.json").read_text())
            for key in ("forget_quality", "model_utility", "forget_prob"):
                a, b = row["summary"].get(key), alone.get(key)
                if a is not None and b is not None:
                    diff = max(diff, abs(a - b))
    emit({"points": len(points), "sweep_seconds": sweep_seconds, "separate_seconds": separate,
          "speedup": separate / sweep_seconds, "max_summary_difference": diff}, args.json, bench="sweep")
    return 0
