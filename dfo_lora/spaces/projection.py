"""The random projection z_l -> weights that the searched spaces share (`ProjectedSpace`).

z_l (d entries) is split into chunks (numpy.array_split sizes: the first chunks get one
entry more when d is not divisible), each chunk goes through its own fixed linear map (no
bias), drawn on the CPU in fp32 from a generator seeded by (seed, layer, chunk), so the
same seed gives the same space on every device. Entries are N(0, s_l^2) with
s_l = alpha * sigma_hat_l / (sqrt(d) * sigma) (BBTv2's initialisation): z = 0 gives zero
weights (the unmodified model) and a small z a small change. A space may draw some
chunks' maps differently (`_chunk_map`: LoRA's B inside a data basis).
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from dfo_lora.errors import UserError
from dfo_lora.spaces.base import SearchSpace


def chunk_seed(seed: int, layer: int, index: int) -> int:
    """The generator seed of chunk `index` of layer `layer` (and of other per-layer draws,
    at indices past the chunks)."""
    return (seed * 1_000_003 + layer * 1_009 + index) % (2**63)


def rowwise(z: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """z (P, w) @ mat.T one candidate at a time: a candidate's weights must not depend on
    which others share the call (BLAS rounds differently for different row counts, and the
    Ray backend scores a population in shares)."""
    return torch.cat([row @ mat.T for row in z.split(1)])


class ProjectedSpace(SearchSpace):
    """A space whose z chunks go through seeded random maps scaled from sigma_hat.

    Subclasses give `_chunk_numels()` (the flattened size of each weight a chunk makes,
    the same in every layer) and turn the projected chunks into weights.
    """

    def __init__(self, config, sigma_hat: list[float], device: torch.device):
        self.config = config
        self.sigma_hat = list(sigma_hat)
        self.device = device
        numels = self._chunk_numels()
        if config.intrinsic_dim < len(numels):
            raise UserError(
                f"intrinsic_dim: {config.intrinsic_dim} is fewer than the {len(numels)} "
                f"weights the {self.name} space makes from z per layer"
            )
        self.chunk_sizes = [len(c) for c in np.array_split(np.arange(self.dim), len(numels))]
        self._maps: dict[int, list[torch.Tensor]] = {}

    @abstractmethod
    def _chunk_numels(self) -> list[int]:
        """Flattened size of the weight each chunk of z makes, in chunk order."""

    @property
    def dim(self) -> int:
        return self.config.intrinsic_dim

    def projection_std(self, layer: int) -> float:
        c = self.config
        return c.alpha * self.sigma_hat[layer] / (np.sqrt(c.intrinsic_dim) * c.sigma)

    def maps(self, layer: int) -> list[torch.Tensor]:
        """The layer's fixed (numel, chunk) maps, drawn on the CPU in fp32 on first use."""
        if layer not in self._maps:
            std = self.projection_std(layer)
            mats = []
            for index, (numel, width) in enumerate(
                zip(self._chunk_numels(), self.chunk_sizes, strict=True)
            ):
                gen = torch.Generator().manual_seed(chunk_seed(self.config.seed, layer, index))
                mats.append(self._chunk_map(layer, index, numel, width, gen, std).to(self.device))
            self._maps[layer] = mats
        return self._maps[layer]

    def _chunk_map(
        self, layer: int, index: int, numel: int, width: int, gen: torch.Generator, std: float
    ) -> torch.Tensor:
        """Chunk `index`'s (numel, width) map: N(0, std^2) entries from `gen`."""
        return torch.randn(numel, width, generator=gen, dtype=torch.float32) * std

    def project(self, layer: int, z: torch.Tensor) -> list[torch.Tensor]:
        """z (P, d) -> each chunk's flattened weight (P, numel), fp32."""
        z = z.to(self.device, torch.float32)
        pieces = torch.split(z, self.chunk_sizes, dim=1)
        return [rowwise(p, m) for p, m in zip(pieces, self.maps(layer), strict=True)]
