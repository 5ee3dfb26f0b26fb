"""Bottleneck adapters that hold one committed or P batched candidates.

`AdapterModule` wraps a frozen module and adds up(tanh(down(s))) to its output, where s
is the module's own output (series: h + adapter(h)) or the input of another module that
runs before it in the layer (parallel beside an MLP made of two modules: BERT's
`intermediate` and `output.dense`; a `Tap` on the first keeps its input). With P
candidates stacked as P blocks of n sequences, every block gets its own down/up through
batched matmuls. tanh (LLM-Adapters' default non-linearity) is odd with slope 1 at 0, so a
small adapter is, to first order, the linear map up @ down.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.spaces.modules import widened

AdapterWeights = tuple[torch.Tensor, torch.Tensor]  # down (m, in), up (out, m)


class Stash:
    """A value handed from a `Tap` to the `AdapterModule` that runs after it."""

    value: torch.Tensor | None = None


class Tap(nn.Module):
    """A frozen module that keeps its input for a parallel adapter further on."""

    is_space_wrapper = True

    def __init__(self, base: nn.Module, stash: Stash):
        super().__init__()
        self.base = base
        self.stash = stash

    def forward(self, x: torch.Tensor, *args, **kwargs):
        self.stash.value = x
        return self.base(x, *args, **kwargs)


class AdapterModule(nn.Module):
    """A frozen module plus a bottleneck adapter: committed, or P batched candidates."""

    is_space_wrapper = True

    def __init__(self, base: nn.Module, series: bool, stash: Stash | None = None):
        super().__init__()
        self.base = base
        self.series = series
        self.stash = stash  # parallel with a separate input module: its input
        self.committed: AdapterWeights | None = None
        self.candidates: AdapterWeights | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = widened(self.base(x), x)
        if self.series:
            source = out
        elif self.stash is not None:
            source, self.stash.value = self.stash.value, None
        else:
            source = x
        if self.candidates is not None:
            down, up = self.candidates  # (P, m, in), (P, out, m)
            blocks = source.reshape(down.shape[0], -1, source.shape[-1])  # (P, n*T, in)
            hidden = torch.tanh(torch.bmm(blocks, down.transpose(1, 2)))  # (P, n*T, m)
            return out + torch.bmm(hidden, up.transpose(1, 2)).reshape(out.shape)
        if self.committed is not None:
            down, up = self.committed
            return out + torch.tanh(source @ down.T) @ up.T
        return out
