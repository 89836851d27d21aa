"""Activations of one decoder layer, computed two ways (RMU trains on them; analyses read them).

h_l(x) = output of decoder layer l (= Hugging Face hidden_states[l + 1]).

- `FastActivations`: the forward stops at layer l — no later layers, no LM head, no logits. Layers below the lowest
  trained layer run once, under no_grad, and feed both the updated and the frozen branch; the frozen branch is a
  copy of only the trained layers.
- `NaiveActivations`: full forwards returning all hidden states, and a full frozen copy of the model (the plain
  way, for tests and benchmarks).

Both are called as acts(model, batch, with_frozen) -> (h_l under the current weights, h_l under the frozen weights
or None).
"""
from __future__ import annotations

import re

import torch

from .sharding import frozen_copy, in_root


def decoder_of(model):
    """The decoder stack (embeddings + layers + final norm) of an HF causal LM, also under peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def n_layers(model) -> int:
    return len(decoder_of(model).layers)


def layer_index(param_name: str) -> int | None:
    """Decoder-layer number in a parameter name ("model.layers.7.mlp..." -> 7), None outside the layers."""
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", param_name)
    return int(m.group(1)) if m else None


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


class _StopAtFirstLayer(Exception):
    pass


def layer_inputs(decoder, batch):
    """Embeddings plus the arguments HF gives every decoder layer (causal mask, rotary embeddings, ...): run the
    decoder until its first layer is called. Model-agnostic for HF decoders whose layers share their arguments."""
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _StopAtFirstLayer

    handle = decoder.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        decoder(**_model_inputs(batch), use_cache=False)
    except _StopAtFirstLayer:
        pass
    finally:
        handle.remove()
    args, kwargs = seen["args"], seen["kwargs"]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    return hidden, args[1:], kwargs


def run_layers(layers, hidden, args, kwargs):
    for layer in layers:
        out = layer(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


class FastActivations:
    """h_l from layer slices: shared no-grad prefix, trained layers, frozen copies of the trained layers."""

    def __init__(self, model, layer: int, trained_layers: list[int]):
        self.decoder = decoder_of(model)
        self.lo, self.hi = min(trained_layers), layer
        layers = self.decoder.layers
        self.prefix, self.trained = layers[:self.lo], layers[self.lo:self.hi + 1]
        self.frozen = torch.nn.ModuleList([frozen_copy(layer) for layer in self.trained])

    def __call__(self, model, batch, with_frozen: bool):
        # in_root: under FSDP the root unit (embeddings) is gathered; each decoder layer unshards on its own call
        return in_root(model, self._call, batch, with_frozen)

    def _call(self, batch, with_frozen: bool):
        with torch.no_grad():
            hidden, args, kwargs = layer_inputs(self.decoder, batch)
            hidden = run_layers(self.prefix, hidden, args, kwargs)
        h = run_layers(self.trained, hidden, args, kwargs)
        if not with_frozen:
            return h, None
        with torch.no_grad():
            return h, run_layers(self.frozen, hidden, args, kwargs)


class NaiveActivations:
    """The plain way: full forwards (all layers, LM head) returning all hidden states; a full frozen copy."""

    def __init__(self, model, layer: int):
        self.layer = layer
        self.frozen = frozen_copy(model)

    def _h(self, m, batch):
        return m(**_model_inputs(batch), output_hidden_states=True, use_cache=False).hidden_states[self.layer + 1]

    def __call__(self, model, batch, with_frozen: bool):
        h = self._h(model, batch)
        if not with_frozen:
            return h, None
        with torch.no_grad():
            return h, self._h(self.frozen, batch)
