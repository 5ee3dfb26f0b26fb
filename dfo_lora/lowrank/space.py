"""The LoRA search space: per-layer random projections z -> low-rank factors.

Each layer l has its own vector z_l of `intrinsic_dim` entries (d = 500 in the paper).
z_l is split into 2 * len(targets) chunks, in the order A_t, B_t for each target t
(q, k by default: A_q, B_q, A_k, B_k); each chunk goes through its own fixed random
linear map (no bias) to a flattened factor, A_t (r, in) and B_t (out, r), so the delta
of target t is B_t @ A_t and z = 0 is the unmodified model. When d is not divisible by
the number of chunks the first chunks get one entry more (numpy.array_split sizes).

Projection entries are N(0, s_l^2) with s_l = alpha * sigma_hat_l / (sqrt(d) * sigma)
(BBTv2's initialisation), sigma_hat_l being the std of layer l's input hidden states
(see `clipped_std`), layer 0 using the std of the word-embedding matrix. They are drawn
on the CPU in fp32 from a generator seeded by (seed, layer, chunk), so the same seed
gives the same space on every device.

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

from dfo_lora.errors import UserError, check_positive, check_targets

DEFAULT_TARGETS = ("q", "k")
A_FACTORS = ("searched", "pca", "random")
B_BASES = ("random", "pca", "verbalizer")


@dataclass(frozen=True)
class LowRankConfig:
    """The search space's hyper-parameters (paper defaults)."""

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


def clipped_std(values: torch.Tensor, rounds: int = 5, width: float = 3.0) -> float:
    """Std after `rounds` of clipping to mean +- width * std (BBTv2's hidden-state statistic)."""
    x = values.detach().reshape(-1).float()
    for _ in range(rounds):
        mean, std = x.mean(), x.std()
        x = x.clamp(mean - width * std, mean + width * std)
    return float(x.std())


def whitened_top_directions(moment: torch.Tensor, count: int) -> torch.Tensor:
    """(count, n) rows: the top-`count` eigenvectors of a symmetric (n, n) moment matrix,
    largest first, each scaled by 1 / sqrt(its eigenvalue) so that the moment along it is
    1 (a fixed LoRA A, a fixed adapter down). In the matrix's dtype (fp64 here)."""
    values, vectors = torch.linalg.eigh(moment)  # ascending
    top = torch.arange(len(values) - 1, len(values) - 1 - count, -1)
    scale = values[top].clamp_min(1e-12 * float(values[-1])).rsqrt()
    return vectors[:, top].T * scale[:, None]


@dataclass(frozen=True)
class FactorShape:
    """One factor pair's shape: A (rank, in_features), B (out_features, rank)."""

    target: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ProjectionMoments:
    """One projection's statistics over the real train tokens of the zero state: its
    input's mean (in,) and covariance (in, in), and its output's covariance (out, out)."""

    mean: torch.Tensor
    cov: torch.Tensor
    out_cov: torch.Tensor | None = None

    def input_moment(self, centred: bool) -> torch.Tensor:
        """The input's covariance (centred) or uncentred second moment E[x x^T], fp64 on
        the CPU: what a fixed factor that reads the input is built from."""
        moment = self.cov.double().cpu()
        if centred:
            return moment
        mean = self.mean.double().cpu()
        return moment + torch.outer(mean, mean)


