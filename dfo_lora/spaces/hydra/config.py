"""HydraLoRA's hyper-parameters (an asymmetric LoRA: one shared A, N heads B_i, a router)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets
from dfo_lora.options import Option, check_space_values
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
    OPTIONS: ClassVar[dict[str, Option]] = {  # help and checks (options.check_space_values)
        "targets": Option(DEFAULT_TARGETS, "projections adapted in every layer"),
        "rank": Option(
            4, "r of the shared A (r, in) and of every head B_i (out, r)", positive=True
        ),
        "heads": Option(3, "N: the B heads, mixed per token by the router", positive=True),
        "a_factor": Option(
            "searched",
            "searched: z -> A, the heads and the router | pca: A fixed to the top-r principal "
            "directions of the input, z -> the heads and the router",
            choices=A_FACTORS,
        ),
    }
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 4
    heads: int = 3  # the router is Linear(in, heads)
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    a_factor: str = "searched"

    @property
    def searches_a(self) -> bool:
        return self.a_factor == "searched"

    def validate(self) -> None:
        check_space_values(self)
        check_positive(self, ("intrinsic_dim",), ("alpha", "sigma"))
        check_targets(self.targets)
        per_target = self.heads + (2 if self.searches_a else 1)
        chunks = len(self.targets) * per_target
        if self.intrinsic_dim < chunks:
            what = "A, " if self.searches_a else ""
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the {chunks} weights "
                f"({what}{self.heads} heads, router per target) hydra makes from z per layer"
            )
