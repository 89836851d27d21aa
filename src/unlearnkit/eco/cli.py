"""`unlearnkit eco fit` and `unlearnkit eco generate`."""
from __future__ import annotations

import json
import sys
import time

from ..cli_common import add_format_args, add_model_args, prompt_format
from .corrupt import CORRUPTIONS


def add_commands(sub) -> None:
    p = sub.add_parser("eco", help="ECO: embedding-corrupted prompts (inference-time unlearning, no weight change)")
    esub = p.add_subparsers(dest="eco_command", metavar="ECO_COMMAND", required=True)

    f = esub.add_parser("fit", help="fit the prompt classifier and corruption strength; write an artifact folder")
    f.add_argument("--out", required=True, help="artifact folder to write: new, empty or an earlier artifact "
                   "(replaced atomically)")
    add_model_args(f)
    add_format_args(f)
    d = f.add_argument_group("data")
    d.add_argument("--split", default="mini", help="TOFU split giving forget + negative prompts (default: mini)")
    d.add_argument("--forget", default=None, help="forget QA file (JSON/JSONL/CSV with question, answer) instead "
                   "of the TOFU forget set; TOFU real_authors/world_facts stay as general negatives")
    d.add_argument("--retain", default=None, help="with --forget: prompts not to flag (file, field 'question')")
    d.add_argument("--negatives", action="append", default=[], metavar="FILE",
                   help="extra prompts not to flag: .txt (one per line) or JSON/JSONL/CSV field 'question'")
    c = f.add_argument_group("classifier and tokens")
    c.add_argument("--target-fpr", type=float, default=0.01, help="false-positive rate tau is calibrated to")
    c.add_argument("--mode", default="entity", choices=["entity", "all"],
                   help="entity: corrupt tokens of forget-target names; all: every prompt token but the last")
    c.add_argument("--entity", action="append", default=None, metavar="NAME",
                   help="forget-target name (repeatable); default: extracted from the forget set")
    c.add_argument("--seed", type=int, default=0)
    s = f.add_argument_group("corruption and search")
    s.add_argument("--corruption", default="rand_noise_first_n", choices=list(CORRUPTIONS))
    s.add_argument("--dims", type=int, default=None, help="dimensions corrupted per token (default: all)")
    s.add_argument("--sigma", type=float, default=None, help="fixed noise strength (skips the search)")
    s.add_argument("--search", default="zo", choices=["zo", "grid", "none"])
    s.add_argument("--metric", default="prob", choices=["prob", "truth_ratio"], help="forget-set metric v")
    s.add_argument("--reference-model", default=None,
                   help="model whose forget-set metric is the target (the retain model); default: the base model")
    s.add_argument("--target-value", type=float, default=None, help="target value of the metric (overrides "
                   "--reference-model; e.g. chance accuracy)")
    s.add_argument("--steps", type=int, default=8, help="zeroth-order steps")
    s.add_argument("--lr", type=float, default=2.0, help="zeroth-order step size (sigma in embedding-std units)")
    s.add_argument("--eps", type=float, default=0.25, help="finite-difference half-width (embedding-std units)")
    s.add_argument("--sigma0", type=float, default=1.0, help="starting sigma (embedding-std units)")
    f.set_defaults(func=run_fit)

    g = esub.add_parser("generate", help="answer a prompt with the guard on")
    g.add_argument("prompt", nargs="+", help="prompt(s)")
    g.add_argument("--eco", required=True, help="ECO artifact folder")
    add_model_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--no-guard", action="store_true", help="answer with the plain model (for comparison)")
    g.set_defaults(func=run_generate)


def _check_ranges(args) -> None:
    import math

    from ..errors import UserError

    if not 0 < args.target_fpr < 1:  # also refuses NaN
        raise UserError(f"--target-fpr: must be in (0, 1), got {args.target_fpr}")
    if args.steps < 0:
        raise UserError(f"--steps: must be >= 0, got {args.steps}")
    for name in ("lr", "eps", "sigma0"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name}: must be a finite number > 0, got {value}")
    if args.target_value is not None and not math.isfinite(args.target_value):
        raise UserError(f"--target-value: must be a finite number, got {args.target_value}")
    if args.max_length < 1:
        raise UserError(f"--max-length: must be >= 1, got {args.max_length}")
    for name in args.entity or ():
        if not name.strip():
            raise UserError("--entity: must be a non-empty name")


