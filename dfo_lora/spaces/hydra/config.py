"""HydraLoRA's hyper-parameters (an asymmetric LoRA: one shared A, N heads B_i, a router)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets, did_you_mean
from dfo_lora.spaces.lora.config import DEFAULT_TARGETS

# How the shared A is set: searched (z -> A, the heads and the router; HydraLoRA's trained
# matrices) or pca (A fixed to the top-r principal directions of the projection's input,
# whitened, as LoRA's `a_factor pca`; z -> the heads and the router only).
A_FACTORS = ("searched", "pca")


@dataclass(frozen=True)
class HydraConfig:
    """Per adapted projection: y += sum_i softmax(R x)_i B_i A x."""

    name: ClassVar[str] = "hydra"
    # config field -> the run config's key for it, where they differ (`dfo_lora.spaces`)
    RUN_KEYS: ClassVar[dict[str, str]] = {"heads": "hydra_heads"}
    targets: tuple[str, ...] = DEFAULT_TARGETS  # projections adapted in every layer
    rank: int = 4  # r of the shared A (r, in) and of every head B_i (out, r)
    heads: int = 3  # N: B heads, mixed per token by the router Linear(in, N)
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    a_factor: str = "searched"  # searched | pca (see A_FACTORS)

    @property
    def searches_a(self) -> bool:
        return self.a_factor == "searched"

    def validate(self) -> None:
        check_positive(self, ("rank", "intrinsic_dim"), ("alpha", "sigma"))
        if self.heads < 1:
            raise UserError(f"hydra_heads: must be a positive integer, got {self.heads}")
        if self.a_factor not in A_FACTORS:
            raise UserError(
                f"a_factor: {self.a_factor!r} is not one of {', '.join(A_FACTORS)} for the "
                f"hydra space{did_you_mean(self.a_factor, A_FACTORS)}"
            )
        check_targets(self.targets)
        per_target = self.heads + (2 if self.searches_a else 1)
        chunks = len(self.targets) * per_target
        if self.intrinsic_dim < chunks:
            what = "A, " if self.searches_a else ""
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the {chunks} weights "
                f"({what}{self.heads} heads, router per target) hydra makes from z per layer"
            )
