"""`unlearnkit unlearn --method NAME`: the command-line face of `unlearnkit.unlearn` (unlearning.py).

Config precedence: method DEFAULTS < --config YAML < --set key=value < the explicit flags (--lr, --lora-r, ...).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..cli_common import (TRAIN_FIELDS, add_format_args, add_log_args, add_model_args, add_train_args, check_model_args,
                          log_options, prompt_format)
from ..errors import UserError
from . import METHODS


def add_commands(sub) -> None:
    p = sub.add_parser("unlearn", help=f"weight-space unlearning: {', '.join(METHODS)}")
    p.add_argument("--method", required=True, choices=list(METHODS))
    add_model_args(p)
    data = p.add_argument_group("data (a --split, or --forget/--forget-corpus files; each file is one topic)")
    data.add_argument("--split", "--tofu-split", dest="split", default=None,
                      choices=["mini", "forget01", "forget05", "forget10"], help="unlearn the TOFU forget set from "
                      "the prepared target model (fine-tuned from --model on first use, cached)")
    data.add_argument("--forget", action="append", default=[], metavar="FILE", help="forget QA (.json/.jsonl/.csv)")
    data.add_argument("--retain", default=None, metavar="FILE", help="retain QA")
    data.add_argument("--forget-corpus", action="append", default=[], metavar="FILE",
                      help="forget raw text (.txt passages or JSON rows with a text field)")
    data.add_argument("--retain-corpus", default=None, metavar="FILE", help="retain raw text")
    data.add_argument("--question-field", default="question")
    data.add_argument("--answer-field", default="answer")
    data.add_argument("--text-field", default="text")
    add_format_args(p)
    add_train_args(p, defaults="method")
    p.add_argument("--config", default=None, metavar="YAML", help="method config (keys as in docs/methods.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (value parsed as YAML), e.g. --set beta=4.5 or, for RMU, "
                   "--set layer=11; the keys are in docs/methods.md")
    scale = p.add_argument_group("scale-out (docs/scaling.md)")
    scale.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and AdamW "
                       "state across the processes (FSDP2); default: every process holds the whole model")
    scale.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each decoder layer's activations in backward (less memory, ~1/3 more compute)")
    scale.add_argument("--offload", action="store_true", help="with --fsdp: keep the shards of parameters, "
                       "gradients and AdamW state in CPU memory; the optimizer step runs on the CPU")
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of this rank (merged on save)")
    p.add_argument("--no-merge", action="store_true", help="with --lora-r: save the adapters, not a merged model")
    ev = p.add_argument_group("in-training evaluation (TOFU splits)")
    ev.add_argument("--eval-every", type=int, default=None, metavar="N", help="every N steps (and at the end): "
                    "teacher-forced forget p(a|q), truth ratio, forget quality (with --retain-log) and retain p, "
                    "logged per step in run.json")
    ev.add_argument("--retain-log", default=None, metavar="EVAL.json",
                    help="the retain model's `eval tofu` log of the split: forget quality during training")
    ev.add_argument("--keep", default="last", metavar="RULE", help="which step's model to save: last (default) or "
                    "best:METRIC[,NAME>=X...], e.g. best:forget_quality,retain_prob>=0.9 (docs/methods.md)")
    p.add_argument("--out", default=None, help="output folder (default: runs/unlearn-METHOD)")
    p.add_argument("--restart", "--no-resume", dest="restart", action="store_true",
                   help="discard a checkpoint left in --out by an interrupted run and start over (without it, a "
                   "checkpoint of the same run is resumed and one of a different run is an error)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_log_args(p)
    p.set_defaults(func=run)


def load_config(args) -> dict:
    import yaml

    config = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"--config {path}: no such file")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from e
        if not isinstance(config, dict):
            raise UserError(f"--config {path}: expected a mapping of key: value")
        config.pop("method", None)  # a config file may name its method; --method decides
    config.update(parse_sets(args.set))
    for name in TRAIN_FIELDS:
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    for flag in ("fsdp", "activation_checkpointing", "offload"):
        if getattr(args, flag, False):
            config[flag] = True
    if args.lora_r is not None:
        config["lora_r"] = args.lora_r
    if args.no_merge:
        config["lora_merge"] = False
    if args.max_length != 512:
        config["max_length"] = args.max_length
    return config


def parse_sets(items: list[str]) -> dict:
    """`--set KEY=VALUE` items → {key: value} (values parsed as YAML)."""
    import yaml

    config = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            config[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from e
    return config


def load_data(args, fmt, logs=None):
    """(model path, forget rows, retain rows)."""
    from ..data.qa import load_corpus, load_qa

    if args.split and (args.forget or args.forget_corpus):
        raise UserError("--split and --forget/--forget-corpus: give one source of forget data")
    if args.split:
        from ..data import tofu
        from ..prepare import prepare_tofu

        task = tofu.task(args.split)
        paths = prepare_tofu(args.split, args.model, fmt=fmt, max_length=args.max_length, dtype=args.dtype,
                             device=args.device, progress=not args.quiet, logs=logs)
        return str(paths["target"]), task.forget, task.retain_train_for_unlearning
    if not (args.forget or args.forget_corpus):
        raise UserError("no forget data: give --split, --forget FILE or --forget-corpus FILE")
    forget = []
    for f in args.forget:
        forget += [dict(r, topic=f) for r in load_qa(f, args.question_field, args.answer_field)]
    for f in args.forget_corpus:
        forget += [{"text": t, "topic": f} for t in load_corpus(f, args.text_field)]
    retain = None
    if args.retain and args.retain_corpus:
        raise UserError("--retain and --retain-corpus: give one retain set")
    if args.retain:
        retain = load_qa(args.retain, args.question_field, args.answer_field)
    elif args.retain_corpus:
        retain = [{"text": t} for t in load_corpus(args.retain_corpus, args.text_field)]
    return args.model, forget, retain


def run(args) -> int:
    import torch

    from ..files import check_out_dir
    from ..models import load_model
    from ..train.loop import NonFiniteLoss
    from ..unlearning import launched, resolve_config, unlearn

    check_model_args(args)
    fmt = prompt_format(args)
    config = load_config(args)
    resolved = resolve_config(args.method, config)  # bad keys and values fail before the (possibly long) TOFU
    if resolved["fsdp"] and not launched():         # preparation
        raise UserError("--fsdp: needs a process group: launch with torchrun --nproc_per_node N (or accelerate "
                        "launch)")
    if resolved["fsdp"] and args.eval_every is not None:
        raise UserError("--eval-every: in-training evaluation is not supported with --fsdp")
    out = args.out or f"runs/unlearn-{args.method}"
    inputs = [args.model, args.config, args.retain, args.retain_corpus, *args.forget, *args.forget_corpus]
    check_out_dir(out, "unlearn", inputs=[i for i in inputs if i and os.path.exists(i)])
    make_monitor = in_training_eval(args, fmt)
    logs = log_options(args)
    model_path, forget, retain = load_data(args, fmt, logs)
    if model_path != args.model:  # the prepared TOFU target: never write inside it either
        check_out_dir(out, "unlearn", inputs=[model_path])
    device = args.device
    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # torchrun / accelerate launch: one GPU per process
    model, tokenizer = load_model(model_path, dtype=args.dtype or "fp32", device=device,
                                  trust_remote_code=args.trust_remote_code)
    live_log = logs.open(out, name=f"unlearn-{args.method}", config=config)
    try:
        info = unlearn(model, tokenizer, args.method, forget, retain, config, out_dir=out, fmt=fmt,
                       progress=not args.quiet, resume=not args.restart, live_log=live_log,
                       monitor=make_monitor(tokenizer) if make_monitor else None)
    except NonFiniteLoss as e:
        print(f"unlearnkit: error: {e}", file=sys.stderr)
        return 1
    finally:
        if live_log is not None:
            live_log.close()
    if info["world_size"] == 1 or int(os.environ.get("RANK", "0")) == 0:
        last = info["steps"][-1] if info["steps"] else {}
        print(f"{args.method}: {len(info['steps'])} steps, {info['seconds_per_step'] or 0:.3f} s/step, "
              f"final loss {last.get('loss', float('nan')):.4f}; model saved to {out}")
    if "in_training_eval" in info:
        kept = info["in_training_eval"]
        print(f"kept step {kept['kept_step']} ({kept['rule']})" + (f": {kept['note']}" if kept.get("note") else ""))
    return 0


EVAL_KEYS = ("forget_prob", "forget_truth_ratio", "forget_quality", "retain_prob", "retain_truth_ratio")


def in_training_eval(args, fmt):
    """A function tokenizer → Monitor for --eval-every / --keep (every option checked now, before any work), or
    None."""
    from ..train.monitor import KeepRule, Monitor

    rule = KeepRule.parse(args.keep)
    if args.eval_every is None:
        if rule is not None or args.retain_log:
            raise UserError(f"{'--keep' if rule else '--retain-log'} needs --eval-every N")
        return None
    if isinstance(args.eval_every, bool) or args.eval_every < 1:
        raise UserError(f"--eval-every: must be a whole number >= 1 (got {args.eval_every!r})")
    if not args.split:
        raise UserError("--eval-every: in-training evaluation runs on a TOFU --split")
    from ..data import tofu
    from ..eval.aggregate import load_log, reference_rows
    from ..eval.tofu import evaluate_tofu

    reference = load_log(args.retain_log) if args.retain_log else None
    task = tofu.task(args.split)
    if reference is not None:
        reference_rows(reference, task.forget)  # every forget row must be in the retain log
    if rule is not None:
        unknown = rule.names() - set(EVAL_KEYS)
        if unknown:
            raise UserError(f"--keep {rule.text!r}: {sorted(unknown)[0]!r} is not evaluated during training; "
                            f"choose from {', '.join(EVAL_KEYS)}")
        if "forget_quality" in rule.names() and reference is None:
            raise UserError(f"--keep {rule.text!r}: forget quality needs --retain-log")
    def make(tokenizer) -> Monitor:
        def evaluate(model) -> dict:
            summary = evaluate_tofu(model, tokenizer, task, retain_reference=reference, fmt=fmt, generate=False,
                                    only_sets=("forget", "retain"), progress=False)["summary"]
            return {k: summary.get(k) for k in EVAL_KEYS}

        return Monitor(evaluate, args.eval_every, keep=rule)

    return make
