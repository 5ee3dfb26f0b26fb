"""BitFit's hyper-parameters: which projections get a searched (or trained) bias shift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets
from dfo_lora.options import Option, check_space_values


@dataclass(frozen=True)
class BitfitConfig:
    """A shift b_t added to the output of each target projection t in every layer."""

    name: ClassVar[str] = "bitfit"
    OPTIONS: ClassVar[dict[str, Option]] = {  # help and checks (options.check_space_values)
        "targets": Option(
            None, "projections whose output gets a bias shift", shown="every projection"
        ),
    }
    targets: tuple[str, ...] | None = None  # registry names; None: all the registry knows
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections

    def validate(self) -> None:
        check_space_values(self)
        check_positive(self, ("intrinsic_dim",), ("alpha", "sigma"))
        if self.targets is None:
            return
        check_targets(self.targets, example="q,v,o")
        if self.intrinsic_dim < len(self.targets):
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the {len(self.targets)} "
                "biases (one per target) of the bitfit space"
            )
