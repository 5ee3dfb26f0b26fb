"""Entering a model's layer stack at layer l, for any Hugging Face architecture.

What a layer needs besides its hidden state (rotary tables, causal or sliding-window
masks, padding masks, position ids, cache positions) is computed by the model's own
forward before its layer loop and differs between families and versions. Instead of
re-implementing it per architecture, `enter` runs the model's forward once with every
layer swapped for a `_Recorder` that stores the arguments it is called with and passes
its hidden state through unchanged; the recording stops at the last layer (no norm, no
head). What comes back is layer 0's input (the embeddings, with whatever scaling or
position embeddings the model adds) and, per layer, its extra arguments, which
`StackInputs.call` replays around any hidden state: the cached prefix output, or P
candidates' stacked copies of it.

Right padding: causal models are recorded without a padding mask (a real token never
attends to a later pad), so fused causal attention keeps its fast path; masked LMs get
their padding mask.

`run_at_slots` runs a layer whose output is read at one position per sequence only (the
last layer: the verbalizer reads the slot): attention at every position, everything
after it at the slots.

`enter_after_prefix` records the same for sequences that all start with one prefix (a
prompt space's tokens) on a causal model, split in two: the prefix alone (one sequence)
and the rest after it, whose layers read the prefix's keys and values from the model's
own cache (`transformers.Cache`: its positions, masks and sliding windows are the
model's). A prefix then runs once per candidate instead of once per example.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from dfo_lora.errors import UserError


@dataclass
class StackInputs:
    """Each layer's recorded extra arguments for one batch of `batch` sequences."""

    batch: int
    calls: dict[int, tuple[tuple, dict]]  # id(layer module) -> (positional args, kwargs)

    def call(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run one layer on `hidden` with the arguments the model gave it."""
        args, kwargs = self.calls[id(layer)]
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def for_module(self, module: nn.Module, layer: nn.Module) -> StackInputs:
        """The same arguments with `module` (a copy of `layer`) in the layer's place."""
        if module is layer:
            return self
        return StackInputs(batch=self.batch, calls={id(module): self.calls[id(layer)]})

    def repeat(self, times: int) -> StackInputs:
        """The same arguments for the batch stacked `times` over (candidates x examples).

        Tensors with a leading batch dimension (masks, per-sequence position ids) are
        repeated; everything else (tables shared by the batch, flags) is kept as is.
        Arguments shared between layers are repeated once.
        """
        if times == 1:
            return self
        done: dict[int, object] = {}
        calls = {
            key: (_repeat(args, self.batch, times, done), _repeat(kwargs, self.batch, times, done))
            for key, (args, kwargs) in self.calls.items()
        }
        return StackInputs(batch=self.batch * times, calls=calls)

    def cache(self):
        """The key/value cache the model handed its layers (a `transformers.Cache`), or None."""
        for args, kwargs in self.calls.values():
            for value in (*args, *kwargs.values()):
                if _is_cache(value):
                    return value
        return None

    def with_cache(self, cache) -> StackInputs:
        """The same arguments with every layer handed `cache` instead of the recorded one."""

        def swap(value):
            return cache if _is_cache(value) else value

        calls = {
            key: (tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()})
            for key, (args, kwargs) in self.calls.items()
        }
        return StackInputs(batch=self.batch, calls=calls)


def _is_cache(value) -> bool:
    from transformers import Cache

    return isinstance(value, Cache)


def _repeat(value, batch: int, times: int, done: dict[int, object]):
    if isinstance(value, torch.Tensor):
        if value.dim() < 2 or value.shape[0] != batch:
            return value
        if id(value) not in done:
            done[id(value)] = value.repeat(times, *([1] * (value.dim() - 1)))
        return done[id(value)]
    if isinstance(value, tuple):
        return tuple(_repeat(v, batch, times, done) for v in value)
    if isinstance(value, list):
        return [_repeat(v, batch, times, done) for v in value]
    if isinstance(value, dict):
        return {k: _repeat(v, batch, times, done) for k, v in value.items()}
    return value


class _StopRecording(Exception):
    """Raised by the last layer's recorder: nothing after the stack is needed."""


class _Recorder(nn.Module):
    """Stands in for one layer during recording; attribute reads reach the real layer
    (some models read e.g. `layer.attention_type` to pick its mask)."""

    def __init__(self, layer: nn.Module, index: int, last: int, sink: dict):
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_where", (index, last, sink))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, *args, **kwargs):
        index, last, sink = self._where
        if args:
            hidden, rest = args[0], args[1:]
        elif "hidden_states" in kwargs:
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise UserError(
                "cannot enter the layer stack: a layer was called without hidden_states"
            )
        sink[index] = (hidden, rest, kwargs)
        if index == last:
            raise _StopRecording
        return hidden


