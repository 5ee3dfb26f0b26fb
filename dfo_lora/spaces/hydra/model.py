"""The HydraLoRA search space: z_l -> (A, B_1..B_N, R) per adapted projection.

z_l is split into (N + 2) chunks per target, in the order A_t, B_t1 .. B_tN, R_t, each
through its own seeded random map scaled from sigma_hat (`ProjectedSpace`), so z = 0 gives
A = B_i = R = 0: no delta (the router is then uniform, but every head is zero), and a
small z a small change.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.spaces.base import LayerModules, ProjectedSpace, SpaceStatistics, Weights
from dfo_lora.spaces.hydra.config import HydraConfig
from dfo_lora.spaces.hydra.layer import HydraProjection, install_hydra


class HydraLayer(dict):
    """One layer's `HydraProjection`s by target (fused q/k/v share one module)."""

    def _modules(self) -> list[HydraProjection]:
        return list({id(m): m for m in self.values()}.values())

    def set_candidates(self, weights: Weights) -> None:
        for module in self._modules():
            module.candidates = {t: w for t, w in weights.items() if self[t] is module}

    def clear_candidates(self) -> None:
        for module in self._modules():
            module.candidates = {}

    def commit(self, weights: Weights | None) -> None:
        for target, module in self.items():
            if weights is None:
                module.committed.pop(target, None)
            else:
                module.committed[target] = tuple(t[0] for t in weights[target])


class HydraSpace(ProjectedSpace):
    """HydraLoRA on the configured targets: input-dependent deltas, not mergeable."""

    name = "hydra"
    mergeable = False
    tensor_names = ("A", "B", "router")

    def __init__(self, config: HydraConfig, shapes, sigma_hat, device):
        self.shapes = shapes  # [(target, in_features, out_features)], the same in every layer
        super().__init__(config, sigma_hat, device)

    @classmethod
    def install(cls, config: HydraConfig, arch, model: nn.Module, layer: nn.Module) -> HydraLayer:
        paths = {}
        for target in config.targets:
            proj = arch.projection(model, target)
            paths[target] = (proj.module, proj.out_slice)
        return HydraLayer(install_hydra(layer, paths))

    @classmethod
    def build(
        cls,
        config: HydraConfig,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> HydraSpace:
        shapes = [(t, *modules[0][t].target_shape(t)) for t in config.targets]
        return cls(config, shapes, stats.sigma_hat, device)

    def _chunk_numels(self) -> list[int]:
        r, heads = self.config.rank, self.config.heads
        numels = []
        for _target, in_features, out_features in self.shapes:
            numels += [r * in_features] + [out_features * r] * heads + [heads * in_features]
        return numels

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> {target: (A (P, r, in), B (P, N, out, r), R (P, N, in))}."""
        pieces = self.project(layer, z)
        r, heads = self.config.rank, self.config.heads
        out, at = {}, 0
        for target, in_features, out_features in self.shapes:
            a = pieces[at].view(-1, r, in_features)
            b = torch.stack(
                [p.view(-1, out_features, r) for p in pieces[at + 1 : at + 1 + heads]], 1
            )
            router = pieces[at + 1 + heads].view(-1, heads, in_features)
            at += heads + 2
            out[target] = (a.to(dtype), b.to(dtype), router.to(dtype))
        return out
