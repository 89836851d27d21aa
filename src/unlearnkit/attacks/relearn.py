"""Relearning attack: fine-tune an unlearned model on K forget QA and watch the OTHER forget QA come back.

If unlearning removed the knowledge, learning K facts teaches only those K (and whatever they say about the held-out
ones — the retain model, which never saw the forget authors, measures that). If it merely hid it, a few steps on a
few facts bring the held-out answers back far above the retain model's curve (Hu et al. 2024; the SimNPO paper
reports NPO is most fragile when the relearning set holds the shortest answers).

Training is the project's loop (train/finetune.py, answer tokens only); every `eval_every` steps the held-out rows are
scored teacher-forced (p(a|q), truth ratio, forget quality against the retain model's clean values on the same
rows), with greedy answers (ROUGE-L) at the start and the end.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from ..data.format import PromptFormat, encode_answer
from ..errors import UserError
from ..train.finetune import finetune
from ..train.loop import TrainConfig
from .score import question_probes, score_probes, summarize_forget

RELEARN_SETS = ("random", "shortest")


@dataclass
class RelearnConfig:
    n: int = 10                 # forget QA relearned (K)
    relearn_set: str = "random"
    steps: int = 20
    lr: float = 5e-5
    batch_size: int = 4
    eval_every: int = 5
    lora_r: int = 0             # > 0: relearn LoRA adapters of this rank instead of all weights
    seed: int = 0
    max_new_tokens: int = 200
    eval_batch_size: int = 32

    def __post_init__(self):
        for name, low in (("n", 1), ("steps", 1), ("batch_size", 1), ("eval_every", 1), ("max_new_tokens", 1),
                          ("eval_batch_size", 1), ("lora_r", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"--{name.replace('_', '-')}: must be a whole number >= {low} (got {v!r})")
        if self.relearn_set not in RELEARN_SETS:
            raise UserError(f"--relearn-set: unknown value {self.relearn_set!r}; choose random or shortest")
        self.train_config()  # lr and seed ranges: the training loop's own checks

    def train_config(self) -> TrainConfig:
        return TrainConfig(lr=self.lr, max_steps=self.steps, batch_size=self.batch_size, warmup_ratio=0.0,
                           schedule="constant", weight_decay=0.0, seed=self.seed)


def split_forget(rows: list[dict], cfg: RelearnConfig, tokenizer, fmt: PromptFormat = PromptFormat()):
    """(relearn rows, held-out rows): K rows chosen at random (seeded) or the K with the fewest answer tokens."""
    if cfg.n >= len(rows):
        raise UserError(f"--n {cfg.n}: must be smaller than the forget set ({len(rows)} rows), or nothing is held out")
    if cfg.relearn_set == "random":
        chosen = set(random.Random(cfg.seed).sample(range(len(rows)), cfg.n))
    else:
        by_length = sorted(range(len(rows)), key=lambda i: (len(encode_answer(tokenizer, rows[i]["answer"], fmt)), i))
        chosen = set(by_length[:cfg.n])
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]


def with_lora(model, r: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def relearn_curve(model, tokenizer, relearn_rows: list[dict], heldout_rows: list[dict], cfg: RelearnConfig, *,
                  reference: dict | None = None, guard=None, fmt: PromptFormat = PromptFormat(),
                  progress: bool = True, split: str | None = None) -> dict:
    """Relearn `model` in place (with LoRA: adapters injected into it) on `relearn_rows`; returns {"curve": [...], "samples": {...}, "train_log": ...}.

    curve: one point per evaluation (step 0, every eval_every steps, the last step) with the held-out forget
    metrics and p(a|q) of the relearned rows themselves (did relearning take?). reference: the retain model's
    forget columns for `heldout_rows` (score.reference_rows), for forget quality."""
    held_probes = question_probes(tokenizer, heldout_rows, fmt)
    taught_probes = question_probes(tokenizer, relearn_rows, fmt)
    kw = dict(fmt=fmt, guard=guard, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
    curve, samples = [], {}

    def evaluate(step: int, loss: float | None, generate: bool) -> None:
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        cols = score_probes(model, tokenizer, heldout_rows, held_probes, generate=generate, **kw)
        taught = score_probes(model, tokenizer, relearn_rows, taught_probes, generate=False, **kw)
        point = {"step": step, "train_loss": loss, **summarize_forget(cols, reference, split),
                 "relearned_prob": summarize_forget(taught, None, split)["forget_prob"],
                 "eval_seconds": time.perf_counter() - t0}
        curve.append(point)
        samples[f"step_{step}"] = cols
        model.train(was_training)

    evaluate(0, None, generate=True)
    trained = with_lora(model, cfg.lora_r) if cfg.lora_r else model
    tcfg = cfg.train_config()

    def on_step(step: int, entry: dict) -> None:
        if step % cfg.eval_every == 0 and step < tcfg.max_steps:
            evaluate(step, entry["loss"], generate=False)

    log = finetune(trained, tokenizer, relearn_rows, tcfg, fmt=fmt, source="relearn set", progress=progress,
                   desc="relearn", on_step=on_step)
    evaluate(tcfg.max_steps, log["steps"][-1]["loss"], generate=True)
    return {"curve": curve, "samples": samples,
            "train_log": {k: v for k, v in log.items() if k != "config"}, "config": asdict(cfg)}
