"""The LoRA space's hyper-parameters (the paper's defaults; a_factor and b_basis are ours)."""

from __future__ import annotations

from dataclasses import dataclass

from dfo_lora.errors import UserError, check_positive, check_targets

DEFAULT_TARGETS = ("q", "k")
A_FACTORS = ("searched", "pca", "random")
B_BASES = ("random", "pca", "verbalizer")


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA search space's hyper-parameters (paper defaults)."""

    targets: tuple[str, ...] = DEFAULT_TARGETS  # projections adapted in every layer
    rank: int = 4  # r of each factor pair; no alpha/r scaling
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    a_factor: str = "searched"  # searched (paper) | pca | random: fixed A, z -> B only
    b_basis: str = "random"  # random (paper) | pca | verbalizer: where B's columns may lie
    basis_dim: int = 32  # b_basis pca: how many top output directions B may use

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
        check_positive(self, ("rank", "intrinsic_dim"), ("alpha", "sigma"))
        check_targets(self.targets)
        if self.b_basis not in B_BASES:
            raise UserError(f"b_basis: {self.b_basis!r} is not one of {', '.join(B_BASES)}")
        if self.basis_dim <= 0:
            raise UserError(f"basis_dim: must be a positive integer, got {self.basis_dim}")
        if self.a_factor not in A_FACTORS:
            raise UserError(f"a_factor: {self.a_factor!r} is not one of {', '.join(A_FACTORS)}")
        if self.intrinsic_dim < self.num_chunks:
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the "
                f"{self.num_chunks} chunks of targets {','.join(self.targets)}"
            )
