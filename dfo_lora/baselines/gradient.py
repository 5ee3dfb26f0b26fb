"""`gradient`: a space's own parameters trained by back-propagation (AdamW, full batch).

Where `subspace-gradient` trains the z the search sets, this trains the weights the
space's modules hold, with nothing projected: full LoRA factors (A, B) per target of
`--space lora` (rank `--rank`, delta B A x, scaling 1), or the down and up matrices of
each adapter of `--space series` / `parallel` (Adapter tuning). The tensors start where
the space's `own_parameters` puts them (one factor uniform in +-1/sqrt(in), the other
zero: exactly the model), seeded by the run's seed, and go into the server's own modules
each step (`EvaluationServer.install_weights`), so the forward, loss and calibration are
the search's. `gradient --space lora` is what `gradient-lora` does through peft, and
agrees with it within rounding from the same initial A (tested); `gradient-lora` stays
the benchmark's ceiling. A space without parameters of its own (hydra, so far) is
refused in one line.

results.json adds `steps`, `best_dev_step`, `train_loss` (first, last, min) and
`parameters` (the count trained); the kept weights are saved as
`parameters.safetensors`, keyed "<layer>.<group>.<name>" as tuned.safetensors is.
"""

from __future__ import annotations

import torch

from dfo_lora.baselines.training import ADAMW_OPTIONS, train_adamw
from dfo_lora.errors import UserError

HELP = (
    "AdamW on the space's own weights (full LoRA factors; adapters: Adapter tuning), "
    "full batch, dev-selected"
)
OPTIONS = ADAMW_OPTIONS

Parameters = list[dict[str, tuple[torch.Tensor, ...]]]  # per layer, the space's Weights


def initial_parameters(ctx) -> Parameters:
    """Every layer's own parameters at their initial state, seeded by the run's seed."""
    space = ctx.server.space
    generator = torch.Generator().manual_seed(int(ctx.config.seed))
    params = [space.own_parameters(layer, generator) for layer in range(space.num_layers)]
    if params[0] is None:
        raise UserError(
            f"{ctx.method}: the {space.name} space has no weights of its own to train "
            "(subspace-gradient trains its z)"
        )
    return params


def install(server, params: Parameters) -> None:
    """Every layer's weights (cast to the backbone's dtype, autograd kept) into the server."""
    dtype = server.backbone.dtype
    for layer, weights in enumerate(params):
        cast = {key: tuple(t.to(dtype) for t in group) for key, group in weights.items()}
        server.install_weights(layer, cast)


def tensors(params: Parameters) -> list[torch.Tensor]:
    return [t for weights in params for group in weights.values() for t in group]


def snapshot(params: Parameters) -> Parameters:
    return [
        {key: tuple(t.detach().clone() for t in group) for key, group in weights.items()}
        for weights in params
    ]


def train(ctx, params: Parameters):
    """AdamW on `params` through the server; (selection, losses) as `train_adamw`."""
    server = ctx.server
    return train_adamw(
        ctx,
        tensors(params),
        ctx.options,
        state=lambda: snapshot(params),
        install=lambda: install(server, params),
    )


def run(ctx) -> dict:
    o = ctx.options
    params = initial_parameters(ctx)
    select, losses = train(ctx, params)
    install(ctx.server, select.state)
    test = ctx.evaluate("test", o["calibrate"])
    save_parameters(ctx, select.state, {"method": ctx.method, "step": select.best_step, **o})
    return ctx.finish(
        {"dev": select.best, "test": test},
        evaluations=o["steps"],
        best_dev_evals=select.best_evals,
        steps=o["steps"],
        best_dev_step=select.best_step,
        train_loss={"first": losses[0], "last": losses[-1], "min": min(losses)},
        parameters=sum(t.numel() for t in tensors(params)),
    )


def save_parameters(ctx, params: Parameters, meta: dict) -> None:
    """The kept weights, fp32, "<layer>.<group>.<name>", written atomically."""
    from dfo_lora.search.checkpoint import atomic_write_safetensors

    names = ctx.server.space.tensor_names
    arrays = {
        f"{layer}.{key}.{name}": t[0].detach().float().cpu().contiguous().numpy()
        for layer, weights in enumerate(params)
        for key, group in weights.items()
        for name, t in zip(names, group, strict=True)
    }
    atomic_write_safetensors(
        ctx.open_out() / "parameters.safetensors", arrays, {k: str(v) for k, v in meta.items()}
    )
