"""The train split's statistics that spaces are built from, and their measurement.

Every space scales its random maps by sigma_hat_l, the clipped std of layer l's input
hidden states (BBTv2's initialisation; layer 0 uses the word-embedding matrix). The
data-informed variants ask for more (`StatisticsRequest`): the input/output moments of
the adapted projections (a fixed PCA A, a PCA basis for B), the moments of what each
adapter site reads, or the directions that move the verbalizer logits. The server
measures them once on the zero state (`measure`), over the real (unpadded) train tokens,
with fp64 sums, and hands the result (`SpaceStatistics`) to the space's `build`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfo_lora.errors import UserError
from dfo_lora.spaces.modules import out_columns


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
class ZeroStateTrain:
    """The zero state's train split, layer by layer: what the statistics are measured on.

    `inputs[j]` holds, per length bucket, the input hidden states of layer j (the
    server's prefix cache, advanced to the last layer); `layer_args` the extra arguments
    of each bucket's layer calls (by `id` of the bucket), as `arch.run_layer` takes them.
    """

    arch: object  # the backbone's architecture entry (dfo_lora.backbone.registry)
    model: nn.Module
    layers: list[nn.Module]
    buckets: list  # dfo_lora.server.batching.Bucket: input_ids, attention_mask, slots
    inputs: list[list[torch.Tensor]]
    layer_args: dict[int, object]

    def real_token_masks(self) -> list[torch.Tensor]:
        return [b.attention_mask.bool() for b in self.buckets]


@torch.inference_mode()
def measure(
    request: StatisticsRequest,
    train: ZeroStateTrain,
    adapted: list,
    verbalizer: torch.Tensor,
    dtype: torch.dtype,
) -> SpaceStatistics:
    """The statistics `request` asks for (and sigma_hat, which every space reads), with
    `adapted` the space's installed modules per layer (for site moments)."""
    moments = head = sites = None
    sigma = sigma_hat(train)
    if request.moment_targets:
        moments = projection_moments(train, request.moment_targets)
    if request.head_targets:
        head = head_directions(train, request.head_targets, verbalizer, dtype)
    if request.site_moments:
        sites = site_moments(train, adapted)
    return SpaceStatistics(sigma, moments, head, sites)


def sigma_hat(train: ZeroStateTrain) -> list[float]:
    """Per-layer std of input hidden states (real tokens, clipped); layer 0: embeddings."""
    sigma = [clipped_std(train.arch.word_embeddings(train.model))]
    masks = train.real_token_masks()
    for layer in range(1, len(train.layers)):
        real = torch.cat([h[m] for h, m in zip(train.inputs[layer], masks, strict=True)])
        sigma.append(clipped_std(real))
    return sigma


def projection_moments(
    train: ZeroStateTrain, targets: tuple[str, ...]
) -> list[dict[str, ProjectionMoments]]:
    """Each adapted projection's input mean and covariance and output covariance over
    the real train tokens of the zero state (fp64 sums), for data-informed spaces."""
    projections = {t: train.arch.projection(train.model, t) for t in targets}
    # The module at each target's path (the space's wrapper, if it has one: at the
    # zero state its input and output are the frozen projection's).
    recorded = _module_moments(
        train,
        lambda j: {t: train.layers[j].get_submodule(p.module) for t, p in projections.items()},
    )
    moments = []
    for per_module in recorded:
        per_target = {}
        for target, sides in per_module.items():
            mean, cov = sides["in"]
            out_cov = sides["out"][1]
            out_slice = projections[target].out_slice
            if out_slice is not None:  # a fused module's own columns
                cols = out_columns(out_slice)
                out_cov = out_cov[cols][:, cols]
            per_target[target] = ProjectionMoments(mean, cov, out_cov)
        moments.append(per_target)
    return moments


def site_moments(train: ZeroStateTrain, adapted: list) -> list[dict[str, ProjectionMoments]]:
    """The mean and covariance of what each of the space's sites reads (its `sources`:
    a module's input or output) over the real train tokens of the zero state."""
    recorded = _module_moments(train, lambda j: {s: m for s, (m, _) in adapted[j].sources.items()})
    return [
        {
            site: ProjectionMoments(*sides[adapted[j].sources[site][1]])
            for site, sides in per_module.items()
        }
        for j, per_module in enumerate(recorded)
    ]


def _module_moments(train: ZeroStateTrain, modules_of) -> list[dict[str, dict[str, tuple]]]:
    """Per layer j, for each named module of `modules_of(j)`: the (mean, covariance) of
    its input ("in") and output ("out") over the real train tokens of the zero state,
    from fp64 sums over the layer's inputs."""
    masks = train.real_token_masks()
    moments = []
    for j, layer in enumerate(train.layers):
        sums: dict = {}
        current = {}

        def record(module, args, output, sums=sums, current=current):
            for key, x in (("in", args[0]), ("out", output)):
                # (real tokens, features); some MLPs see (B*T, features)
                x = x.reshape(-1, x.shape[-1])[current["mask"].reshape(-1)].double()
                acc = sums.setdefault((id(module), key), [0, 0.0, 0.0])
                acc[0] += x.shape[0]
                acc[1] = acc[1] + x.sum(0)
                acc[2] = acc[2] + x.T @ x

        named = modules_of(j)
        modules = {id(m): m for m in named.values()}
        hooks = [m.register_forward_hook(record) for m in modules.values()]
        try:
            for h, bucket, mask in zip(train.inputs[j], train.buckets, masks, strict=True):
                current["mask"] = mask
                train.arch.run_layer(layer, h, train.layer_args[id(bucket)])
        finally:
            for hook in hooks:
                hook.remove()
        moments.append(
            {
                name: {side: _mean_cov(*sums[(id(m), side)]) for side in ("in", "out")}
                for name, m in named.items()
            }
        )
    return moments


def head_directions(
    train: ZeroStateTrain, targets: tuple[str, ...], verbalizer: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(C, H) gradients of the C verbalizer logits with respect to the last hidden
    state, at the mean slot state of the zero state's train split (fp32)."""
    arch, model = train.arch, train.model
    wrong = [t for t in targets if not arch.projection(model, t).writes_residual]
    if wrong:
        writers = [name for name, p in arch.projections(model).items() if p.writes_residual]
        raise UserError(
            f"b_basis verbalizer: targets {','.join(wrong)} do not write the residual "
            f"stream; choose from {', '.join(writers)}"
        )
    at_slot = []
    for h, bucket in zip(train.inputs[-1], train.buckets, strict=True):
        out = arch.run_layer(train.layers[-1], h, train.layer_args[id(bucket)])
        at_slot.append(out[torch.arange(out.shape[0], device=out.device), bucket.slots])
    mean = torch.cat(at_slot).float().mean(0)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = arch.verbalizer_logits(model, hidden[None].to(dtype), verbalizer)
        return out[0].float()

    with torch.inference_mode(False):
        return torch.autograd.functional.jacobian(logits, mean.clone()).detach()


def _mean_cov(count: int, total: torch.Tensor, outer: torch.Tensor):
    mean = total / count
    return mean, outer / count - torch.outer(mean, mean)
