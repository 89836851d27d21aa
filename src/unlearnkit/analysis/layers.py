"""Layer sweep (the Adaptive RMU paper's per-layer comparison): which layer should a representation method steer?

For every method that takes a `layer` setting (its defaults hold a "layer" key: RMU and Adaptive RMU today) and every
layer l asked for: one unlearning run from the same target, at the method's defaults (or the `--set` overrides) with
only the layer changed — the trained parameters follow the layer (the method's own default, l−2..l for RMU). Each run
is scored as `eval tofu` scores a model, teacher-forced (forget p(a|q), truth ratio, forget quality and PrivLeak
against the retain model, retain and real-authors p and truth ratio; with generation also ROUGE-L and model utility),
with what the method reports (Adaptive RMU: the coefficient β·‖h_l‖ it resolved) and the training time.

Beside them, per layer, the frozen target's mean token norm ‖h_l‖: h_l is the output of decoder layer l, i.e. Hugging
Face hidden_states[l + 1] (hidden_states[0] is the embeddings), averaged over every real token — prompt and answer —
of the forget QA, as RMU's loss sees them. A fixed steering coefficient means something different where this norm is
small and where it is large.
"""
from __future__ import annotations

import re

import torch

from ..data.format import PromptFormat
from ..errors import UserError
from .alignment import hidden_state_batches, hidden_state_index

# Summary keys of `eval tofu` kept per run (generation adds ROUGE-L and model utility).
METRICS = ("forget_prob", "forget_truth_ratio", "forget_quality", "privleak", "retain_prob", "retain_truth_ratio",
           "ra_prob", "ra_truth_ratio")
GENERATED_METRICS = ("forget_rougeL_recall", "retain_rougeL_recall", "model_utility")
LAYER_KEY = "layer"
_ITEM = re.compile(r"^(\d+)(?:\.\.(\d+)(?::(\d+))?)?$")


