"""Bottleneck adapters' hyper-parameters (LLM-Adapters): series and parallel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive, check_targets
from dfo_lora.options import Option, check_space_values

# How `down` is set: searched (z -> down and up, LLM-Adapters' two trained matrices) or
# pca (down fixed to the adapter input's top principal directions, whitened; z -> up only,
# so the change up(z) @ tanh(down x) is linear in z, like LoRA's `a_factor pca`).
DOWN_FACTORS = ("searched", "pca")


def weights_per_site(config) -> int:
    """Weights z makes per adapter site: down and up, or up alone (down fixed)."""
    return 1 if config.down == "pca" else 2


# the adapter options both spaces read: help and checks (options.check_space_values)
ADAPTER_OPTIONS = {
    "size": Option(8, "bottleneck width m of each adapter: down (m, H), up (H, m)", positive=True),
    "down": Option(
        "searched",
        "searched: z -> down and up | pca: down fixed to the top adapter_size principal "
        "directions of what the adapter reads, z -> up only (linear in z)",
        choices=DOWN_FACTORS,
    ),
}


def _validate_common(config) -> None:
    check_space_values(config)
    check_positive(config, ("intrinsic_dim",), ("alpha", "sigma"))


@dataclass(frozen=True)
class SeriesConfig:
    """h + up(tanh(down(h))) on the output of each target projection, which must write the
    residual stream (o: after attention; down / proj / output: after the MLP)."""

    name: ClassVar[str] = "series"
    RUN_KEYS: ClassVar[dict[str, str]] = {"size": "adapter_size", "down": "adapter_down"}
    OPTIONS: ClassVar[dict[str, Option]] = {
        "targets": Option(
            None,
            "projections writing the residual stream, an adapter after each",
            shown="o and the MLP output",
        ),
        **ADAPTER_OPTIONS,
    }
    targets: tuple[str, ...] | None = None  # registry names; None: o and the MLP output
    size: int = 8
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    down: str = "searched"

    def validate(self) -> None:
        _validate_common(self)
        if self.targets is None:
            return
        check_targets(self.targets, example="o,down")
        reads = [t for t in self.targets if t in ("q", "k", "v")]
        if reads:
            raise UserError(
                f"targets: series adapters sit after projections that write the residual "
                f"stream; {','.join(reads)} {'does' if len(reads) == 1 else 'do'} not (use o "
                "and the MLP output: down for "
                "llama, proj for gpt2, output for bert/roberta)"
            )
        per_site = weights_per_site(self)
        if self.intrinsic_dim < per_site * len(self.targets):
            what = "down, up" if per_site == 2 else "up"
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} is fewer than the "
                f"{per_site * len(self.targets)} weights ({what} per target) of the series space"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """An adapter beside each layer's MLP: MLP(x) + up(tanh(down(x))), x the MLP's input."""

    name: ClassVar[str] = "parallel"
    RUN_KEYS: ClassVar[dict[str, str]] = {"size": "adapter_size", "down": "adapter_down"}
    OPTIONS: ClassVar[dict[str, Option]] = ADAPTER_OPTIONS
    size: int = 8
    intrinsic_dim: int = 500  # d: entries of z per layer
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections
    down: str = "searched"

    def validate(self) -> None:
        _validate_common(self)
        per_site = weights_per_site(self)
        if self.intrinsic_dim < per_site:
            what = "down, up" if per_site == 2 else "up"
            raise UserError(
                f"intrinsic_dim: must be at least {per_site} ({what}), got {self.intrinsic_dim}"
            )
