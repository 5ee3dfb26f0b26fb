"""`mezo`: MeZO's zeroth-order SGD on any space, forward passes only.

The MeZO loop of `mezo-lora` (`training.py: train_mezo`) on what the run's space holds,
chosen by `on`:

- `weights`: the space's own weights (`SearchSpace.own_parameters`, as the `gradient`
  method trains them): full LoRA factors, adapters' down and up, bitfit's shifts;
- `z`: the projected z of every layer (L, d), the numbers the search sets, through the
  space's fixed maps (as `subspace-gradient` trains them), committed by the server's
  own `set_state` before each forward. eps and lr are then in z's units, where the
  recommended search steps with sigma 0.2; the default eps 1e-2 is a small step there.

Dev selection and the single test evaluation are tune's. results.json adds `steps`,
`best_dev_step`, `train_loss` (first, last, min of each step's mean of L+ and L-),
`skipped_steps` and `parameters`; the kept state is saved as `parameters.safetensors`
(`weights`) or `z.safetensors` (`z`). `evaluations` counts forward passes over the train
split (2 per step).
"""

from __future__ import annotations

import numpy as np
import torch

from dfo_lora.baselines import gradient
from dfo_lora.baselines.subspace_gradient import save_z
from dfo_lora.baselines.training import MEZO_OPTIONS, train_mezo
from dfo_lora.options import Option

HELP = "MeZO on the run's space: its own weights (on weights) or its projected z (on z)"
OPTIONS = {
    "on": Option(
        "weights", "what MeZO perturbs: weights (the space's own) | z", choices=("weights", "z")
    ),
    **MEZO_OPTIONS,
}


def run(ctx) -> dict:
    o = ctx.options
    server = ctx.server
    on_z = o["on"] == "z"
    if on_z:
        z = torch.zeros(server.num_layers, server.dim, dtype=torch.float32)
        tensors = [z]

        def state() -> np.ndarray:
            return z.double().numpy().copy()

        def install() -> None:
            server.set_state(state())

        def restore(kept) -> None:
            server.set_state(kept)

    else:
        params = gradient.initial_parameters(ctx)
        tensors = gradient.tensors(params)
        for t in tensors:
            t.requires_grad_(False)

        def state():
            return gradient.snapshot(params)

        def install() -> None:
            gradient.install(server, params)

        def restore(kept) -> None:
            gradient.install(server, kept)

    select, losses, skipped = train_mezo(ctx, tensors, o, state=state, install=install)
    restore(select.state)
    test = ctx.evaluate("test", o["calibrate"])
    meta = {"method": ctx.method, "step": select.best_step, **o}
    if on_z:
        save_z(ctx.open_out() / "z.safetensors", select.state, meta)
    else:
        gradient.save_parameters(ctx, select.state, meta)
    return ctx.finish(
        {"dev": select.best, "test": test},
        evaluations=2 * o["steps"],
        best_dev_evals=select.best_evals,
        steps=o["steps"],
        best_dev_step=select.best_step,
        train_loss={"first": losses[0], "last": losses[-1], "min": min(losses)},
        skipped_steps=skipped,
        parameters=sum(t.numel() for t in tensors),
    )