def parse_layers(text: str) -> list[int]:
    """`3..27` (inclusive), `3..27:4` (every 4th from 3), `3,7,11`, or a comma list of these → sorted unique layers."""
    layers: set[int] = set()
    for item in (t.strip() for t in str(text).split(",")):
        m = _ITEM.match(item)
        if not m:
            raise UserError(f"--layers {text!r}: {item!r} is not N, A..B or A..B:STEP (whole numbers >= 0)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        step = int(m.group(3)) if m.group(3) is not None else 1
        if end < start or step < 1:
            raise UserError(f"--layers {text!r}: in {item!r} the range must not run backwards and STEP must be >= 1")
        layers.update(range(start, end + 1, step))
    return sorted(layers)


def layer_methods() -> list[str]:
    """Registered methods that take a `layer` setting (from their Method record's defaults)."""
    from .. import methods

    return [name for name, m in methods.METHODS.items() if LAYER_KEY in m.defaults]


def check_methods(names) -> list[str]:
    """Known methods, each with a `layer` setting; else a one-line error naming the ones that have one."""
    from .. import methods

    if not names:
        raise UserError("--methods: give at least one method")
    for name in names:
        m = methods.get(name)  # unknown: an error listing the registered methods
        if LAYER_KEY not in m.defaults:
            raise UserError(f"--methods: {name} takes no layer setting; methods that do: "
                            f"{', '.join(layer_methods()) or 'none'}")
    return list(dict.fromkeys(names))


def check_sets(config: dict) -> None:
    """--set may not fix what the sweep varies: the layer, and the trained parameters that follow it."""
    for key, why in ((LAYER_KEY, "the layers come from --layers"),
                     ("params", "the trained parameters follow each layer (the method's own default)")):
        if key in config:
            raise UserError(f"--set {key}: not allowed here ({why})")


def shape_model(name_or_path):
    """The model's architecture on the meta device (no weights read, nothing allocated): layer checks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {name_or_path}: cannot read its config ({str(e).splitlines()[0]})") from e
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_layers(model, runs: list[tuple[str, int, dict]], shown: str) -> None:
    """Each method's own model check (`Method.check_model`) for each (method, layer, resolved config)."""
    from .. import methods

    for name, layer, cfg in runs:
        check = methods.get(name).check_model
        if check is None:
            continue
        try:
            check(model, cfg)
        except UserError as e:
            raise UserError(f"--layers {shown}: {name} at layer {layer}: {e}") from None


def mean_token_norms(model, tokenizer, rows: list[dict], layers, *, fmt: PromptFormat = PromptFormat(),
                     batch_size: int = 16, max_length: int = 512) -> dict:
    """{"norms": {layer: mean over real tokens of ‖h_l‖}, "tokens": count}, h_l = hidden_states[l + 1]; one pass."""
    sums = {layer: 0.0 for layer in layers}
    tokens = 0
    for hidden, mask in hidden_state_batches(model, tokenizer, rows, fmt=fmt, batch_size=batch_size,
                                             max_length=max_length, source="layer-norm rows"):
        for layer in sums:
            sums[layer] += float(hidden[hidden_state_index(layer)].double()[mask].norm(dim=-1).sum())
        tokens += int(mask.sum())
    return {"norms": {layer: s / tokens for layer, s in sums.items()}, "tokens": tokens}


def eval_sets(task, generate: bool, reference: bool = False) -> tuple[str, ...]:
    """The TOFU sets scored: the reference (retain model) needs forget (+ holdout for PrivLeak); a run also retain
    and real authors, and with generation world facts (model utility)."""
    holdout = ("holdout",) if task.holdout else ()
    if reference:
        return ("forget",) + holdout
    return ("forget", "retain", "real_authors") + (("world_facts",) if generate else ()) + holdout


def score_model(model, tokenizer, task, *, reference=None, generate: bool = False, max_new_tokens: int = 200,
                fmt: PromptFormat = PromptFormat(), batch_size: int = 16, max_length: int | None = None) -> dict:
    """`eval tofu` on the sweep's sets: the kept summary numbers, and why any of them is null."""
    from ..eval.tofu import evaluate_tofu

    summary = evaluate_tofu(model, tokenizer, task, retain_reference=reference, batch_size=batch_size,
                            progress=False, fmt=fmt, max_new_tokens=max_new_tokens, max_length=max_length,
                            generate=generate, only_sets=eval_sets(task, generate))["summary"]
    keys = METRICS + (GENERATED_METRICS if generate else ())
    out = {k: summary.get(k) for k in keys}
    why = {k: v for k, v in summary.get("null_reasons", {}).items() if k in out and out[k] is None}
    return {**out, "null_reasons": why} if why else out


def reference_log(model, tokenizer, task, *, fmt: PromptFormat = PromptFormat(), batch_size: int = 16,
                  max_length: int | None = None) -> dict:
    """The retain model's teacher-forced log of the forget (and holdout) set: forget quality and PrivLeak."""
    from ..eval.tofu import evaluate_tofu

    return evaluate_tofu(model, tokenizer, task, batch_size=batch_size, progress=False, fmt=fmt,
                         max_length=max_length, generate=False, only_sets=eval_sets(task, False, reference=True))


def _series(doc: dict, method: str, key: str) -> tuple[list, list]:
    runs = doc["runs"][method]
    return [r["layer"] for r in runs], [r.get(key) if r.get(key) is not None else float("nan") for r in runs]


def layers_figure(doc: dict, path, title: str = ""):
    """Forget p, forget quality (log), retain p against the layer, one line per method (target: reference line),
    and the frozen target's mean ‖h_l‖ per layer."""
    from matplotlib.ticker import MaxNLocator

    from ..plots import PALETTE, REFERENCE_STYLE, line_style, pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 6.4), sharex=True)
    panels = (("forget_prob", "forget p(a|q)"), ("forget_quality", "forget quality (KS p-value, log)"),
              ("retain_prob", "retain p(a|q)"))
    for ax, (key, label) in zip(axes.flat, panels):
        for i, method in enumerate(doc["runs"]):
            ax.plot(*_series(doc, method, key), **line_style(method, "method", i))
        if doc["target"].get(key) is not None:
            ax.axhline(doc["target"][key], **REFERENCE_STYLE["target"], label="target (before)")
        ax.set_ylabel(label)
        if key == "forget_quality":
            ax.set_yscale("log")
        ax.legend(loc="best")
    ax = axes.flat[3]
    norms = doc["norms"]["per_layer"]
    ax.plot([n["layer"] for n in norms], [n["mean_token_norm"] for n in norms], color=PALETTE[-1], marker="o",
            markersize=3, label="target (frozen)")
    ax.set_ylabel("mean ‖h_l‖ on forget tokens")
    ax.legend(loc="best")
    for ax in axes[1]:
        ax.set_xlabel("layer l (output of decoder layer l)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return save(fig, path)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def summary_lines(doc: dict) -> list[str]:
    """One table row per (method, layer): the frozen norm, forget and retain numbers, the method's report, time."""
    norms = {n["layer"]: n["mean_token_norm"] for n in doc["norms"]["per_layer"]}
    head = (f"{'method':<14}{'layer':>5} {'||h_l||':>9} {'forget p':>9} {'TR':>7} {'FQ':>9} {'retain p':>9} "
            f"{'train s':>8}  reported")
    t = doc["target"]
    lines = [head, f"{'target':<14}{'-':>5} {'-':>9} {_fmt(t['forget_prob']):>9} {_fmt(t['forget_truth_ratio']):>7} "
             f"{_fmt(t['forget_quality']):>9} {_fmt(t['retain_prob']):>9} {'-':>8}"]
    for method, runs in doc["runs"].items():
        for r in runs:
            if "error" in r:
                lines.append(f"{method:<14}{r['layer']:>5} {_fmt(norms[r['layer']]):>9}  failed: {r['error']}")
                continue
            report = " ".join(f"{k}={_fmt(v)}" for k, v in r["report"].items())
            lines.append(f"{method:<14}{r['layer']:>5} {_fmt(norms[r['layer']]):>9} {_fmt(r['forget_prob']):>9} "
                         f"{_fmt(r['forget_truth_ratio']):>7} {_fmt(r['forget_quality']):>9} "
                         f"{_fmt(r['retain_prob']):>9} {r['train_seconds']:>8.1f}  {report}")
    return lines
