"""A shift of the prompt positions' hidden states at one layer's input.

`PromptShift` is a forward pre-hook on a layer module: before the layer runs, it adds
p (n, H) to positions 0..n-1 of the layer's input (the prompt tokens the space put in
front of every example), the committed prompt, or P candidates' prompts (P, n, H) for
P stacked blocks of sequences. Calls on fewer than n + 1 positions (the last layer run
at the slots only, `backbone/stack.py`) hold no prompt position and pass unchanged.

Where the server runs the prompt once per candidate (`span`): "prompt" shifts calls of
exactly n positions (the prompt alone) and "off" none (the input after the prompt, whose
layers read the prompt's keys and values from a cache).
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.spaces.modules import SPACE_HOOK


class PromptShift:
    """One layer's prompt shift: committed (n, H) or P candidates (P, n, H)."""

    is_space_hook = True  # dfo_lora.spaces.unwrap_all removes it

    def __init__(self, layer: nn.Module):
        self.committed: torch.Tensor | None = None
        self.candidates: torch.Tensor | None = None
        self.span = "front"  # "front", "prompt" or "off" (the module docstring)
        layer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        shift = self.candidates if self.candidates is not None else self.committed
        if shift is None or self.span == "off":
            return None
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], args
        n = shift.shape[-2]
        if hidden.dim() != 3:
            return None
        holds_prompt = hidden.shape[1] == n if self.span == "prompt" else hidden.shape[1] > n
        if not holds_prompt:
            return None
        if shift.dim() == 3:  # (P, n, H) over P stacked blocks of the batch
            blocks = hidden.shape[0] // shift.shape[0]
            shift = shift.repeat_interleave(blocks, dim=0)
        prompt = hidden[:, :n] + shift.to(hidden.dtype)
        hidden = torch.cat([prompt, hidden[:, n:]], dim=1)
        if args:
            return (hidden, *rest), kwargs
        return rest, {**kwargs, "hidden_states": hidden}


def prompt_shift(layer: nn.Module) -> PromptShift:
    """The layer's PromptShift, made once (a reused backbone: back to the zero state)."""
    shift = getattr(layer, SPACE_HOOK, None)
    if shift is None:
        shift = PromptShift(layer)
        object.__setattr__(layer, SPACE_HOOK, shift)
    shift.committed = shift.candidates = None
    shift.span = "front"
    return shift
