"""The LoRA space's hyper-parameters (the paper's defaults; a_factor and b_basis are ours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets
from dfo_lora.options import Option, check_space_values

DEFAULT_TARGETS = ("q", "k")
A_FACTORS = ("searched", "pca", "random")
B_BASES = ("random", "pca", "verbalizer")


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA search space's hyper-parameters (paper defaults)."""

    name: ClassVar[str] = "lora"
    # the options only some spaces read: their help and checks (`options.check_space_values`)
    OPTIONS: ClassVar[dict[str, Option]] = {
        "targets": Option(DEFAULT_TARGETS, "projections adapted in every layer"),
        "rank": Option(4, "r of every LoRA factor pair", positive=True),
        "a_factor": Option(
            "searched",
            "searched (the paper: z -> A and B) | pca | random: A fixed (top-r principal "
            "directions of the module input, or random), z -> B only, a delta linear in z",
            choices=A_FACTORS,
        ),
        "b_basis": Option(
            "random",
            "random (the paper) | pca: B's columns lie in the top basis_dim principal "
            "directions of the projection's output on the train split | verbalizer: in the "
            "directions that move the verbalizer logits (targets writing the residual "
            "stream: o, down)",
            choices=B_BASES,
        ),
        "basis_dim": Option(32, "b_basis pca: output directions B may use", positive=True),
    }
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank: int = 4  # no alpha/r scaling
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    a_factor: str = "searched"
    b_basis: str = "random"
    basis_dim: int = 32

    @property
    def searches_a(self) -> bool:
        return self.a_factor == "searched"

    @property
    def needs_moments(self) -> bool:
        return not self.searches_a or self.b_basis == "pca"

    @property
    def num_chunks(self) -> int:
        return len(self.targets) * (2 if self.searches_a else 1)

    def validate(self) -> None:
        check_space_values(self)
        check_positive(self, ("intrinsic_dim",), ("alpha", "sigma"))
        check_targets(self.targets)
        if self.intrinsic_dim < self.num_chunks:
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the "
                f"{self.num_chunks} chunks of targets {','.join(self.targets)}"
            )
