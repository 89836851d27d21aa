"""Sharded data parallelism with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`), used by the one training loop.

`shard(model, ...)` makes one FSDP unit per decoder layer plus the root (embeddings, final norm, LM head): each
rank keeps 1/W of every parameter, its gradient and its AdamW state; a unit's full parameters exist only while it
runs (all-gather before, free after), and gradients are reduce-scattered in backward.

The fast paths keep working because each decoder layer unshards on its own call:
- the answer-only LM head (train/nll.py) and RMU's truncated forward (train/activations.py) call parts of the model
  (the backbone, the head, layer slices) instead of `model.forward`; they run inside `in_root(model, fn, ...)`, a
  method registered with `register_fsdp_forward_method`, so the root unit's parameters (embeddings, norm, head) are
  gathered and their gradients reduced exactly as in a full forward.
- frozen copies (RMU's copies of the trained layers, the KL retain term's reference model) are made by
  `frozen_copy`: a sharded copy built from a meta-device template of the model and filled from the local shards —
  no rank ever holds the full model. They use the training model's mixed-precision policy, so the frozen branch
  computes in the step's precision.

Mixed precision (GPU, `mixed_precision` auto/bf16): parameters are all-gathered in bf16 for compute, the sharded
fp32 parameters are the master weights AdamW updates, and gradients are reduce-scattered in fp32
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); on CPU everything is fp32.
Options: `activation_checkpointing` (each decoder layer's activations are recomputed in backward; any run) and
`offload` (FSDP2's `CPUOffloadPolicy`: sharded parameters, gradients and AdamW state live in host memory and the
optimizer step runs on the CPU; FSDP runs only).
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

import torch

IN_ROOT = "unlearnkit_in_root"


@dataclass
class _State:
    template: torch.nn.Module          # the model with meta-device parameters (structure only)
    names: dict                        # id(module of the training model) -> its name
    compute_device: torch.device
    mp_policy: Any
    offload_policy: Any


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


def is_sharded(module) -> bool:
    """Does the module hold FSDP-sharded parameters (DTensors)?"""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def decoder_layers(model):
    from .activations import decoder_of

    return decoder_of(model).layers


def set_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (HF gradient
    checkpointing, non-reentrant: it applies to direct layer calls too, e.g. RMU's truncated forward)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _meta_template(model) -> torch.nn.Module:
    """A deep copy with every parameter on the meta device (no memory); buffers are copied as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def policies(compute_device: torch.device, bf16: bool, offload: bool):
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    off = CPUOffloadPolicy(pin_memory=compute_device.type == "cuda") if offload else OffloadPolicy()
    return mp, off


def _register_in_root(module) -> None:
    from torch.distributed.fsdp import register_fsdp_forward_method

    def in_root(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    setattr(module, IN_ROOT, in_root.__get__(module))
    register_fsdp_forward_method(module, IN_ROOT)


def check_shardable(model) -> list:
    """The decoder layers FSDP will make units of; a UserError when the model has none."""
    try:
        layers = list(decoder_layers(model))
    except (AttributeError, TypeError):
        layers = []
    if not layers:
        from ..errors import UserError

        raise UserError(f"--fsdp: {type(model).__name__} has no list of decoder layers (get_decoder().layers) to "
                        "shard; run it without --fsdp")
    return layers


def shard(model, compute_device: torch.device, bf16: bool = False, offload: bool = False):
    """fully_shard each decoder layer, then the root; in place (returns the model). Needs a process group."""
    from torch.distributed.fsdp import fully_shard

    layers = check_shardable(model)
    template = _meta_template(model)
    mp, off = policies(compute_device, bf16, offload)
    for layer in layers:
        fully_shard(layer, mp_policy=mp, offload_policy=off)
    fully_shard(model, mp_policy=mp, offload_policy=off)
    _register_in_root(model)
    _STATES[model] = _State(template, {id(m): n for n, m in model.named_modules()}, compute_device, mp, off)
    return model


def reshard(model) -> None:
    """Free every gathered unit (the root keeps its parameters gathered after a forward), so that
    `named_parameters()` yields the sharded parameters again."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def compute_device(model) -> torch.device:
    """Where the model computes (under CPU offload its parameters live on the CPU)."""
    state = _STATES.get(model)
    return state.compute_device if state is not None else next(model.parameters()).device


def in_root(model, fn, *args, **kwargs):
    """fn(*args, **kwargs) as part of the root's forward: under FSDP the root unit's parameters are gathered and
    their gradients reduced as in `model(...)`; otherwise a plain call."""
    method = getattr(model, IN_ROOT, None)
    return method(fn, *args, **kwargs) if method is not None else fn(*args, **kwargs)


def _state_of(module):
    for root, state in list(_STATES.items()):
        if id(module) in state.names and any(m is module for m in root.modules()):
            return root, state
    raise ValueError("frozen_copy: a sharded module that is not part of a model sharded by unlearnkit")


def frozen_copy(module):
    """A frozen, eval-mode copy of `module` as it is now. Under FSDP: a copy sharded like the original (its
    decoder-layer units and a unit for the rest), filled from this rank's shards; a collective-free operation."""
    if not is_sharded(module):
        out = copy.deepcopy(module)
        return out.eval().requires_grad_(False)
    from torch.distributed.fsdp import FSDPModule, fully_shard

    root, state = _state_of(module)
    reshard(root)
    name = state.names[id(module)]
    out = copy.deepcopy(state.template.get_submodule(name) if name else state.template)
    src_modules = dict(module.named_modules())
    # children before parents, as fully_shard requires; the copy's top is always a unit of its own
    for sub_name, sub in reversed(list(out.named_modules())):
        if sub_name and isinstance(src_modules.get(sub_name), FSDPModule):
            fully_shard(sub, mp_policy=state.mp_policy, offload_policy=state.offload_policy)
    fully_shard(out, mp_policy=state.mp_policy, offload_policy=state.offload_policy)
    src_params = dict(module.named_parameters(remove_duplicate=False))
    out.to_empty(device=next(iter(src_params.values())).device)
    src_buffers = dict(module.named_buffers())
    with torch.no_grad():
        for n, p in out.named_parameters(remove_duplicate=False):
            local(p).copy_(local(src_params[n]))
        for n, b in out.named_buffers():
            b.copy_(src_buffers[n])
    _register_in_root(out)
    _STATES[out] = _State(_meta_template_of(state.template, name), {id(m): n for n, m in out.named_modules()},
                          state.compute_device, state.mp_policy, state.offload_policy)
    return out.eval().requires_grad_(False)


def _meta_template_of(template, name: str):
    return template.get_submodule(name) if name else template


def gather_full(model, rank: int):
    """The trained model as a plain (unsharded) module on the CPU, on rank 0 (None on the other ranks); every rank
    must call it. Used once, at the end, to save the HF model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = _STATES[model]
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    out = copy.deepcopy(state.template).to_empty(device="cpu")
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n, p in out.named_parameters(remove_duplicate=False):
            if n in full:
                p.copy_(full[n])
        for n, b in out.named_buffers():
            b.copy_(buffers[n].cpu())
    out.tie_weights() if hasattr(out, "tie_weights") else None
    return out


def all_ranks(flag: bool, device) -> bool:
    """True when `flag` is true on every rank (one all-reduce); the flag itself outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return float(t) == 0.0
