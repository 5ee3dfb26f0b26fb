"""`mezo-lora`: MeZO's zeroth-order SGD on the LoRA weights, forward passes only.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", 2023),
on the same peft LoRA parameters as `gradient-lora` (targets, rank, lora_alpha). Each
step draws a seed s and, with z ~ N(0, I) regenerated from s in place (never stored):

    theta += eps z;  L+ = L(theta)          # forward 1
    theta -= 2 eps z; L- = L(theta)         # forward 2, same z (same seed)
    theta += eps z                          # back to theta
    g = (L+ - L-) / (2 eps)                 # projected gradient
    theta -= lr (g z + weight_decay theta)  # z regenerated from s once more

The loss is the server's (ce, hinge or neg_acc on the verbalizer logits at the slot;
calibrated with `calibrate`), full batch over the k-shot train split. Dev selection and
the single test evaluation are tune's (as gradient-lora). A non-finite L+ or L- skips
the step's update (counted in results.json as `skipped_steps`).

Defaults: eps 1e-2 (MeZO's LoRA setting; with a bf16 backbone a much smaller eps is lost
in the rounding of the projection outputs), lr 1e-3 and 200 steps. MeZO's own LoRA runs
use lr 1e-5..1e-4 over 20,000+ steps; on a CPU a run has a few hundred steps, and with
lr 1e-4 the expected decrease of the loss, lr |grad|^2 per step (|grad| ~ 0.7 at the
start on SmolLM2 / SST-2, measured from the projected gradients), would be ~0.01 over
them. `evaluations` counts forward passes over the train split (2 per step).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from dfo_lora.baselines.common import DevSelection, ProgressBar, train_loss
from dfo_lora.baselines.gradient_lora import LORA_OPTIONS
from dfo_lora.baselines.lora import add_lora, finish_lora_run, snapshot
from dfo_lora.baselines.registry import Option
from dfo_lora.server.losses import LOSSES

HELP = "MeZO zeroth-order SGD on the same LoRA weights (two forwards per step, one seed)"
OPTIONS = {
    **LORA_OPTIONS,
    "lr": Option(1e-3, "learning rate of the projected-gradient step", positive=True),
    "eps": Option(1e-2, "perturbation scale", positive=True),
    "weight_decay": Option(0.0, "decoupled weight decay", minimum=0),
    "steps": Option(200, "steps, each two forwards over the train split", positive=True),
    "eval_every": Option(20, "steps between dev evaluations", positive=True),
    "loss": Option("ce", "loss on the verbalizer logits: " + " | ".join(LOSSES), choices=LOSSES),
    "calibrate": Option(False, "train and score calibrated logits (tune's --calibrate)"),
}


def _perturb(params, seed: int, scale: float) -> None:
    """theta += scale * z(seed), z regenerated parameter by parameter in a fixed order."""
    gen = None
    for _, p in params:
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)


def _update(params, seed: int, grad: float, lr: float, weight_decay: float) -> None:
    gen = None
    for _, p in params:
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        if weight_decay:
            p.mul_(1.0 - lr * weight_decay)
        p.add_(z, alpha=-lr * grad)


@torch.no_grad()
def run(ctx) -> dict:
    o = ctx.options
    params = add_lora(ctx, ctx.method, o["targets"], o["rank"], o["lora_alpha"])
    seeds = np.random.default_rng([ctx.config.seed, 2023]).integers(0, 2**62, size=o["steps"])
    select = DevSelection(ctx.metric)
    eps = o["eps"]

    def loss_now() -> tuple[float, float]:
        loss, accuracy = train_loss(ctx.server, o["loss"], o["calibrate"])
        return float(loss), accuracy

    def dev_check(step: int) -> None:
        dev = ctx.evaluate("dev", o["calibrate"])
        select.offer(dev, evals=2 * step, step=step, state=snapshot(params))
        ctx.log_dev({"evals": 2 * step, "step": step, "dev": dev, "best_dev": select.best})
        bar.dev(select.best)

    bar = ProgressBar(o["steps"], ctx.metric, disable=not ctx.progress)
    dev_check(0)
    losses: list[float] = []
    skipped = 0
    for step in range(1, o["steps"] + 1):
        seed = int(seeds[step - 1])
        _perturb(params, seed, eps)
        plus, acc_plus = loss_now()
        _perturb(params, seed, -2 * eps)
        minus, acc_minus = loss_now()
        _perturb(params, seed, eps)
        if math.isfinite(plus) and math.isfinite(minus):
            _update(params, seed, (plus - minus) / (2 * eps), o["lr"], o["weight_decay"])
        else:
            skipped += 1
        losses.append((plus + minus) / 2)
        ctx.log_step(
            {
                "evals": 2 * step,
                "step": step,
                "popsize": 2,
                "loss_min": min(plus, minus),
                "loss_mean": losses[-1],
                "best_loss": min(losses),
                "train_acc_max": max(acc_plus, acc_minus),
                "projected_grad": (plus - minus) / (2 * eps),
                "time_s": time.perf_counter() - ctx.started,
            }
        )
        bar.step(losses[-1])
        if step % o["eval_every"] == 0 or step == o["steps"]:
            dev_check(step)
    bar.close()
    return finish_lora_run(
        ctx, params, select, o, losses, evaluations=2 * o["steps"], skipped_steps=skipped
    )
