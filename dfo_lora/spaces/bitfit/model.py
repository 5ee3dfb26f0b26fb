"""The bitfit search space: z_l -> one bias shift per target projection of layer l.

z_l is split into one chunk per target, each through its own seeded random map scaled
from sigma_hat (`ProjectedSpace`, BBTv2's initialisation): z = 0 gives zero shifts, the
unmodified model. The change does not depend on the input, but a model whose projections
have no bias (Llama) has nothing to merge it into, so it exports in the native format.
For the `gradient` method its own parameters are the shifts themselves (BitFit), zero at
the start.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.spaces.base import LayerModules, Weights
from dfo_lora.spaces.bitfit.config import BitfitConfig
from dfo_lora.spaces.bitfit.layer import BiasShift
from dfo_lora.spaces.modules import out_width, projection_shape, wrap_module
from dfo_lora.spaces.projection import ProjectedSpace
from dfo_lora.spaces.statistics import SpaceStatistics


class BitfitLayer(dict):
    """One layer's `BiasShift`s by target (fused q/k/v share one module), with widths."""

    def __init__(self, modules: dict[str, BiasShift], widths: dict[str, int]):
        super().__init__(modules)
        self.widths = widths

    def set_candidates(self, weights: Weights) -> None:
        for target, (bias,) in weights.items():
            self[target].candidates[target] = bias

    def clear_candidates(self) -> None:
        for module in self.values():
            module.candidates.clear()

    def commit(self, weights: Weights | None) -> None:
        for target, module in self.items():
            if weights is None:
                module.committed.pop(target, None)
            else:
                module.committed[target] = weights[target][0][0]


def _shift(module: nn.Module) -> BiasShift:
    return module if isinstance(module, BiasShift) else BiasShift(module)


class BitfitSpace(ProjectedSpace):
    """BitFit: a bias shift on the output of each target projection."""

    name = "bitfit"
    mergeable = False
    tensor_names = ("bias",)
    tensor_shapes = {"bias": ("out",)}
    not_mergeable_because = (
        "its bias shifts are no weight delta (Llama's projections have no bias to merge them into)"
    )

    def __init__(self, config: BitfitConfig, widths: dict[str, int], sigma_hat, device):
        self.widths = widths  # target -> output width, the same in every layer
        super().__init__(config, sigma_hat, device)

    @classmethod
    def install(cls, config: BitfitConfig, arch, model: nn.Module, layer: nn.Module) -> BitfitLayer:
        modules, widths = {}, {}
        for target in config.targets or tuple(arch.projections(model)):
            proj = arch.projection(model, target)
            module = wrap_module(layer, proj.module, _shift)
            module.add_target(target, proj.out_slice)
            module.committed.pop(target, None)  # a reused backbone: the zero state
            module.candidates.clear()
            modules[target] = module
            widths[target] = out_width(proj.out_slice, projection_shape(module.base)[1])
        return BitfitLayer(modules, widths)

    @classmethod
    def build(
        cls,
        config: BitfitConfig,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> BitfitSpace:
        return cls(config, dict(modules[0].widths), stats.sigma_hat, device)

    def _chunk_numels(self) -> list[int]:
        return list(self.widths.values())

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> {target: (bias (P, w),)}."""
        pieces = self.project(layer, z)
        return {t: (p.to(dtype),) for t, p in zip(self.widths, pieces, strict=True)}

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights:
        """The shifts themselves, zero (BitFit trains the biases from where they are)."""
        return {t: (torch.zeros(1, w, requires_grad=True),) for t, w in self.widths.items()}
