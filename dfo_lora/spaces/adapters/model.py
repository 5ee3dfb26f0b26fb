"""The series and parallel adapter search spaces: z_l -> (down, up) per adapter site.

z_l is split into 2 chunks per site, down then up, each through its own seeded random map
scaled from sigma_hat (`ProjectedSpace`): z = 0 gives down = up = 0, the unmodified model.
Sites: series, one per target projection (its output, which writes the residual stream);
parallel, one per layer, beside the MLP (the registry's `MLP_SITES`).

With `down = "pca"` each site's down (m, in) is fixed instead: its rows are the top-m
principal directions of the uncentred second moment E[s s^T] of what the site reads
(s, over the train split's real tokens, zero state), each scaled so that E[(row . s)^2] = 1;
z_l has one chunk per site, for up. The change up(z) @ tanh(down s) is then linear in z
(the searched space is bilinear: a step of z moves the loss only to second order at
z = 0), and tanh sees inputs of unit size, in its near-linear range for most tokens.
The uncentred moment keeps the mean's direction, which tanh would otherwise saturate on.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.backbone.registry import mlp_site
from dfo_lora.errors import UserError
from dfo_lora.spaces.adapters.config import ParallelConfig, SeriesConfig, weights_per_site
from dfo_lora.spaces.adapters.layer import AdapterModule, Stash, Tap
from dfo_lora.spaces.base import LayerModules, Weights, lora_pair
from dfo_lora.spaces.modules import projection_shape, wrap_module
from dfo_lora.spaces.projection import ProjectedSpace
from dfo_lora.spaces.statistics import (
    ProjectionMoments,
    SpaceStatistics,
    StatisticsRequest,
    whitened_top_directions,
)


class AdapterLayer(dict):
    """One layer's `AdapterModule`s by site, with the (in, out) widths of each and, per
    site, the module whose input ("in") or output ("out") the adapter reads."""

    def __init__(
        self,
        modules: dict[str, AdapterModule],
        widths: dict[str, tuple[int, int]],
        sources: dict[str, tuple[nn.Module, str]],
    ):
        super().__init__(modules)
        self.widths = widths
        self.sources = sources

    def set_candidates(self, weights: Weights) -> None:
        for site, module in self.items():
            module.candidates = weights.get(site)

    def clear_candidates(self) -> None:
        for module in self.values():
            module.candidates = None

    def commit(self, weights: Weights | None) -> None:
        for site, module in self.items():
            module.committed = None if weights is None else tuple(t[0] for t in weights[site])


def _adapter(module: nn.Module, series: bool, stash: Stash | None = None) -> AdapterModule:
    if isinstance(module, AdapterModule):
        module.committed = module.candidates = None  # a reused backbone: the zero state
        return module
    return AdapterModule(module, series, stash)


class AdapterSpace(ProjectedSpace):
    """Bottleneck adapters at fixed sites; their change depends on the input (no merge)."""

    mergeable = False
    tensor_names = ("down", "up")
    tensor_shapes = {"down": ("size", "in"), "up": ("out", "size")}
    not_mergeable_because = "its adapters apply tanh to each token's hidden state"

    def __init__(
        self,
        config,
        widths: dict[str, tuple[int, int]],
        sigma_hat,
        device,
        site_moments: list[dict[str, ProjectionMoments]] | None = None,
    ):
        self.widths = widths  # site -> (in, out), the same in every layer
        if config.down == "pca" and site_moments is None:
            raise UserError("adapter_down pca: needs the moments of what each site reads")
        self.site_moments = site_moments
        self._fixed_down: dict[int, dict[str, torch.Tensor]] = {}
        super().__init__(config, sigma_hat, device)

    @classmethod
    def requirements(cls, config) -> StatisticsRequest:
        return StatisticsRequest(site_moments=config.down == "pca")

    @classmethod
    def build(
        cls,
        config,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> AdapterSpace:
        widths = dict(modules[0].widths)
        return cls(config, widths, stats.sigma_hat, device, stats.site_moments)

    def _chunk_numels(self) -> list[int]:
        m = self.config.size
        if weights_per_site(self.config) == 1:  # down fixed: up only
            return [out * m for _, out in self.widths.values()]
        return [n for inp, out in self.widths.values() for n in (m * inp, out * m)]

    def fixed_down(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's fixed down (m, in) per site (`down = "pca"`), fp32, on the device."""
        if layer not in self._fixed_down:
            downs = {}
            for site, moments in self.site_moments[layer].items():
                down = whitened_top_directions(moments.input_moment(False), self.config.size)
                downs[site] = down.float().to(self.device)
            self._fixed_down[layer] = downs
        return self._fixed_down[layer]

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> {site: (down (P, m, in), up (P, out, m))}."""
        pieces = self.project(layer, z)
        m = self.config.size
        per_site = weights_per_site(self.config)
        out = {}
        for i, (site, (inp, width)) in enumerate(self.widths.items()):
            if per_site == 1:
                down = self.fixed_down(layer)[site].expand(z.shape[0], m, inp)
            else:
                down = pieces[2 * i].view(-1, m, inp)
            up = pieces[per_site * i + per_site - 1].view(-1, width, m)
            out[site] = (down.to(dtype), up.to(dtype))
        return out

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights:
        """Per site down (1, m, in) uniform in +-1/sqrt(in) and up (1, out, m) zero, both
        trained (with `adapter_down: pca` too): Adapter tuning starts at the model."""
        m = self.config.size
        return {site: lora_pair(m, inp, out, generator) for site, (inp, out) in self.widths.items()}


class SeriesSpace(AdapterSpace):
    """Series adapters after residual-writing projections (attention output, MLP output)."""

    name = "series"

    @classmethod
    def install(
        cls, config: SeriesConfig, arch, model: nn.Module, layer: nn.Module
    ) -> AdapterLayer:
        modules, widths, sources = {}, {}, {}
        writers = [n for n, p in arch.projections(model).items() if p.writes_residual]
        for target in config.targets or writers:
            proj = arch.projection(model, target)
            if not proj.writes_residual:
                raise UserError(
                    f"targets: series adapters sit after projections that write the residual "
                    f"stream; {target} does not (choose from {', '.join(writers)})"
                )
            module = wrap_module(layer, proj.module, lambda m: _adapter(m, series=True))
            out_features = projection_shape(module.base)[1]
            modules[target], widths[target] = module, (out_features, out_features)
            sources[target] = (module, "out")  # at the zero state: the projection's output
        return AdapterLayer(modules, widths, sources)


class ParallelSpace(AdapterSpace):
    """A parallel adapter beside each layer's MLP: its input is the MLP's input."""

    name = "parallel"

    @classmethod
    def install(
        cls, config: ParallelConfig, arch, model: nn.Module, layer: nn.Module
    ) -> AdapterLayer:
        site = mlp_site(arch, layer)
        hidden = int(model.config.hidden_size)
        if site.reads == site.writes:
            module = wrap_module(layer, site.writes, lambda m: _adapter(m, series=False))
            reads = module
        else:  # two modules: a Tap keeps the first one's input for the adapter on the second
            tap = layer.get_submodule(site.reads)
            stash = tap.stash if isinstance(tap, Tap) else Stash()
            reads = wrap_module(
                layer, site.reads, lambda m: m if isinstance(m, Tap) else Tap(m, stash)
            )
            module = wrap_module(layer, site.writes, lambda m: _adapter(m, False, stash))
        return AdapterLayer({"mlp": module}, {"mlp": (hidden, hidden)}, {"mlp": (reads, "in")})
