"""The one interface between the evaluation server and a search space.

A search space turns each layer's vector z_l (`dim` entries) into the weights of some
modules installed in that layer. The server never looks inside: it asks the space which
statistics of the train split it needs, computes them (`SpaceStatistics`), and then only

- installs the space's modules into every layer (`install`, the zero state: exactly the
  frozen model), which gives one `LayerModules` per layer;
- turns P candidates z (P, d) into their weights (`weights`: a dict of tuples of tensors,
  every tensor with the candidates on its first dimension, so the server can cut a
  population into chunks without knowing what the tensors are);
- hands a chunk of them to a layer's modules for one stacked forward (`set_candidates` /
  `clear_candidates`), or one state (P = 1) to keep (`commit`);
- asks for the dense weight deltas of one state where the change is input-independent
  (`deltas`, None where it is not: such a space cannot be merged or exported as a LoRA),
  the arrays to store for one state (`export_tensors`) and the space's own saved state
  (`state`: name, seed, statistics), for export and for the run's tuned.safetensors.

`ProjectedSpace` is the shared part of the spaces that follow today's LoRA space: z_l is
split into chunks (numpy.array_split sizes), each chunk goes through its own fixed random
map (no bias) seeded by (seed, layer, chunk), with entries N(0, s_l^2),
s_l = alpha * sigma_hat_l / (sqrt(d) * sigma) (BBTv2's initialisation), so z = 0 gives zero
weights (the unmodified model) and a small z a small change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dfo_lora.lowrank.space import ProjectionMoments

# Per weight group (a target, an adapter site): tensors whose first dimension is the
# candidate (P), e.g. LoRA's {"q": (A (P, r, in), B (P, out, r))}.
Weights = dict[str, tuple[torch.Tensor, ...]]


def take(weights: Weights, start: int, stop: int) -> Weights:
    """Candidates start..stop of a population's weights (a chunk of one stacked forward)."""
    return {key: tuple(t[start:stop] for t in group) for key, group in weights.items()}


@dataclass(frozen=True)
class StatisticsRequest:
    """What a space needs measured on the zero state's train split besides sigma_hat."""

    moment_targets: tuple[str, ...] = ()  # projections whose input/output moments it reads
    head_targets: tuple[str, ...] = ()  # verbalizer head directions, for these targets
    site_moments: bool = False  # mean/covariance of what each site reads (`sources`)


@dataclass(frozen=True)
class SpaceStatistics:
    """The train split's statistics, computed by the server on the zero state."""

    sigma_hat: list[float]  # per layer: std of its input hidden states (layer 0: embeddings)
    moments: list[dict[str, ProjectionMoments]] | None = None
    head_directions: torch.Tensor | None = None  # (C, H)
    # per layer, per site of the space's modules: (mean, cov) of what it reads (out_cov None)
    site_moments: list[dict[str, ProjectionMoments]] | None = None


class LayerModules(Protocol):
    """A space's modules inside one layer, driven by the server."""

    def set_candidates(self, weights: Weights) -> None:
        """Install P candidates for one forward of P stacked blocks of n sequences."""

    def clear_candidates(self) -> None:
        """Back to the committed state."""

    def commit(self, weights: Weights | None) -> None:
        """Keep one state (weights of P = 1), or None for the zero state."""

    # Spaces that ask for `site_moments` also give, per site, the module whose input
    # ("in") or output ("out") the site reads: `sources: dict[str, tuple[nn.Module, str]]`.


