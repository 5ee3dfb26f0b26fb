"""HydraLoRA's hyper-parameters (an asymmetric LoRA: one shared A, N heads B_i, a router)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets
from dfo_lora.lowrank import DEFAULT_TARGETS


@dataclass(frozen=True)
class HydraConfig:
    """Per adapted projection: y += sum_i softmax(R x)_i B_i A x."""

    name: ClassVar[str] = "hydra"
    targets: tuple[str, ...] = DEFAULT_TARGETS  # projections adapted in every layer
    rank: int = 4  # r of the shared A (r, in) and of every head B_i (out, r)
    heads: int = 3  # N: B heads, mixed per token by the router Linear(in, N)
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections

    def validate(self) -> None:
        check_positive(self, ("rank", "intrinsic_dim"), ("alpha", "sigma"))
        if self.heads < 1:
            raise UserError(f"hydra_heads: must be a positive integer, got {self.heads}")
        check_targets(self.targets)
        chunks = len(self.targets) * (self.heads + 2)
        if self.intrinsic_dim < chunks:
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the {chunks} weights "
                f"(A, {self.heads} heads, router per target) hydra makes from z per layer"
            )
