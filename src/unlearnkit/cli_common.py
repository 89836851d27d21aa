"""Arguments shared by several subcommands, and their conversion to API objects."""
from __future__ import annotations

import argparse



def add_model_args(p: argparse.ArgumentParser, model_default: str | None = None) -> None:
    p.add_argument("--model", default=model_default,
                   help="HF model directory or hub id (default: offline SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 | auto (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: CUDA if present)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model folder")


def check_model_args(args, *model_options: str) -> None:
    """Validate --device, --dtype and the model folders named by `model_options` (default: "model") before any work
    starts: cheap checks only (no weights are read)."""
    from .models import check_device, default_device, resolve_dtype, resolve_model_path

    check_device(getattr(args, "device", None))
    resolve_dtype(getattr(args, "dtype", None), getattr(args, "device", None) or default_device())
    for option in model_options or ("model",):
        value = getattr(args, option, None)
        if value not in (None, "", "default", "smollm2-135m"):
            resolve_model_path(value, option=f"--{option.replace('_', '-')}")


def add_format_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-format", default="chat", choices=["chat", "plain"],
                   help="chat: the model's chat template; plain: 'Question: ... Answer:' for base models")
    p.add_argument("--system-prompt", default=None, help="system prompt (off by default: shorter sequences)")
    p.add_argument("--max-length", type=int, default=512, help="longest allowed sequence in tokens")


def prompt_format(args):
    from .data.format import PromptFormat

    return PromptFormat(args.prompt_format, args.system_prompt)


def add_train_args(p: argparse.ArgumentParser, defaults: str = "finetune") -> None:
    """Training-loop options. Unset values fall back to the command's defaults (fine-tune or method)."""
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--epochs", type=float, default=None)
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--grad-accum", type=int, default=None)
    g.add_argument("--warmup-ratio", type=float, default=None)
    g.add_argument("--schedule", default=None, choices=["linear", "cosine", "constant"])
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--max-grad-norm", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--checkpoint-every", type=int, default=None, help="optimizer steps between resume checkpoints")


TRAIN_FIELDS = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "schedule",
                "weight_decay", "max_grad_norm", "seed", "checkpoint_every")


def train_config(args, defaults: str | dict = "finetune"):
    """TrainConfig from defaults (a dict, or "finetune" for the TOFU fine-tune defaults) + CLI overrides."""
    from .train.loop import TrainConfig

    if defaults == "finetune":
        from .prepare import FINETUNE_DEFAULTS as defaults
    values = dict(defaults)
    for name in TRAIN_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return TrainConfig(**values)


def add_log_args(p: argparse.ArgumentParser) -> None:
    """Live training logs (train/live_log.py): TensorBoard events in the run folder, wandb on request."""
    g = p.add_argument_group("live logs")
    g.add_argument("--no-tensorboard", action="store_true",
                   help="write no TensorBoard events (default: into the run folder's tb/ when tensorboard is installed)")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (wandb installed and logged in)")
    g.add_argument("--wandb-project", default=None, metavar="NAME", help="wandb project (implies --wandb)")


def log_options(args):
    """LogOptions from the flags, checked before any work: an unusable --wandb is a one-line error; a missing
    tensorboard package only a one-line notice."""
    from .train.live_log import LogOptions, WandbSettings

    wandb = WandbSettings(args.wandb_project) if args.wandb or args.wandb_project else None
    return LogOptions(tensorboard=not args.no_tensorboard, wandb=wandb).check()
