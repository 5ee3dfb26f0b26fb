"""Helpers over the frozen model's modules that every space's layer code shares.

A target projection (q, v, o, ...) is an nn.Linear or GPT-2's Conv1D, and may own only
some of its module's output columns (`OutSlice`: q, k, v of a fused c_attn or of
GPT-NeoX's interleaved query_key_value). Spaces wrap such modules (`wrap_module`), and
`unwrap_all` gives the stock HF model back.
"""

from __future__ import annotations

import torch
from torch import nn

# A target's output columns in its module: None (all of them), (start, stop) for a slice of
# a fused module (GPT-2's c_attn), or several (start, stop) ranges for interleaved layouts
# (GPT-NeoX's query_key_value holds [q | k | v] per head).
OutSlice = tuple[int, int] | tuple[tuple[int, int], ...] | None


def out_columns(out_slice: OutSlice) -> slice | list[int]:
    """An index for a target's output columns (last dim of outputs, first of Linear weights)."""
    if out_slice is None:
        return slice(None)
    if isinstance(out_slice[0], int):
        return slice(*out_slice)
    return [col for start, stop in out_slice for col in range(start, stop)]


def out_width(out_slice: OutSlice, out_features: int) -> int:
    """How many output columns a target owns."""
    cols = out_columns(out_slice)
    return len(range(out_features)[cols]) if isinstance(cols, slice) else len(cols)


def add_to_columns(out: torch.Tensor, out_slice: OutSlice, delta: torch.Tensor) -> None:
    """out[..., target's columns] += delta, in place."""
    if out_slice is None:
        out.add_(delta)
    else:
        out[..., out_columns(out_slice)] += delta


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (weight stored as (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight
    return weight.shape[0], weight.shape[1]


def merge_delta(module: nn.Module, delta: torch.Tensor, out_slice: OutSlice) -> None:
    """Add a dense delta (out, in) into the frozen weight in place (export, references)."""
    cols = out_columns(out_slice)
    with torch.no_grad():
        if isinstance(module, nn.Linear):
            module.weight[cols] += delta.to(module.weight.dtype)
        else:  # Conv1D: y = x @ W + b with W (in, out)
            module.weight[:, cols] += delta.T.to(module.weight.dtype)


def widened(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A frozen module's output in its input's dtype: under autocast (bf16-mixed) the bf16
    output is widened before a space adds a small change, which bf16 would round away."""
    return out.to(x.dtype)


class SlicedProjection(nn.Module):
    """A frozen projection (Linear or Conv1D) wrapped by a space that adds its own change to
    each target's output slice: per target, the committed state and the P candidates of a
    stacked forward (the subclass says what they are and how they apply)."""

    is_space_wrapper = True  # unwrap_all replaces it by `base`

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.out_slices: dict[str, OutSlice] = {}
        self.committed: dict = {}
        self.candidates: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return projection_shape(self.base)

    def add_target(self, target: str, out_slice: OutSlice) -> None:
        self.out_slices[target] = out_slice

    def target_shape(self, target: str) -> tuple[int, int]:
        """(in_features, the target's own output width)."""
        in_features, out_features = self.shape
        return in_features, out_width(self.out_slices[target], out_features)

    @classmethod
    def install(cls, layer: nn.Module, targets: dict[str, tuple[str, OutSlice]]) -> dict:
        """Wrap a layer's target modules once: {target: (module path, out slice)} ->
        wrappers, each target at the zero state (a reused backbone may hold a commit)."""
        wrappers = {}
        for target, (path, out_slice) in targets.items():
            module = wrap_module(layer, path, lambda m: m if isinstance(m, cls) else cls(m))
            module.add_target(target, out_slice)
            module.committed.pop(target, None)
            module.candidates = {}
            wrappers[target] = module
        return wrappers


def wrap_module(layer: nn.Module, path: str, make) -> nn.Module:
    """Replace the module at `path` (relative to `layer`) by `make(module)` unless it is
    already wrapped by that kind; returns the wrapper."""
    parent_path, _, attr = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    module = getattr(parent, attr)
    wrapper = make(module)
    if wrapper is not module:
        setattr(parent, attr, wrapper)
    return wrapper


# The attribute under which a space keeps the hook object it registered on a module (a
# forward pre-hook marked `is_space_hook`: the prompt spaces' shifts).
SPACE_HOOK = "_dfo_space_hook"


def unwrap_all(model: nn.Module) -> nn.Module:
    """Replace every space wrapper (a module with a `base` it wraps, marked
    `is_space_wrapper`) in `model` by its base and remove every space hook, in place: the
    stock HF model again. Hooks are found by value, not handle: a deep copy's handles
    point at the original's hooks."""
    for module in model.modules():
        module.__dict__.pop(SPACE_HOOK, None)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "is_space_hook", False):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            while getattr(child, "is_space_wrapper", False):
                child = child.base
            setattr(module, child_name, child)
    return model