class LowRankSpace:
    """Maps each layer's z (d,) to the low-rank factors of its adapted projections."""

    def __init__(
        self,
        config: LowRankConfig,
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
        self.config = config
        self.shapes = shapes
        self.sigma_hat = list(sigma_hat)
        self.device = device
        self.moments = moments
        self.chunk_sizes = [len(c) for c in np.array_split(np.arange(self.dim), config.num_chunks)]
        self._maps: dict[int, list[torch.Tensor]] = {}
        self._fixed_a: dict[int, list[torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.config.intrinsic_dim

    @property
    def num_layers(self) -> int:
        return len(self.sigma_hat)

    def projection_std(self, layer: int) -> float:
        c = self.config
        return c.alpha * self.sigma_hat[layer] / (np.sqrt(c.intrinsic_dim) * c.sigma)

    def maps(self, layer: int) -> list[torch.Tensor]:
        """The layer's fixed maps, one (numel, chunk) matrix per factor, built on first use."""
        if layer not in self._maps:
            std = self.projection_std(layer)
            mats = []
            for index, (numel, width) in enumerate(self._factor_sizes()):
                gen = torch.Generator().manual_seed(
                    (self.config.seed * 1_000_003 + layer * 1_009 + index) % (2**63)
                )
                if self._is_b_chunk(index) and self.config.b_basis != "random":
                    basis = self._output_basis(layer, self._target_of_chunk(index))
                    mat = self._basis_map(basis, index, width, gen, std)
                else:
                    mat = torch.randn(numel, width, generator=gen, dtype=torch.float32) * std
                mats.append(mat.to(self.device))
            self._maps[layer] = mats
        return self._maps[layer]

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

    def _factor_sizes(self) -> list[tuple[int, int]]:
        r = self.config.rank
        if not self.config.searches_a:  # z feeds the B chunks only
            return [
                (shape.out_features * r, w)
                for shape, w in zip(self.shapes, self.chunk_sizes, strict=True)
            ]
        sizes = []
        for shape, (wa, wb) in zip(self.shapes, _pairs(self.chunk_sizes), strict=True):
            sizes += [(r * shape.in_features, wa), (shape.out_features * r, wb)]
        return sizes

    def fixed_a(self, layer: int) -> list[torch.Tensor]:
        """The layer's fixed A_t (r, in) per target (a_factor pca or random), fp32."""
        if layer not in self._fixed_a:
            mats = []
            for index, shape in enumerate(self.shapes):
                moments = self.moments[layer][shape.target]
                if self.config.a_factor == "pca":
                    mat = whitened_top_directions(moments.input_moment(True), self.config.rank)
                else:
                    gen = torch.Generator().manual_seed(
                        (self.config.seed * 1_000_003 + layer * 1_009 + 500 + index) % (2**63)
                    )
                    raw = torch.randn(shape.in_features, self.config.rank, generator=gen)
                    rows = torch.linalg.qr(raw.double())[0].T  # (r, in) orthonormal
                    second = moments.input_moment(False)
                    mat = rows / torch.sqrt(torch.trace(second) / shape.in_features)
                mats.append(mat.float().to(self.device))
            self._fixed_a[layer] = mats
        return self._fixed_a[layer]

    def factors(
        self, layer: int, z: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """z (P, d) -> {target: (A (P, r, in), B (P, out, r))} in the model's dtype."""
        z = z.to(self.device, torch.float32)
        pieces = torch.split(z, self.chunk_sizes, dim=1)
        mats = self.maps(layer)
        r = self.config.rank
        out = {}
        for i, shape in enumerate(self.shapes):
            if self.config.searches_a:
                a = _rowwise(pieces[2 * i], mats[2 * i]).view(-1, r, shape.in_features)
                b = _rowwise(pieces[2 * i + 1], mats[2 * i + 1]).view(-1, shape.out_features, r)
            else:
                a = self.fixed_a(layer)[i].expand(z.shape[0], r, shape.in_features)
                b = _rowwise(pieces[i], mats[i]).view(-1, shape.out_features, r)
            out[shape.target] = (a.to(dtype), b.to(dtype))
        return out

    def deltas(self, layer: int, z: np.ndarray) -> dict[str, torch.Tensor]:
        """Dense fp32 deltas B @ A (out, in) of one z (d,), for export and reference checks."""
        factors = self.factors(layer, torch.as_tensor(z).reshape(1, -1), torch.float32)
        return {t: (b[0] @ a[0]) for t, (a, b) in factors.items()}


def _rowwise(z: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """z (P, w) @ mat.T, one candidate at a time: BLAS picks different kernels (and so
    different roundings) for different row counts, and a candidate's factors must not
    depend on which others share the call (the Ray backend scores a population in shares)."""
    return torch.cat([row @ mat.T for row in z.split(1)])


def _pairs(seq: list[int]) -> list[tuple[int, int]]:
    return [(seq[i], seq[i + 1]) for i in range(0, len(seq), 2)]