@torch.no_grad()
def enter(
    model: nn.Module,
    layers: nn.ModuleList,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, StackInputs]:
    """Layer 0's input (B, T, H) for `ids` and every layer's recorded extra arguments.

    `attention_mask` is None for causal models (see the module docstring). Runs under
    no_grad: none of it depends on trainable weights, and the tensors work both in
    inference mode and under autograd (the gradient baseline).
    """
    return _record(model, layers, input_ids=ids, attention_mask=attention_mask, use_cache=False)


def _record(model: nn.Module, layers: nn.ModuleList, **forward) -> tuple[torch.Tensor, StackInputs]:
    """Layer 0's input and every layer's arguments in one `model(**forward)` call."""
    sink: dict[int, tuple] = {}
    originals = list(layers)
    last = len(originals) - 1
    for index, layer in enumerate(originals):
        layers[index] = _Recorder(layer, index, last, sink)
    try:
        model(**forward)
    except _StopRecording:
        pass
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    if len(sink) != len(originals):
        raise UserError(
            f"cannot enter the layer stack of {type(model).__name__}: its forward called "
            f"{len(sink)} of its {len(originals)} layers"
        )
    calls = {id(layer): sink[i][1:] for i, layer in enumerate(originals)}
    hidden = sink[0][0]
    return hidden, StackInputs(batch=hidden.shape[0], calls=calls)


@torch.no_grad()
def enter_after_prefix(
    model: nn.Module, layers: nn.ModuleList, prefix: torch.Tensor, ids: torch.Tensor
) -> tuple[StackInputs, StackInputs] | None:
    """Every layer's arguments for `prefix` (1, n) alone and for `ids` (B, T) after it.

    Causal models only (a prefix position must not read later ones). The first holds
    an empty cache (`StackInputs.cache`): a replay of the prefix's layers on a copy of it
    fills the copy, and the second, handed that copy (`with_cache`), reads the prefix's
    keys and values there. None where the model hands its layers no cache.
    """
    _, alone = _record(model, layers, input_ids=prefix, use_cache=True)
    empty = alone.cache()
    if empty is None or not hasattr(empty, "layers"):  # none, or older than transformers 5
        return None
    filled = copy.deepcopy(empty)
    keyword = _cache_keyword(model)
    model(input_ids=prefix, use_cache=True, **{keyword: filled})  # n positions in the cache
    _, after = _record(model, layers, input_ids=ids, use_cache=True, **{keyword: filled})
    return alone, after


class PrefixReader:
    """Stands in for the cache of the input after a prefix: each layer's attention gets
    the prefix's keys and values (from the cache a replay of the prefix filled, with
    `repeats` sequences after each of its rows) before its own, as from the model's own
    cache layer, whose copy does the work; nothing is stored, so the memory of a layer's
    keys and values is freed once the layer has run."""

    def __init__(self, prefix, repeats: int):
        self.prefix = prefix
        self.repeats = repeats

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = copy.copy(self.prefix.layers[layer_idx])
        layer.batch_repeat_interleave(self.repeats)
        return layer.update(key_states, value_states, *args, **kwargs)


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name for a cache: `cache` (transformers 5.x), else `past_key_values`."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


class _StopLayer(Exception):
    """Raised by the attention's pre-hook once its input is captured."""


def run_at_slots(
    layer: nn.Module,
    attention: nn.Module,
    hidden: torch.Tensor,
    inputs: StackInputs,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The layer's output (B, H) at one position per sequence, `positions` (B,).

    Exact for causal and bidirectional layers alike: the attention module (`attention`,
    the layer's child holding q..o) runs on every position, as its keys and values need
    them; what the layer does after it (residual adds, norms, MLP) is per token and runs
    at the B slot positions only, which saves most of the layer (an MLP is about 3/4 of
    a decoder layer's matmuls). No family's layer code is copied: the layer runs twice
    through its own forward, with hooks on the attention module. First on the full
    hidden state until the attention is called (only the input norm runs), to capture
    the attention's input; then on the B slot rows (B, 1, H), with the attention fed the
    captured full input and its output cut to the slots.
    """
    captured: dict[str, tuple] = {}

    def capture(module, args, kwargs):
        captured["call"] = (args, kwargs)
        raise _StopLayer

    hook = attention.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        inputs.call(layer, hidden)
    except _StopLayer:
        pass
    finally:
        hook.remove()
    if "call" not in captured:
        raise UserError(
            f"cannot run {type(layer).__name__} at the slots: it never called its attention"
        )
    rows = torch.arange(hidden.shape[0], device=hidden.device)

    def cut(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (output[0][rows, positions, None], *output[1:])
        return output[rows, positions, None]

    hooks = [
        attention.register_forward_pre_hook(lambda m, a, k: captured["call"], with_kwargs=True),
        attention.register_forward_hook(cut, with_kwargs=True),
    ]
    try:
        out = inputs.call(layer, hidden[rows, positions, None])  # (B, 1, H)
    finally:
        for hook in hooks:
            hook.remove()
    return out[:, 0]
