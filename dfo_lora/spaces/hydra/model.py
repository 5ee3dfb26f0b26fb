"""The HydraLoRA search space: z_l -> (A, B_1..B_N, R) per adapted projection.

z_l is split into (N + 2) chunks per target, in the order A_t, B_t1 .. B_tN, R_t, each
through its own seeded random map scaled from sigma_hat (`ProjectedSpace`), so z = 0 gives
A = B_i = R = 0: no delta (the router is then uniform, but every head is zero), and a
small z a small change.

With `a_factor = "pca"` each target's A (r, in) is fixed instead, as LoRA's `a_factor pca`:
its rows are the top-r principal directions of the projection's input (covariance over
the train split's real tokens, zero state), each scaled to unit variance; z_l then has
N + 1 chunks per target, B_t1 .. B_tN, R_t. At z = 0 the router is uniform, so a small
step of z changes the delta to first order, (1/N) sum_i B_i(z) A x, linear in z like LoRA
with A fixed; the router's own effect is second order (it mixes heads that start at 0).
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.errors import UserError
from dfo_lora.spaces.base import LayerModules, Weights
from dfo_lora.spaces.hydra.config import HydraConfig
from dfo_lora.spaces.hydra.layer import HydraProjection
from dfo_lora.spaces.projection import ProjectedSpace
from dfo_lora.spaces.statistics import (
    ProjectionMoments,
    SpaceStatistics,
    StatisticsRequest,
    whitened_top_directions,
)


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
    tensor_shapes = {"A": ("rank", "in"), "B": ("heads", "out", "rank"), "router": ("heads", "in")}
    not_mergeable_because = "its router mixes the B heads per token"

    def __init__(
        self,
        config: HydraConfig,
        shapes,
        sigma_hat,
        device,
        moments: list[dict[str, ProjectionMoments]] | None = None,
    ):
        self.shapes = shapes  # [(target, in_features, out_features)], the same in every layer
        if not config.searches_a and moments is None:
            raise UserError("hydra a_factor pca: needs the moments of each projection's input")
        self.moments = moments
        self._fixed_a: dict[int, dict[str, torch.Tensor]] = {}
        super().__init__(config, sigma_hat, device)

    @classmethod
    def requirements(cls, config: HydraConfig) -> StatisticsRequest:
        return StatisticsRequest(moment_targets=() if config.searches_a else config.targets)

    @classmethod
    def install(cls, config: HydraConfig, arch, model: nn.Module, layer: nn.Module) -> HydraLayer:
        paths = {}
        for target in config.targets:
            proj = arch.projection(model, target)
            paths[target] = (proj.module, proj.out_slice)
        return HydraLayer(HydraProjection.install(layer, paths))

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
        return cls(config, shapes, stats.sigma_hat, device, stats.moments)

    def _chunk_numels(self) -> list[int]:
        r, heads = self.config.rank, self.config.heads
        numels = []
        for _target, in_features, out_features in self.shapes:
            a = [r * in_features] if self.config.searches_a else []
            numels += a + [out_features * r] * heads + [heads * in_features]
        return numels

    def fixed_a(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's fixed A (r, in) per target (`a_factor = "pca"`), fp32, on the device."""
        if layer not in self._fixed_a:
            moments = self.moments[layer]
            self._fixed_a[layer] = {
                target: whitened_top_directions(
                    moments[target].input_moment(True), self.config.rank
                )
                .float()
                .to(self.device)
                for target, _, _ in self.shapes
            }
        return self._fixed_a[layer]

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> {target: (A (P, r, in), B (P, N, out, r), R (P, N, in))}."""
        pieces = self.project(layer, z)
        r, heads = self.config.rank, self.config.heads
        out, at = {}, 0
        for target, in_features, out_features in self.shapes:
            if self.config.searches_a:
                a = pieces[at].view(-1, r, in_features)
                at += 1
            else:
                a = self.fixed_a(layer)[target].expand(z.shape[0], r, in_features)
            b = torch.stack([p.view(-1, out_features, r) for p in pieces[at : at + heads]], 1)
            router = pieces[at + heads].view(-1, heads, in_features)
            at += heads + 1
            out[target] = (a.to(dtype), b.to(dtype), router.to(dtype))
        return out
