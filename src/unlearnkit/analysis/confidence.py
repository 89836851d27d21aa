"""Token confidence (the Adaptive RMU paper's claim that steering lowers it): for each model, the mean max-softmax
probability and the mean entropy (nats) of its next-token distribution at every answer position of the forget,
retain and general (real authors + world facts) QA of a TOFU split, teacher-forced on the gold answers.

The distributions come from the shared log-prob path (train/nll.label_logits: the LM head only at labelled
positions), in length-sorted batches.
"""
from __future__ import annotations

import math

import torch

from ..data.batching import collate, encode_items
from ..data.format import PromptFormat
from ..train.nll import label_logits

SETS = ("forget", "retain", "general")


def confidence_sets(task) -> dict[str, list[dict]]:
    return {"forget": task.forget, "retain": task.retain_eval, "general": task.real_authors + task.world_facts}


@torch.no_grad()
def token_confidence(model, tokenizer, rows: list[dict], *, fmt: PromptFormat = PromptFormat(),
                     batch_size: int = 16, max_length: int = 512) -> dict:
    """{"max_prob", "entropy"}: means over every answer token of `rows` (token-weighted), plus per-row means and
    the token count."""
    examples = encode_items(tokenizer, rows, fmt, max_length=max_length, source="confidence rows")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_row = [None] * len(rows)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], tokenizer.pad_token_id).items()}
            logits, _, owner = label_logits(model, batch)
            logp = torch.log_softmax(logits.double(), -1)
            max_prob = logp.max(-1).values.exp()
            entropy = -(logp.exp() * logp).sum(-1)
            for b, i in enumerate(idx):
                sel = owner == b
                per_row[i] = (float(max_prob[sel].sum()), float(entropy[sel].sum()), int(sel.sum()))
    finally:
        model.train(was_training)
    n = sum(r[2] for r in per_row)
    return {"max_prob": sum(r[0] for r in per_row) / n, "entropy": sum(r[1] for r in per_row) / n, "tokens": n,
            "rows": len(rows), "per_row_max_prob": [r[0] / r[2] for r in per_row],
            "per_row_entropy": [r[1] / r[2] for r in per_row]}


def summary_table(results: dict) -> str:
    lines = [f"{'model':<22} " + " ".join(f"{s + ' maxp':>13} {s + ' H':>11}" for s in SETS)]
    for name, per in results.items():
        cells = [f"{per[s]['max_prob']:>13.3f} {per[s]['entropy']:>11.3f}" if s in per else f"{'-':>13} {'-':>11}"
                 for s in SETS]
        lines.append(f"{name[:22]:<22} " + " ".join(cells))
    return "\n".join(lines)


def confidence_figure(results: dict, roles: dict, path, title: str = ""):
    """Two panels (max-softmax probability, entropy): grouped bars, sets on x, one bar per model."""
    from ..plots import PALETTE, pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    names = list(results)
    width = 0.8 / max(1, len(names))
    for ax, key, label in ((axes[0], "max_prob", "mean max-softmax probability"),
                           (axes[1], "entropy", "mean entropy (nats)")):
        for j, name in enumerate(names):
            role = roles.get(name, "model")
            kw = (dict(color="#999999", hatch="..") if role == "target" else
                  dict(color="#bbbbbb", hatch="//") if role == "retain" else dict(color=PALETTE[j % len(PALETTE)]))
            values = [results[name].get(s, {}).get(key, math.nan) for s in SETS]
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(SETS))], values, width, label=name,
                   **kw)
        ax.set_xticks(range(len(SETS)))
        ax.set_xticklabels(SETS)
        ax.set_ylabel(label)
    axes[0].set_ylim(0, 1)
    axes[0].legend(loc="lower left", fontsize=7)
    if title:
        fig.suptitle(title)
    return save(fig, path)
