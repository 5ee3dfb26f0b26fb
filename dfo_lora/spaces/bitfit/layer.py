"""A projection plus a bias shift per target slice, committed or P batched candidates.

`BiasShift` wraps a frozen projection and adds b_t to the output columns of each target t
it carries (all of them, or q / k / v's slice of a fused module such as GPT-2's c_attn).
Where the projection has a bias of its own, this is BitFit's trained bias (b + b_t);
where it has none (Llama), it is a new bias starting at zero. With P candidates stacked
as P blocks of n sequences, block p gets b_t[p].
"""

from __future__ import annotations

import torch

from dfo_lora.spaces.modules import SlicedProjection, add_to_columns, widened


class BiasShift(SlicedProjection):
    """A frozen projection plus, per target slice, one committed or P batched biases."""

    committed: dict[str, torch.Tensor]  # target -> (w,)
    candidates: dict[str, torch.Tensor]  # target -> (P, w)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = widened(self.base(x, *args, **kwargs), x)
        if not self.committed and not self.candidates:
            return out
        for target, out_slice in self.out_slices.items():
            if target in self.candidates:
                bias = self.candidates[target]  # (P, w)
                blocks = out.shape[0] // bias.shape[0]
                shape = (bias.shape[0], 1, *([1] * (out.dim() - 2)), bias.shape[1])
                delta = bias.view(shape).expand(-1, blocks, *out.shape[1:-1], -1)
                add_to_columns(out, out_slice, delta.reshape(*out.shape[:-1], -1))
            elif target in self.committed:
                add_to_columns(out, out_slice, self.committed[target])
        return out
