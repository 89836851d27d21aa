"""`unlearnkit prepare tofu`: fine-tune and cache the TOFU target and retain models."""
from __future__ import annotations

from .cli_common import add_format_args, add_log_args, add_model_args, add_train_args, prompt_format, train_config


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="fine-tune and cache TOFU target + retain models")
    psub = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    t = psub.add_parser("tofu", help="TOFU: target (forget+retain authors) and retain (retain authors) models")
    t.add_argument("--split", default="mini", choices=["forget01", "forget05", "forget10", "mini"])
    t.add_argument("--force", action="store_true", help="re-train even if cached")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(t)
    add_format_args(t)
    add_train_args(t, defaults="finetune")
    add_log_args(t)
    t.set_defaults(func=run)


def run(args) -> int:
    from .cli_common import check_model_args, log_options
    from .prepare import prepare_tofu

    cfg = train_config(args, "finetune")  # TrainConfig validates the numbers before anything is loaded
    check_model_args(args)
    paths = prepare_tofu(args.split, args.model, cfg, prompt_format(args), args.max_length, dtype=args.dtype,
                         device=args.device, force=args.force, trust_remote_code=args.trust_remote_code,
                         progress=not args.quiet, logs=log_options(args))
    for role, path in paths.items():
        print(f"{role}\t{path}")
    return 0
