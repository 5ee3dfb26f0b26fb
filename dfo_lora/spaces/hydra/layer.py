"""A projection with HydraLoRA deltas, one committed or P batched candidates per target.

Per target t (an output slice of the module, as in LoRA's `LoraProjection`) with A (r, in),
B (N, out, r) and router R (N, in):

    y[..., slice_t] += sum_i softmax(x R^T)_i * (B_i A x)

The routing weights depend on each token's input, so the delta is no fixed weight matrix:
it cannot be merged into the frozen weight. With P candidates stacked as P blocks of n
sequences, every block gets its own A, B, R through batched matmuls.
"""

from __future__ import annotations

import torch

from dfo_lora.spaces.modules import SlicedProjection, add_to_columns, widened

HydraWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # A, B, R


def hydra_delta(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, router: torch.Tensor
) -> torch.Tensor:
    """x (P, M, in), A (P, r, in), B (P, N, out, r), R (P, N, in) -> delta (P, M, out)."""
    num, heads, out_features, rank = b.shape
    u = torch.bmm(x, a.transpose(1, 2))  # (P, M, r): the shared down-projection
    # Softmax in fp32: in bf16 the routing weights would round before mixing.
    route = torch.softmax(torch.bmm(x, router.transpose(1, 2)).float(), -1).to(x.dtype)  # (P,M,N)
    mixed = (route[..., :, None] * u[..., None, :]).reshape(num, x.shape[1], heads * rank)
    heads_up = b.permute(0, 1, 3, 2).reshape(num, heads * rank, out_features)  # (P, N*r, out)
    return torch.bmm(mixed, heads_up)


class HydraProjection(SlicedProjection):
    """A frozen projection plus, per target slice, one committed or P batched Hydra deltas."""

    committed: dict[str, HydraWeights]
    candidates: dict[str, HydraWeights]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = widened(self.base(x), x)
        if not self.candidates and not self.committed:
            return out
        num = next(iter(self.candidates.values()))[0].shape[0] if self.candidates else 1
        blocks = x.reshape(num, -1, x.shape[-1])  # (P, n*T, in)
        for target, out_slice in self.out_slices.items():
            if target in self.candidates:
                delta = hydra_delta(blocks, *self.candidates[target])
            elif target in self.committed:  # the same weights for every block
                a, b, router = self.committed[target]
                flat = x.reshape(1, -1, x.shape[-1])
                delta = hydra_delta(flat, a[None], b[None], router[None])
            else:
                continue
            delta = delta.reshape(*out.shape[:-1], -1)
            if out_slice is None:
                out = out + delta
            else:  # a fused module (GPT-2's c_attn): only this target's columns
                add_to_columns(out, out_slice, delta)
        return out
