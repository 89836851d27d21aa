"""Steering-coefficient alignment (the Adaptive RMU paper's argument): RMU pushes forget activations at layer l
towards c·u. Whether they actually line up with the random direction u depends on c relative to the layer's own
activation norm ‖h_l‖: too small and the forget activations barely move, which is why a fixed c fails in middle and
late layers where ‖h_l‖ is large.

For each coefficient c: a short RMU run from the same target, then, on the forget QA (every real token, prompt and
answer, as RMU's loss sees them), the mean cosine between h_l and u, the mean ‖h_l‖, and the forget metrics. The
frozen target's mean ‖h_l‖ gives c / ‖h_l‖. h_l is the output of decoder layer l (HF hidden_states[l + 1]).
"""
from __future__ import annotations

import torch

from ..data.batching import collate, encode_items
from ..data.format import PromptFormat
from ..methods.rmu import unit_vector
from ..train.activations import decoder_of


def hidden_state_index(layer: int) -> int:
    """Index in HF hidden_states of the output of decoder layer `layer` (index 0 is the embeddings)."""
    return layer + 1


def hidden_state_batches(model, tokenizer, rows: list[dict], *, fmt: PromptFormat = PromptFormat(),
                         batch_size: int = 16, max_length: int = 512, source: str = "analysis rows"):
    """Yield (HF hidden_states — embeddings, then one per decoder layer —, real-token mask) per batch of `rows`,
    encoded as training sees them (prompt and answer), the model in eval mode and without gradients. Only the
    decoder stack runs (no LM head: the hidden states are the same, without the logits' cost)."""
    decoder = decoder_of(model)
    examples = encode_items(tokenizer, rows, fmt, max_length=max_length, source=source)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            with torch.no_grad():
                hidden = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            yield hidden, mask.bool()
    finally:
        model.train(was_training)


def layer_alignment(model, tokenizer, rows: list[dict], layer: int, u: torch.Tensor, *,
                    fmt: PromptFormat = PromptFormat(), batch_size: int = 16, max_length: int = 512) -> dict:
    """{"cosine": mean over real tokens of cos(h_l, u), "norm": mean token ‖h_l‖, "tokens": count}."""
    cos_sum = norm_sum = 0.0
    tokens = 0
    for hidden, mask in hidden_state_batches(model, tokenizer, rows, fmt=fmt, batch_size=batch_size,
                                             max_length=max_length, source="alignment rows"):
        h = hidden[hidden_state_index(layer)].double()[mask]
        cos_sum += float(torch.nn.functional.cosine_similarity(h, u.to(h), dim=-1).sum())
        norm_sum += float(h.norm(dim=-1).sum())
        tokens += h.shape[0]
    return {"cosine": cos_sum / tokens, "norm": norm_sum / tokens, "tokens": tokens}


def steering_direction(model, seed: int, topic: int = 0) -> torch.Tensor:
    """The u RMU uses for `topic` with this seed (methods/rmu.py)."""
    return unit_vector(model.get_input_embeddings().weight.shape[1], seed, topic)


def alignment_figure(points: list[dict], target: dict, path, title: str = ""):
    """Cosine to u and forget p(a|q) against c / ‖h_l‖ (log x)."""
    from ..plots import PALETTE, REFERENCE_STYLE, pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    x = [p["c_over_norm"] for p in points]
    axes[0].plot(x, [p["cosine"] for p in points], color=PALETTE[0], marker="o", label="after RMU")
    axes[0].axhline(target["cosine"], **REFERENCE_STYLE["target"], label="target (before)")
    axes[0].set_ylabel("mean cos(h_l, u) on forget tokens")
    axes[1].plot(x, [p["forget_prob"] for p in points], color=PALETTE[1], marker="o", label="after RMU")
    axes[1].axhline(target["forget_prob"], **REFERENCE_STYLE["target"], label="target (before)")
    axes[1].set_ylabel("forget p(a|q)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("steering coefficient c / mean ‖h_l‖ of the target")
        ax.legend(loc="best")
    if title:
        fig.suptitle(title)
    return save(fig, path)
