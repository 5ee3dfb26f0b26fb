"""LoRA, the paper's space: per-layer random projections z_l -> low-rank factors.

Each layer l has its own vector z_l of `intrinsic_dim` entries (d = 500 in the paper).
z_l is split into 2 * len(targets) chunks, in the order A_t, B_t for each target t
(q, k by default: A_q, B_q, A_k, B_k); each chunk goes through its own fixed random
linear map (`ProjectedSpace`: seeded by (seed, layer, chunk), std from sigma_hat_l) to a
flattened factor, A_t (r, in) and B_t (out, r), so the delta of target t is B_t @ A_t and
z = 0 is the unmodified model.

`a_factor` (not the paper's; default `searched` is) fixes each A_t instead of searching it,
and all of z goes to the B_t chunks, so the delta B_t(z) @ A_t is linear in z, as in
LoRA's own initialisation (B = 0, A random): a small step of z changes the loss to first
order, where the paper's z = 0 (A = B = 0) changes it only to second order.
- `pca`: A_t's rows are the top-r principal directions of the projection's input over the
  train split's real tokens (zero state), scaled to unit variance (whitened), so A_t x are
  the r main coordinates of what the module reads;
- `random`: r random orthonormal rows (seeded like the maps), scaled so A_t x has unit
  variance on average.

`b_basis` (not the paper's; default `random` is) confines the columns of each B_t:
- `pca`: to the top `basis_dim` principal directions of the projection's output;
- `verbalizer`: to the C directions of the residual stream that move the C verbalizer
  logits (the gradients of each logit with respect to the last hidden state, at the
  mean slot state of the zero state's train split), for projections that write the
  residual stream (o, down). With A fixed, each layer's delta is then a small linear
  read-out of the module's main input coordinates written straight into the label
  logits' directions: z sets C x r numbers per target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dfo_lora.errors import UserError
from dfo_lora.spaces.base import LayerModules, Weights, lora_pair
from dfo_lora.spaces.lora.config import LoraConfig
from dfo_lora.spaces.lora.layer import LoraLayer, LoraProjection
from dfo_lora.spaces.projection import ProjectedSpace, chunk_seed
from dfo_lora.spaces.statistics import (
    ProjectionMoments,
    SpaceStatistics,
    StatisticsRequest,
    whitened_top_directions,
)

RANDOM_A_INDEX = 500  # a_factor random: A_t's generator index is this + t (past the chunks)


@dataclass(frozen=True)
class FactorShape:
    """One factor pair's shape: A (rank, in_features), B (out_features, rank)."""

    target: str
    in_features: int
    out_features: int