class SearchSpace(ABC):
    """z per layer -> the weights of a space's modules (see the module docstring)."""

    name: ClassVar[str]
    mergeable: ClassVar[bool] = False  # deltas() gives dense weight deltas
    config: object
    sigma_hat: list[float]

    @classmethod
    def requirements(cls, config) -> StatisticsRequest:
        return StatisticsRequest()

    @classmethod
    def prepare_examples(cls, config, model: nn.Module, examples: list) -> list:
        """The encoded examples as this space scores them (a prompt space puts its prompt
        tokens in front); the server calls it once per split."""
        return examples

    @classmethod
    @abstractmethod
    def install(cls, config, arch, model: nn.Module, layer: nn.Module) -> LayerModules:
        """Wrap the layer's modules (idempotent on a reused backbone: zero state)."""

    @classmethod
    @abstractmethod
    def build(
        cls,
        config,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> SearchSpace:
        """The space over an installed backbone and the train split's statistics."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Entries of z per layer."""

    @property
    def num_layers(self) -> int:
        return len(self.sigma_hat)

    @abstractmethod
    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> the P candidates' weights at `layer`, in `dtype`."""

    def deltas(self, layer: int, z: np.ndarray) -> dict[str, torch.Tensor] | None:
        """Dense fp32 weight deltas of one z (d,), or None: the change depends on the input."""
        return None

    def export_tensors(self, layer: int, z: np.ndarray) -> dict[str, np.ndarray]:
        """fp32 arrays of one state at `layer`, keyed "<group>.<name>" (tuned.safetensors)."""
        weights = self.weights(layer, torch.as_tensor(z).reshape(1, -1), torch.float32)
        names = self.tensor_names
        return {
            f"{key}.{name}": t[0].cpu().numpy()
            for key, group in weights.items()
            for name, t in zip(names, group, strict=True)
        }

    tensor_names: ClassVar[tuple[str, ...]] = ()  # names of each group's tensors

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights | None:
        """Trainable fp32 weights of the space's own modules at `layer` (P = 1), at their
        initial state (the unmodified model), for the `gradient` method; None where the
        space has no such parameters beside z."""
        return None

    def state(self) -> dict:
        """What rebuilds this space besides the run's config: its name, seed, statistics."""
        return {
            "space": self.name,
            "seed": int(self.config.seed),
            "sigma_hat": [float(s) for s in self.sigma_hat],
        }


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
            from dfo_lora.errors import UserError

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
                gen = torch.Generator().manual_seed(
                    (self.config.seed * 1_000_003 + layer * 1_009 + index) % (2**63)
                )
                mat = torch.randn(numel, width, generator=gen, dtype=torch.float32) * std
                mats.append(mat.to(self.device))
            self._maps[layer] = mats
        return self._maps[layer]

    def project(self, layer: int, z: torch.Tensor) -> list[torch.Tensor]:
        """z (P, d) -> each chunk's flattened weight (P, numel), fp32."""
        z = z.to(self.device, torch.float32)
        pieces = torch.split(z, self.chunk_sizes, dim=1)
        return [rowwise(p, m) for p, m in zip(pieces, self.maps(layer), strict=True)]


def lora_pair(
    rank: int, in_features: int, out_features: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, rank, in) uniform in +-1/sqrt(in) (peft's kaiming-uniform bound) and B (1, out,
    rank) zero: a trainable low-rank pair whose product starts at zero."""
    bound = 1.0 / np.sqrt(in_features)
    a = (torch.rand(1, rank, in_features, generator=generator) * 2 - 1) * bound
    b = torch.zeros(1, out_features, rank)
    return a.requires_grad_(True), b.requires_grad_(True)


def rowwise(z: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
    """z (P, w) @ mat.T one candidate at a time: a candidate's weights must not depend on
    which others share the call (BLAS rounds differently for different row counts, and the
    Ray backend scores a population in shares)."""
    return torch.cat([row @ mat.T for row in z.split(1)])


def wrap_module(layer: nn.Module, path: str, make) -> nn.Module:
    """Replace the module at `path` (relative to `layer`) by `make(module)` unless it is
    already wrapped by that kind; returns the wrapper."""
    parent_path, _, attr = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    module = getattr(parent, attr)
    wrapper = make(module)
    if wrapper is not module:
        setattr(parent, attr, wrapper)
    return wrapper


# The attribute under which a space keeps the hook object it registered on a module (a
# forward pre-hook marked `is_space_hook`: the prompt spaces' shifts).
SPACE_HOOK = "_dfo_space_hook"


def unwrap_all(model: nn.Module) -> nn.Module:
    """Replace every space wrapper (a module with a `base` it wraps, marked
    `is_space_wrapper`) in `model` by its base and remove every space hook, in place: the
    stock HF model again. Hooks are found by value, not handle: a deep copy's handles
    point at the original's hooks."""
    for module in model.modules():
        module.__dict__.pop(SPACE_HOOK, None)
        for key, hook in list(module._forward_pre_hooks.items()):
            if getattr(hook, "is_space_hook", False):
                del module._forward_pre_hooks[key]
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            while getattr(child, "is_space_wrapper", False):
                child = child.base
            setattr(module, child_name, child)
    return model
