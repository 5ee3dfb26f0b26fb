"""The low-rank search space (z -> LoRA factors) and the batched low-rank projection.

The server reaches it through `dfo_lora.spaces` (`LoraSpace`, the `lora` entry of the
space registry), like every other search space.
"""

from dfo_lora.lowrank.layer import (
    AdaptedProjection,
    install_adapters,
    merge_delta,
    projection_shape,
)
from dfo_lora.lowrank.space import (
    A_FACTORS,
    DEFAULT_TARGETS,
    FactorShape,
    LowRankConfig,
    LowRankSpace,
    ProjectionMoments,
    clipped_std,
)

__all__ = [
    "A_FACTORS",
    "ProjectionMoments",
    "DEFAULT_TARGETS",
    "AdaptedProjection",
    "FactorShape",
    "LowRankConfig",
    "LowRankSpace",
    "clipped_std",
    "install_adapters",
    "merge_delta",
    "projection_shape",
]