class LoraSpace(ProjectedSpace):
    """The paper's LoRA space (and its data-informed variants: a_factor, b_basis)."""

    name = "lora"
    mergeable = True
    tensor_names = ("A", "B")
    tensor_shapes = {"A": ("rank", "in"), "B": ("out", "rank")}

    def __init__(
        self,
        config: LoraConfig,
        shapes: list[FactorShape],
        sigma_hat: list[float],
        device: torch.device,
        moments: list[dict[str, ProjectionMoments]] | None = None,
        head_directions: torch.Tensor | None = None,
    ):
        config.validate()
        if config.needs_moments and moments is None:
            raise UserError("a_factor/b_basis: pca and random need the projections' statistics")
        if config.b_basis == "verbalizer" and head_directions is None:
            raise UserError("b_basis verbalizer: needs the verbalizer's head directions")
        self.head_directions = head_directions  # (C, hidden): moves each verbalizer logit
        self.shapes = shapes
        self.moments = moments
        self._fixed_a: dict[int, list[torch.Tensor]] = {}
        super().__init__(config, sigma_hat, device)

    @classmethod
    def requirements(cls, config: LoraConfig) -> StatisticsRequest:
        return StatisticsRequest(
            moment_targets=config.targets if config.needs_moments else (),
            head_targets=config.targets if config.b_basis == "verbalizer" else (),
        )

    @classmethod
    def install(cls, config: LoraConfig, arch, model: nn.Module, layer: nn.Module) -> LoraLayer:
        paths, reads_input = {}, {}
        for target in config.targets:
            proj = arch.projection(model, target)
            paths[target] = (proj.module, proj.out_slice)
            reads_input[target] = proj.reads_layer_input
        return LoraLayer(LoraProjection.install(layer, paths), reads_input)

    @classmethod
    def build(
        cls,
        config: LoraConfig,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> LoraSpace:
        first = modules[0]  # shapes are the same in every layer
        shapes = [FactorShape(t, *first[t].target_shape(t)) for t in config.targets]
        return cls(config, shapes, stats.sigma_hat, device, stats.moments, stats.head_directions)

    # ------------------------------------------------------------------ the maps
    def _chunk_numels(self) -> list[int]:
        """A_t (r * in) and B_t (out * r) per target, or B_t only with A fixed."""
        r = self.config.rank
        numels = []
        for shape in self.shapes:
            if self.config.searches_a:
                numels.append(r * shape.in_features)
            numels.append(shape.out_features * r)
        return numels

    def _chunk_map(
        self, layer: int, index: int, numel: int, width: int, gen: torch.Generator, std: float
    ) -> torch.Tensor:
        if self._is_b_chunk(index) and self.config.b_basis != "random":
            basis = self._output_basis(layer, self._target_of_chunk(index))
            return self._basis_map(basis, index, width, gen, std)
        return super()._chunk_map(layer, index, numel, width, gen, std)

    def _is_b_chunk(self, index: int) -> bool:
        return not self.config.searches_a or index % 2 == 1

    def _target_of_chunk(self, index: int) -> FactorShape:
        return self.shapes[index if not self.config.searches_a else index // 2]

    def _output_basis(self, layer: int, shape: FactorShape) -> torch.Tensor:
        """Orthonormal (out, m) columns that B may use: the output's top `basis_dim`
        principal directions (pca), or the verbalizer's head directions (verbalizer)."""
        if self.config.b_basis == "verbalizer":
            return torch.linalg.qr(self.head_directions.double().cpu().T)[0].float()
        cov = self.moments[layer][shape.target].out_cov.double().cpu()
        m = min(self.config.basis_dim, shape.out_features)
        return torch.linalg.eigh(cov)[1][:, -m:].flip(1).float()  # (out, m), top first

    def _basis_map(
        self, basis: torch.Tensor, index: int, width: int, gen: torch.Generator, std: float
    ) -> torch.Tensor:
        """(out*r, width) map whose B = U @ C: U the orthonormal `basis` (out, m), C (m, r)
        a random map of the chunk, scaled by sqrt(out/m) so that B has the size it would
        have with a random map."""
        shape, r = self._target_of_chunk(index), self.config.rank
        m = basis.shape[1]
        small = torch.randn(m * r, width, generator=gen) * (std * (shape.out_features / m) ** 0.5)
        # B (out, r) = basis @ C, C (m, r) = small @ z viewed (m, r): row-major B index o*r+j.
        return torch.einsum("om,mjw->ojw", basis, small.view(m, r, width)).reshape(-1, width)

    def fixed_a(self, layer: int) -> list[torch.Tensor]:
        """The layer's fixed A_t (r, in) per target (a_factor pca or random), fp32."""
        if layer not in self._fixed_a:
            mats = []
            for index, shape in enumerate(self.shapes):
                moments = self.moments[layer][shape.target]
                if self.config.a_factor == "pca":
                    mat = whitened_top_directions(moments.input_moment(True), self.config.rank)
                else:
                    seed = chunk_seed(self.config.seed, layer, RANDOM_A_INDEX + index)
                    gen = torch.Generator().manual_seed(seed)
                    raw = torch.randn(shape.in_features, self.config.rank, generator=gen)
                    rows = torch.linalg.qr(raw.double())[0].T  # (r, in) orthonormal
                    second = moments.input_moment(False)
                    mat = rows / torch.sqrt(torch.trace(second) / shape.in_features)
                mats.append(mat.float().to(self.device))
            self._fixed_a[layer] = mats
        return self._fixed_a[layer]

    # ------------------------------------------------------------------ z -> weights
    def factors(
        self, layer: int, z: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """z (P, d) -> {target: (A (P, r, in), B (P, out, r))} in the model's dtype."""
        flat = self.project(layer, z)
        r = self.config.rank
        out = {}
        for i, shape in enumerate(self.shapes):
            if self.config.searches_a:
                a = flat[2 * i].view(-1, r, shape.in_features)
                b = flat[2 * i + 1].view(-1, shape.out_features, r)
            else:
                a = self.fixed_a(layer)[i].expand(flat[i].shape[0], r, shape.in_features)
                b = flat[i].view(-1, shape.out_features, r)
            out[shape.target] = (a.to(dtype), b.to(dtype))
        return out

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        return self.factors(layer, z, dtype)

    def deltas(self, layer: int, z: np.ndarray) -> dict[str, torch.Tensor]:
        """Dense fp32 deltas B @ A (out, in) of one z (d,), for export and reference checks."""
        factors = self.factors(layer, torch.as_tensor(z).reshape(1, -1), torch.float32)
        return {t: (b[0] @ a[0]) for t, (a, b) in factors.items()}

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights:
        """Full LoRA factors per target, rank `rank`, B = 0 (the delta B A x, scaling 1)."""
        return {
            s.target: lora_pair(self.config.rank, s.in_features, s.out_features, generator)
            for s in self.shapes
        }
