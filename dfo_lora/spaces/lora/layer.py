"""A projection with low-rank deltas that can hold P candidates at once, and one layer's
such projections by target (`LoraLayer`, the `LayerModules` of the LoRA space).

`LoraProjection` wraps one frozen projection (nn.Linear or GPT-2's Conv1D) and adds
`B_t @ A_t @ x` to the output slice of each target t it carries (one slice for a plain
projection; q, k, v slices of GPT-2's fused c_attn). Per target it holds either

- nothing: exactly the frozen module;
- one committed factor pair (A (r, in), B (out, r)): the layer's current best z;
- P candidates' factors (A (P, r, in), B (P, out, r)) for a batch stacked as
  P blocks of n sequences: every block gets its own delta through batched matmuls
  (the multi-LoRA / BGMV idea), instead of P separate forwards.

With `shared_input` the P blocks are known to carry the same input (the layer being
searched reads the cached prefix output, identical for all candidates): the base
projection and the A-projection then run once on one block and only the rank-r
up-projection is per candidate.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.spaces.base import Weights
from dfo_lora.spaces.modules import SlicedProjection, add_to_columns, widened

Factors = tuple[torch.Tensor, torch.Tensor]


class LoraProjection(SlicedProjection):
    """A frozen projection plus, per target slice, one committed or P batched deltas."""

    committed: dict[str, Factors]
    candidates: dict[str, Factors]

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.shared_input = False

    def set_committed(self, target: str, factors: Factors | None) -> None:
        if factors is None:
            self.committed.pop(target, None)
        else:
            self.committed[target] = factors

    def set_candidates(self, candidates: dict[str, Factors], shared_input: bool = False) -> None:
        """Install P candidates' factors for some targets (the rest keep their commits)."""
        self.candidates = candidates
        self.shared_input = shared_input and bool(candidates)

    def clear_candidates(self) -> None:
        self.candidates = {}
        self.shared_input = False

    def _add(self, out: torch.Tensor, target: str, delta: torch.Tensor) -> None:
        add_to_columns(out, self.out_slices[target], delta)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return widened(self.base(x), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.candidates:
            out = self._base(x)
            for target, (a, b) in self.committed.items():  # (r, in), (out, r)
                self._add(out, target, (x @ a.T) @ b.T)
            return out
        num_cand = next(iter(self.candidates.values()))[0].shape[0]
        # Rows are P blocks of n sequences x T positions, whether x is (P*n, T, in) or
        # flattened to (P*n*T, in) as some MLPs (OPT's) do.
        width = x.shape[-1]
        rows = x.numel() // width
        block = rows // num_cand  # n * T rows per candidate
        if self.shared_input:
            x0 = x.reshape(rows, width)[:block]  # every block holds this same input
            base = self._base(x0)  # (nT, out)
            out = base.repeat(num_cand, 1).view(*x.shape[:-1], -1)  # a real copy to add into
            x_blocks = None
        else:
            x0 = None
            out = self._base(x)
            x_blocks = x.reshape(num_cand, block, width)
        for target in self.out_slices:
            if target in self.candidates:
                a, b = self.candidates[target]  # (P, r, in), (P, out, r)
                rank = a.shape[1]
                if x0 is not None:  # one matmul for all candidates' A on the shared input
                    u = x0 @ a.reshape(num_cand * rank, width).T
                    u = u.view(block, num_cand, rank).transpose(0, 1)  # (P, nT, r)
                else:
                    u = torch.bmm(x_blocks, a.transpose(1, 2))  # (P, nT, r)
                delta = torch.bmm(u, b.transpose(1, 2))  # (P, nT, out)
                self._add(out, target, delta.reshape(*x.shape[:-1], -1))
            elif target in self.committed:
                a, b = self.committed[target]
                self._add(out, target, (x @ a.T) @ b.T)
        return out


class LoraLayer(dict):
    """One layer's `LoraProjection`s by target (fused q/k/v share one module)."""

    def __init__(self, wrappers: dict[str, LoraProjection], reads_input: dict[str, bool]):
        super().__init__(wrappers)
        self.reads_input = reads_input

    def set_candidates(self, weights: Weights) -> None:
        groups: dict[int, tuple[LoraProjection, dict]] = {}
        for target, pair in weights.items():
            module = self[target]
            groups.setdefault(id(module), (module, {}))[1][target] = pair
        for module, factors in groups.values():
            # The layer input is the same in every stacked block: share base and A x.
            shared = all(self.reads_input[t] for t in factors)
            module.set_candidates(factors, shared_input=shared)

    def clear_candidates(self) -> None:
        for module in {id(m): m for m in self.values()}.values():
            module.clear_candidates()

    def commit(self, weights: Weights | None) -> None:
        for target, module in self.items():
            if weights is None:
                module.set_committed(target, None)
            else:
                a, b = weights[target]
                module.set_committed(target, (a[0], b[0]))
