"""`unlearnkit plan`: memory per GPU of an unlearning run, computed from a Llama-style model config (no weights,
no GPU). docs/scaling.md explains every term; tests check the counts against real models on the CPU.

Persistent state (per trained parameter: fp32 master weight 4 B + fp32 gradient 4 B + AdamW's two fp32 moments
8 B = 16 B; per frozen parameter: its storage dtype) is divided by the number of GPUs under FSDP and moves to host
memory with --offload. On top come, per GPU: the working copies (FSDP: the bf16 root unit — embeddings, head —
gathered for the whole step, and about two decoder layers gathered at a time with their gradients; one GPU: the bf16
autocast copies of the trained weights) and the activations saved for backward.

Activations (elements saved per token and decoder layer, measured with saved-tensor hooks on Llama models, HF
SDPA attention, tests/test_plan.py): 8·h + 2·kv + 4·i + 6 (h hidden size, kv = key/value width, i MLP width);
with activation checkpointing only the layer input (h) is kept, plus one layer's full set while it is recomputed.
Plus about 2·h per token outside the layers, and for answer-NLL methods the answer-position logits (about half the
tokens × vocabulary × 8 B: fp32 logits and their log-softmax). bf16 compute: 2 B per element plus 4·h B per
layer for the two RMSNorm inputs kept in fp32.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError

GIB = 1024 ** 3


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    name: str = ""

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _shape(name, vocab, hidden, inter, layers, heads, kv, tied, head_dim=None):
    return Shape(vocab, hidden, inter, layers, heads, kv, head_dim or hidden // heads, tied, name)


# The published configs (config.json of each model on the Hugging Face hub).
PRESETS = {
    "smollm2-135m": _shape("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, True),
    "llama-3.2-1b": _shape("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, True, 64),
    "llama-2-7b": _shape("Llama-2-7b", 32000, 4096, 11008, 32, 32, 32, False),
    "mistral-7b": _shape("Mistral-7B / Zephyr-7B", 32000, 4096, 14336, 32, 32, 8, False),
    "llama-2-70b": _shape("Llama-2-70b", 32000, 8192, 28672, 80, 64, 8, False),
}
FULL = ("ga", "graddiff", "npo", "simnpo")
RMU = ("rmu", "adaptive_rmu")
USES_RETAIN = {"ga": False, "graddiff": True, "npo": True, "simnpo": True, "rmu": True, "adaptive_rmu": True}


def shape_from_config(config: dict, name: str = "") -> Shape:
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        return Shape(int(config["vocab_size"]), hidden, int(config["intermediate_size"]),
                     int(config["num_hidden_layers"]), heads, int(config.get("num_key_value_heads") or heads),
                     int(config.get("head_dim") or hidden // heads), bool(config.get("tie_word_embeddings", False)),
                     name)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--model {name}: not a Llama-style config (missing or bad {e})") from e


def load_shape(model: str | None) -> Shape:
    """A preset name, a config.json, or a model folder holding one."""
    key = (model or "smollm2-135m").lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model {model}: no such config file or folder, and not a preset "
                        f"({', '.join(PRESETS)})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: unreadable config ({e})") from e
    return shape_from_config(config, str(model))


def param_counts(s: Shape) -> dict:
    """Parameters per part of a Llama model (no biases)."""
    attn = s.hidden * s.heads * s.head_dim * 2 + s.hidden * s.kv_dim * 2
    mlp = 3 * s.hidden * s.intermediate
    layer = attn + mlp + 2 * s.hidden
    embed = s.vocab * s.hidden
    head = 0 if s.tied else s.vocab * s.hidden
    return {"embed": embed, "head": head, "final_norm": s.hidden, "per_layer": layer, "down_proj": s.hidden *
            s.intermediate, "attn": attn, "mlp": mlp, "total": embed + head + s.hidden + s.layers * layer}


def lora_params(s: Shape, r: int) -> int:
    """LoRA on every linear layer of the decoder ("all-linear": q, k, v, o, gate, up, down): r·(in + out) each."""
    h, i, q, kv = s.hidden, s.intermediate, s.heads * s.head_dim, s.kv_dim
    per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    return s.layers * per_layer


def layer_activation_elements(s: Shape) -> int:
    """Elements one decoder layer saves for backward per token (measured: tests/test_plan.py)."""
    return 8 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate + 6


def activation_elements(s: Shape, layers: int, checkpointing: bool) -> int:
    """Elements saved in the forward for backward per token over `layers` decoder layers (+ the embeddings and
    final norm); with checkpointing, each layer keeps only its input."""
    if checkpointing:
        return layers * s.hidden + 2 * s.hidden + 2
    return layers * layer_activation_elements(s) + 2 * s.hidden + 16


def plan(s: Shape, method: str, gpus: int = 1, *, lora_r: int = 0, rmu_layer: int = 7, batch_size: int = 4,
         seq_len: int = 512, checkpointing: bool = False, offload: bool = False, precision: str = "bf16",
         frozen_bytes: int = 4, kl: bool = False) -> dict:
    """Bytes per GPU (and per parameter) of one run. precision: bf16 (GPU default: mixed precision) or fp32 (CPU).
    frozen_bytes: storage of frozen parameters (4: loaded in fp32, unlearnkit's default; 2: --dtype bf16)."""
    if method not in USES_RETAIN:
        raise UserError(f"--method: unknown method {method!r}; choose one of {', '.join(USES_RETAIN)}")
    if gpus < 1 or batch_size < 1 or seq_len < 1 or lora_r < 0:
        raise UserError("--gpus, --batch-size, --seq-len: must be >= 1 (--lora-r >= 0)")
    if method in RMU and not 2 <= rmu_layer <= s.layers - 2:
        raise UserError(f"--layer: {rmu_layer} is out of range for a {s.layers}-layer model (2..{s.layers - 2})")
    if method in RMU and lora_r:
        raise UserError("--lora-r: RMU trains its three matrices, not LoRA adapters")
    counts = param_counts(s)
    total = counts["total"]
    if method in RMU:
        trained, frozen = 3 * counts["down_proj"], total - 3 * counts["down_proj"]
        copies = 3 * counts["per_layer"] * frozen_bytes  # frozen copies of the three trained layers
    elif lora_r:
        trained, frozen = lora_params(s, lora_r), total
        copies = 0
    else:
        trained, frozen = total, 0
        copies = 0
    if kl and method in FULL:
        copies += total * frozen_bytes  # the KL retain term's frozen reference model
    fsdp = gpus > 1 or offload
    trained_state = 16 * trained  # fp32 weight + grad + AdamW exp_avg, exp_avg_sq
    frozen_state = frozen_bytes * frozen + copies
    persistent = (trained_state + frozen_state) / (gpus if fsdp else 1)
    act_bytes = 2 if precision == "bf16" else 4
    if fsdp:
        root = counts["embed"] + counts["head"] + counts["final_norm"]
        # gathered working copies: the root for the whole step; ~2 layers at once (current + prefetched), each with
        # its unsharded gradient and the fp32 reduce-scatter buffer when trained
        layer_grad = (act_bytes + 4) if trained == total else 0
        working = root * act_bytes + 2 * counts["per_layer"] * (act_bytes + layer_grad)
    else:
        working = 2 * trained if precision == "bf16" and method in FULL and not lora_r else 0  # autocast cache
    tokens = batch_size * seq_len * (2 if USES_RETAIN[method] else 1)
    if method in RMU:
        layers_run = 3  # the no-grad prefix saves nothing; layers l-2..l keep their activations
        logits = 0
    else:
        layers_run = s.layers
        logits = tokens // 2 * s.vocab * 8
    # with checkpointing, one layer's full set exists again while it is recomputed in backward
    elements = activation_elements(s, layers_run, checkpointing) + (layer_activation_elements(s) if checkpointing
                                                                     else 0)
    per_layer_norms = (0 if precision == "fp32" else 4 * s.hidden) * (1 if checkpointing else layers_run)
    activations = tokens * (elements * act_bytes + per_layer_norms) + logits
    gpu = working + activations + (0 if offload else persistent)
    return {"model": s.name, "method": method, "gpus": gpus, "lora_r": lora_r, "checkpointing": checkpointing,
            "offload": offload, "precision": precision, "parameters": total, "trained_parameters": trained,
            "bytes_per_parameter": (trained_state + frozen_state) / total,
            "persistent_bytes_per_gpu": persistent, "working_bytes": working, "activation_bytes": activations,
            "host_bytes_per_gpu": persistent if offload else 0, "peak_bytes_per_gpu": gpu,
            "tokens_per_step": tokens}


def _fits(p: dict, memory_gib: float) -> str:
    ok = "yes" if p["peak_bytes_per_gpu"] <= memory_gib * GIB else "no"
    if p["offload"]:  # the shards live in host memory: a node with all the GPUs needs their sum
        ok += f", host {p['host_bytes_per_gpu'] * p['gpus'] / GIB:.0f} GiB"
    return ok


def table(s: Shape, methods, gpus_list, memory_gib: float, **kw) -> list[str]:
    """Markdown rows: method, GPUs, options, bytes/param, GiB per GPU (state, working, activations, total), fits."""
    rows = ["| method | GPUs | AC | offload | B/param | state GiB/GPU | working | activations | peak GiB/GPU | "
            f"fits {memory_gib:g} GiB GPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for method, lora_r in methods:
        for gpus in gpus_list:
            for ckpt, off in ((False, False), (True, False), (True, True)):
                p = plan(s, method, gpus, lora_r=lora_r, checkpointing=ckpt, offload=off, **kw)
                label = f"{method} LoRA r={lora_r}" if lora_r else method
                rows.append(f"| {label} | {gpus} | {'yes' if ckpt else 'no'} | {'yes' if off else 'no'} | "
                            f"{p['bytes_per_parameter']:.1f} | "
                            f"{p['persistent_bytes_per_gpu'] / GIB:.2f}"
                            f"{' (host)' if off else ''} | {p['working_bytes'] / GIB:.2f} | "
                            f"{p['activation_bytes'] / GIB:.2f} | {p['peak_bytes_per_gpu'] / GIB:.1f} | "
                            f"{_fits(p, memory_gib)} |")
    return rows


def add_commands(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU of an unlearning run, from a model config (no GPU needed)")
    p.add_argument("--model", default=None, help=f"config.json, a model folder, or a preset: {', '.join(PRESETS)} "
                   "(default: smollm2-135m)")
    p.add_argument("--method", default="npo", help=f"one of {', '.join(USES_RETAIN)} (default npo)")
    p.add_argument("--gpus", type=int, action="append", default=None, help="GPUs (FSDP when > 1); repeatable "
                   "(default: 1, 2 and 8)")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--layer", type=int, default=7, help="RMU's layer l (default 7)")
    p.add_argument("--batch-size", type=int, default=4, help="forget (and retain) sequences per GPU and step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--kl", action="store_true", help="retain term KL to a frozen reference (retain_loss: kl)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="bf16: GPU mixed precision; fp32")
    p.add_argument("--frozen-dtype", default="fp32", choices=["fp32", "bf16"], help="storage of frozen parameters "
                   "(LoRA's base model, RMU's untrained layers): fp32 (unlearnkit's default) or bf16 (--dtype bf16)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.json:
        from .files import check_out_file

        check_out_file(args.json, option="--json", key="plan")
    s = load_shape(args.model)
    gpus = args.gpus or [1, 2, 8]
    kw = dict(rmu_layer=args.layer, batch_size=args.batch_size, seq_len=args.seq_len, precision=args.precision,
              kl=args.kl, frozen_bytes=4 if args.frozen_dtype == "fp32" else 2)
    plans = [plan(s, args.method, g, lora_r=args.lora_r, checkpointing=c, offload=o, **kw)
             for g in gpus for c, o in ((False, False), (True, False), (True, True))]  # validates first
    counts = param_counts(s)
    print(f"{s.name or args.model}: {counts['total'] / 1e9:.3f} B parameters ({counts['per_layer'] / 1e6:.1f} M "
          f"per decoder layer × {s.layers}); {args.method}, batch {args.batch_size} × {args.seq_len} tokens, "
          f"{args.precision}")
    print("\n".join(table(s, [(args.method, args.lora_r)], gpus, args.gpu_memory, **kw)))
    if args.json:
        from .files import write_json_atomic

        write_json_atomic(args.json, {"plan": asdict(s), "rows": plans})
    return 0
