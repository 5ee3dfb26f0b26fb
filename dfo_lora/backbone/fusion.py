"""Fusing each layer's per-token work with `torch.compile` (`ServerOptions.compile`).

On a CPU about a third of a stacked round is not matmul but memory-bound elementwise
passes: the norms (fp32 upcast, square, mean, rsqrt, scale, downcast), the MLP's
activation and gate product, residual adds (BENCHMARKS.md "Where the time goes"). Inductor
fuses each norm and each MLP into a few kernels. What gets compiled, in every layer: each
direct child except the attention module (left eager: the last layer's slot-only run hooks
it, and sdpa is already one kernel) and except children holding a module of this
package (a searched module: its candidates change between calls, which would recompile).
For Llama that is `input_layernorm`, `post_attention_layernorm` and `mlp`; for GPT-2
`ln_1`, `ln_2` and `mlp`; for RoBERTa `intermediate` and `output`. No family is named
here.

Compiled with dynamic shapes, the children of one class share one graph: a whole model
compiles a few graphs once (seconds), whatever the buckets' lengths and chunk sizes.
Results equal the eager ones up to the rounding of a reordered reduction (tests).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

_EAGER = "_dfo_eager_forward"  # where a compiled child keeps its own forward


def _holds_searched_module(module: nn.Module) -> bool:
    return any(type(m).__module__.startswith("dfo_lora.") for m in module.modules())


def per_token_children(layer: nn.Module, attention: nn.Module) -> list[nn.Module]:
    """The children of `layer` that `compile_layers` compiles (module docstring)."""
    return [
        child
        for child in layer.children()
        if child is not attention
        and any(True for _ in child.parameters())
        and not _holds_searched_module(child)
    ]


def _compiled(layers: nn.ModuleList) -> list[nn.Module]:
    return [child for layer in layers for child in layer.children() if _EAGER in child.__dict__]


def _set_eager(child: nn.Module) -> None:
    own = child.__dict__[_EAGER]
    if own is None:
        del child.forward  # the class's forward again
    else:
        child.forward = own


def restore_eager(layers: nn.ModuleList) -> None:
    """Undo `compile_layers`: every child gets back what its own `forward` was before."""
    for child in _compiled(layers):
        _set_eager(child)
        del child.__dict__[_EAGER]


def eager_copy(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """A deep copy of `model` (whose layer list is `layers`) with nothing compiled: a
    compiled forward is bound to the original child and would run the original's weights."""
    with eager(layers):
        net = copy.deepcopy(model)
    for module in net.modules():
        module.__dict__.pop(_EAGER, None)
    return net


@contextmanager
def eager(layers: nn.ModuleList):
    """Compiled children run eager inside the block (FlopCounterMode counts eager ops)."""
    swapped = [(child, child.__dict__["forward"]) for child in _compiled(layers)]
    for child, _ in swapped:
        _set_eager(child)
    try:
        yield
    finally:
        for child, compiled in swapped:
            child.forward = compiled


def compile_layers(layers: nn.ModuleList, attentions: list[nn.Module]) -> int:
    """Compile each layer's per-token children (module docstring); returns how many.

    Idempotent, and undone by `restore_eager`, as a backbone is reused between servers.
    """
    restore_eager(layers)
    count = 0
    for layer, attention in zip(layers, attentions, strict=True):
        for child in per_token_children(layer, attention):
            child.__dict__[_EAGER] = child.__dict__.get("forward")
            child.forward = torch.compile(child.forward, dynamic=True)
            count += 1
    return count
