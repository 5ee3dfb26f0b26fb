"""`subspace-gradient`: the search space's own z trained by back-propagation.

The question it answers: is the forward-only search the limit, or the space it searches?
It trains exactly the numbers the search sets, the z of every layer (L, d), through the
same fixed maps of the run's space, whichever it is (`--space lora | hydra | series |
parallel`; `--config experiments/configs/recommended.yaml` gives LoRA with A fixed to the
inputs' principal directions, B = map(z), d = 8 per layer), on
the same data, loss and calibration, with AdamW over full batches of the train split
instead of CMA-ES. If it reaches gradient LoRA, the search is what limits the
recommended method; if it stalls where the search stalls, the space does.

Each step installs every layer's weights of z (autograd tensors, `space.weights`) into
the server's modules (`EvaluationServer.install_weights`), runs the train split through
`train_loss` (the server's buckets and loss; with `calibrate`, each state's mean train
logits removed, as `tune --calibrate` scores) and steps AdamW on z. Dev is scored at step
0 (z = 0) and every `eval_every` steps on the z committed as a plain state
(`set_state`), so dev and test go through the server's own inference path. The kept
state is chosen by `select`: `metric` (tune's rule, as gradient-lora) or `final` (the
last z, as the recommended search's `select: final`); test is scored once with it.

`weight_decay` is AdamW's decoupled decay on z (a penalty on ||z||, the search's
`z_penalty` in another form). results.json adds `steps`, `best_dev_step`, `train_loss`
(first, last, min), `z_norm` (of the kept state) and `subspace_parameters` (L x d); the
kept z is saved as `z.safetensors` (fp32, (L, d)). `evaluations` counts forward passes
over the train split (one per step, each with its backward).
"""

from __future__ import annotations

import numpy as np
import torch

from dfo_lora.baselines.training import ADAMW_OPTIONS, train_adamw
from dfo_lora.options import Option

HELP = "AdamW on the run's own search space z (the space's ceiling; --config gives the space)"
OPTIONS = {
    **ADAMW_OPTIONS,
    "lr": Option(0.01, "AdamW learning rate on z", positive=True),
    "weight_decay": Option(0.0, "AdamW decoupled weight decay on z", minimum=0),
    "select": Option(
        "metric",
        "state tested: metric (best dev, tune's rule) | final (the last z)",
        choices=("metric", "final"),
    ),
}


def install(server, z: torch.Tensor) -> None:
    """Every layer's weights of z (L, d), with autograd, into the server's modules."""
    for layer in range(server.num_layers):
        weights = server.space.weights(layer, z[layer : layer + 1], server.backbone.dtype)
        server.install_weights(layer, weights)


def run(ctx) -> dict:
    o = ctx.options
    server = ctx.server
    z = torch.zeros(server.num_layers, server.dim, dtype=torch.float32, requires_grad=True)

    def as_state() -> np.ndarray:
        return z.detach().double().numpy().copy()

    select, losses = train_adamw(
        ctx,
        [z],
        o,
        state=as_state,
        install=lambda: install(server, z),
        before_dev=lambda: server.set_state(as_state()),  # the server's own inference path
        last=o["select"] == "final",
        extras=lambda: {"z_norm": float(z.detach().norm())},
    )
    server.set_state(select.state)
    test = ctx.evaluate("test", o["calibrate"])
    save_z(ctx.open_out() / "z.safetensors", select.state, {"method": ctx.method, **o})
    return ctx.finish(
        {"dev": select.best, "test": test},
        evaluations=o["steps"],
        best_dev_evals=select.best_evals,
        steps=o["steps"],
        best_dev_step=select.best_step,
        train_loss={"first": losses[0], "last": losses[-1], "min": min(losses)},
        z_norm=float(np.linalg.norm(select.state)),
        subspace_parameters=int(z.numel()),
    )


def save_z(path, state: np.ndarray, meta: dict) -> None:
    """The kept z (L, d) as fp32 safetensors, written atomically with the umask's mode."""
    from dfo_lora.search.checkpoint import atomic_write_safetensors

    z = np.ascontiguousarray(state, dtype=np.float32)
    atomic_write_safetensors(path, {"z": z}, {k: str(v) for k, v in meta.items()})