def _fit_inputs(args) -> list[str]:
    """Input paths the output folder must stay clear of (models, data files); hub ids are not paths."""
    from pathlib import Path

    paths = [args.model, args.reference_model, args.forget, args.retain, *args.negatives]
    return [p for p in paths if p and Path(p).expanduser().exists()]


def run_fit(args) -> int:
    from ..cli_common import check_model_args
    from ..data.qa import load_qa
    from ..errors import UserError
    from ..files import check_out_dir
    from ..models import load_model
    from .corrupt import CorruptionConfig
    from .fit import fit_eco, read_prompts, stderr_log, tofu_prompt_sets
    from .guard import ARTIFACT_KIND, embedding_width

    # Everything that can be checked without the model is checked before it loads.
    _check_ranges(args)
    fmt = prompt_format(args)
    corruption = CorruptionConfig(args.corruption, args.sigma if args.sigma is not None else 1.0, args.dims,
                                  args.seed)
    check_out_dir(args.out, ARTIFACT_KIND, inputs=_fit_inputs(args))
    check_model_args(args, "model", "reference_model")
    search = "none" if args.sigma is not None else args.search
    if search == "none" and args.sigma is None and args.corruption in ("rand_noise_first_n", "rand_noise_rand_n"):
        raise UserError("--search none: give the noise strength with --sigma S")
    forget, negatives = tofu_prompt_sets(args.split, args.seed)
    if args.forget:
        forget = load_qa(args.forget)
        negatives.pop("retain")
        if args.retain:
            negatives["retain"] = read_prompts(args.retain)
    elif args.retain:
        raise UserError("--retain: only with --forget (the TOFU split brings its own retain prompts)")
    for i, path in enumerate(args.negatives):
        negatives[f"user{i + 1}" if len(args.negatives) > 1 else "user"] = read_prompts(path)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    corruption.check_width(embedding_width(model))  # needs the model; before the reference model and any fitting
    reference = None
    if search != "none" and args.target_value is None:
        stderr_log(f"[eco] reference model: {args.reference_model or 'base model (proxy)'}")
        reference = load_model(args.reference_model, dtype=args.dtype, device=args.device, with_tokenizer=False,
                               trust_remote_code=args.trust_remote_code)
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(args.model or "default"),
            "forget_source": args.forget or f"tofu:{args.split}", "n_forget": len(forget),
            "reference_model": str(args.reference_model or "base model") if reference is not None else None,
            "command": "unlearnkit " + " ".join(sys.argv[1:])}
    opts = {"steps": args.steps, "lr": args.lr, "eps": args.eps, "sigma0": args.sigma0} if search == "zo" else {}
    out = fit_eco(args.out, model=model, tokenizer=tokenizer, forget=forget, negatives=negatives, mode=args.mode,
                  entities=args.entity, corruption=corruption, target_fpr=args.target_fpr, search=search,
                  metric=args.metric, target_value=args.target_value, reference_model=reference,
                  search_options=opts, fmt=fmt, seed=args.seed, metadata=meta, log=stderr_log)
    print(out)
    return 0


def run_generate(args) -> int:
    from ..cli_common import check_model_args
    from ..errors import UserError
    from ..models import load_model
    from .guard import EcoGuard, read_artifact

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    check_model_args(args)
    read_artifact(args.eco)  # fail fast on a bad artifact, before loading the model
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    guard = EcoGuard.load(args.eco, model, tokenizer)
    flags = guard.flags(args.prompt)
    answers = guard.generate(args.prompt, max_new_tokens=args.max_new_tokens, guard=not args.no_guard)
    for prompt, flag, answer in zip(args.prompt, flags, answers):
        print(f"[eco] flagged={'yes' if flag else 'no'}: {prompt}", file=sys.stderr)
        print(json.dumps(answer) if len(args.prompt) > 1 else answer)
    return 0
