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

The shared parts live beside it: `statistics.py` (what the server measures for a space),
`projection.py` (`ProjectedSpace`, the seeded random maps z -> weights) and `modules.py`
(the frozen projections' shapes and output slices, wrapping and unwrapping).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dfo_lora.spaces.statistics import SpaceStatistics, StatisticsRequest

# Per weight group (a target, an adapter site): tensors whose first dimension is the
# candidate (P), e.g. LoRA's {"q": (A (P, r, in), B (P, out, r))}.
Weights = dict[str, tuple[torch.Tensor, ...]]


def take(weights: Weights, start: int, stop: int) -> Weights:
    """Candidates start..stop of a population's weights (a chunk of one stacked forward)."""
    return {key: tuple(t[start:stop] for t in group) for key, group in weights.items()}


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
    # Why a space that is not mergeable exports only as native (`dfo-lora export`).
    not_mergeable_because: ClassVar[str] = "its change depends on the input"
    # Each tensor of a group by the sizes naming its dimensions: an attribute of the
    # space's config (rank, heads, size) or "in"/"out", the module's widths (checked when
    # tuned.safetensors or a native export is read back).
    tensor_shapes: ClassVar[dict[str, tuple[str, ...]]] = {}
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

    @property
    def shared_prefix(self) -> int:
        """Leading positions that hold the same tokens in every example (a prompt space's
        prompt), which a causal model can run once per candidate (`prefix_span`); 0: none."""
        return 0

    def prefix_span(self, modules: list[LayerModules], span: str):
        """A context in which the modules treat each call as the shared prefix alone
        ("prompt") or as the input after it ("off"); only where `shared_prefix` > 0."""
        raise NotImplementedError(f"the {self.name} space has no shared prefix")

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


def lora_pair(
    rank: int, in_features: int, out_features: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (1, rank, in) uniform in +-1/sqrt(in) (peft's kaiming-uniform bound) and B (1, out,
    rank) zero: a trainable low-rank pair whose product starts at zero."""
    bound = 1.0 / np.sqrt(in_features)
    a = (torch.rand(1, rank, in_features, generator=generator) * 2 - 1) * bound
    b = torch.zeros(1, out_features, rank)
    return a.requires_grad_(True), b.requires_grad_(True)
