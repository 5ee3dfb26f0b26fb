"""LoRA, the paper's space: z_l -> factor pairs (A_t, B_t) per adapted projection.

The config, the z -> factors maps and the batched projection live in `dfo_lora.lowrank`
(`LowRankConfig`, `LowRankSpace`, `AdaptedProjection`); this module only puts them behind
the `SearchSpace` interface, with the numbers unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.lowrank import (
    AdaptedProjection,
    FactorShape,
    LowRankConfig,
    LowRankSpace,
    install_adapters,
)
from dfo_lora.spaces.base import (
    LayerModules,
    SearchSpace,
    SpaceStatistics,
    StatisticsRequest,
    Weights,
    lora_pair,
)


class LoraLayer(dict):
    """One layer's `AdaptedProjection`s by target (fused q/k/v share one module)."""

    def __init__(self, wrappers: dict[str, AdaptedProjection], reads_input: dict[str, bool]):
        super().__init__(wrappers)
        self.reads_input = reads_input

    def set_candidates(self, weights: Weights) -> None:
        groups: dict[int, tuple[AdaptedProjection, dict]] = {}
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


class LoraSpace(LowRankSpace, SearchSpace):
    """The paper's LoRA space (and its data-informed variants: a_factor, b_basis)."""

    name = "lora"
    mergeable = True
    tensor_names = ("A", "B")

    @classmethod
    def requirements(cls, config: LowRankConfig) -> StatisticsRequest:
        return StatisticsRequest(
            moment_targets=config.targets if config.needs_moments else (),
            head_targets=config.targets if config.b_basis == "verbalizer" else (),
        )

    @classmethod
    def install(cls, config: LowRankConfig, arch, model: nn.Module, layer: nn.Module) -> LoraLayer:
        paths, reads_input = {}, {}
        for target in config.targets:
            proj = arch.projection(model, target)
            paths[target] = (proj.module, proj.out_slice)
            reads_input[target] = proj.reads_layer_input
        return LoraLayer(install_adapters(layer, paths), reads_input)

    @classmethod
    def build(
        cls,
        config: LowRankConfig,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> LoraSpace:
        first = modules[0]  # shapes are the same in every layer
        shapes = [FactorShape(t, *first[t].target_shape(t)) for t in config.targets]
        return cls(config, shapes, stats.sigma_hat, device, stats.moments, stats.head_directions)

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        return self.factors(layer, z, dtype)

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights:
        """Full LoRA factors per target, rank `rank`, B = 0 (the delta B A x, scaling 1)."""
        return {
            s.target: lora_pair(self.config.rank, s.in_features, s.out_features, generator)
            for s in self.shapes
        }
