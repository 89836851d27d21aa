"""Live training logs: TensorBoard event files (and Weights & Biases when asked) fed by the loop's `on_step`.

    live = LiveLog(out_dir / TB_DIR, wandb=WandbSettings(project="unlearning"), name="simnpo")
    train(..., on_step=live.on_step)        # every numeric key of the step entry, plus tokens/s
    live.log_scalars(step, {"forget_quality": 0.4}, prefix="eval")   # anything else, e.g. in-training evaluation
    live.close()

Both sinks are optional: without the `tensorboard` package the log says so once on stderr and training goes on;
wandb is used only when asked for, and then it must be installed and configured (`check_wandb`, a one-line
UserError before any work). Under torchrun only rank 0 writes.

Scalars are written in double precision, so what TensorBoard shows is exactly what run.json holds.
"""
from __future__ import annotations

import math
import netrc
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError

TB_DIR = "tb"  # a run folder's event files (files.py lets unlearn and prepare keep it while they work)
_EVENT_PREFIX = "events.out.tfevents."
TENSORBOARD_NOTICE = ("unlearnkit: note: tensorboard is not installed, so no live logs are written "
                      "(pip install 'unlearnkit[logs]')")


@dataclass(frozen=True)
class WandbSettings:
    project: str | None = None


@dataclass(frozen=True)
class LogOptions:
    """What a command logs to: TensorBoard (on unless turned off) and wandb (only when asked)."""
    tensorboard: bool = True
    wandb: WandbSettings | None = None

    def check(self) -> "LogOptions":
        """Before any work: wandb asked for but unusable is an error; tensorboard missing only a notice."""
        if self.wandb is not None:
            check_wandb()
        if self.tensorboard and not tensorboard_available(notice=main_process()):
            return LogOptions(tensorboard=False, wandb=self.wandb)
        return self

    def open(self, run_dir, name: str, config: dict | None = None) -> "LiveLog | None":
        """A LiveLog writing into `run_dir`/tb (None when nothing is logged)."""
        if not self.tensorboard and self.wandb is None:
            return None
        return LiveLog(Path(run_dir) / TB_DIR if self.tensorboard else None, wandb=self.wandb, name=name,
                       config=config)


def tensorboard_available(notice: bool = False) -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 — raises ImportError without tensorboard
    except ImportError:
        if notice:
            print(TENSORBOARD_NOTICE, file=sys.stderr)
        return False
    return True


def check_wandb() -> None:
    """--wandb needs the package and a login (WANDB_API_KEY, `wandb login`'s netrc entry, or an offline mode):
    without them wandb would stop or prompt in the middle of a run."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError("--wandb: the wandb package is not installed (pip install wandb), or drop --wandb") from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise UserError(f"--wandb: wandb is not configured (no WANDB_API_KEY and no login for {host}); run "
                        "`wandb login`, set WANDB_MODE=offline, or drop --wandb")


def main_process() -> bool:
    """Rank 0 (or no torch.distributed): the one process that writes logs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _scalars(entry: dict) -> dict[str, float]:
    """The numeric values of a step entry (loss, lr, tokens, seconds, grad_norm, the loss parts), plus tokens/s."""
    out = {k: float(v) for k, v in entry.items()
           if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if entry.get("seconds") and "tokens" in entry:
        out["tokens_per_second"] = entry["tokens"] / entry["seconds"]
    return out


class LiveLog:
    """Scalars of one training run. `log_dir` None: no TensorBoard (wandb only).

    The event file is opened at the first write. A run that starts at step 1 is a fresh run: event files an
    earlier run left in `log_dir` are removed, so the folder shows this run only. A resumed run (first step > 1)
    keeps them and tells TensorBoard to hide the old events from that step on (they were written after the
    checkpoint it resumes from)."""

    def __init__(self, log_dir=None, *, wandb: WandbSettings | None = None, name: str = "train",
                 config: dict | None = None):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.wandb_settings, self.name, self.config = wandb, name, config
        self._writer = self._wandb_run = None
        self._started = False
        self.enabled = main_process()
        if self.log_dir is not None and not tensorboard_available(notice=self.enabled):
            self.log_dir = None  # said once on stderr; training goes on without event files

    # -- feeding ----------------------------------------------------------------------------------------------
    def on_step(self, step: int, entry: dict) -> None:
        """The loop's on_step callback: one point per numeric key of the entry, under train/."""
        self.log_scalars(step, _scalars(entry), prefix="train")

    def log_scalars(self, step: int, values: dict, prefix: str = "eval") -> None:
        """Scalars at `step` under `prefix`/ (e.g. in-training evaluation); non-numbers and None are skipped."""
        if not self.enabled:
            return
        values = {f"{prefix}/{k}" if prefix else k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._start(step)
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step, new_style=True, double_precision=True)
            self._writer.flush()  # live: visible in TensorBoard as soon as the step ends
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    # -- files ------------------------------------------------------------------------------------------------
    def _start(self, step: int) -> None:
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None
            if not self._started and step <= 1:
                self._remove_old_events()
            elif not self._started:
                purge = step
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge)
        if self._wandb_run is None and self.wandb_settings is not None and not self._started:
            import wandb

            self._wandb_run = wandb.init(project=self.wandb_settings.project, name=self.name, config=self.config)
        self._started = True

    def _remove_old_events(self) -> None:
        if self.log_dir.is_dir():
            for f in self.log_dir.iterdir():
                if f.is_file() and f.name.startswith(_EVENT_PREFIX):
                    f.unlink()

    def close_files(self) -> None:
        """Close the event file (a later write opens a new one). Called before a run folder is published: the
        publication replaces the folder, and the copy in it must be complete."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self.close_files()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
