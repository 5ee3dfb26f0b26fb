"""The two training loops of the baselines, shared by every space: AdamW through autograd
(gradient-lora, gradient, subspace-gradient: `train_adamw`) and MeZO's zeroth-order SGD
(mezo-lora, mezo: `train_mezo`).

Full batch: each step is one forward and backward over the whole k-shot train split
through the server's own buckets and loss (`train_loss`), then one AdamW step. Dev is
scored at step 0 (the zero state), every `eval_every` steps and after the last; the
state kept is chosen by `DevSelection` (tune's rule, or the last state with `last`).
What differs between the methods is only what they train and how it reaches the
model, given as callables:

- `install()` puts the current trainable tensors into the server's modules before a
  forward (a no-op where they live in the model already, as peft's do);
- `before_dev()` prepares the state a dev check scores (default: `install`);
- `state()` is what the selection keeps (a snapshot to restore at the end);
- `extras()` adds fields to each step's log line (subspace-gradient's ||z||).

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", 2023):
each step draws a seed s and, with u ~ N(0, I) regenerated from s in place (never stored),

    theta += eps u;  L+ = L(theta)          # forward 1
    theta -= 2 eps u; L- = L(theta)         # forward 2, same u (same seed)
    theta += eps u                          # back to theta
    g = (L+ - L-) / (2 eps)                 # projected gradient
    theta -= lr (g u + weight_decay theta)  # u regenerated from s once more

`install()` runs after every change of theta (the tensors may reach the model as cast
copies or through a space's maps). A non-finite L+ or L- skips the step's update.
After every dev check MeZO writes a checkpoint (`resume.py`), and `ctx.resumed` continues
from one: each step's seed comes from the run's seed and the step number, so a resumed
run takes exactly the steps the uninterrupted one takes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from dfo_lora.baselines import resume
from dfo_lora.baselines.common import DevSelection, ProgressBar, step_record, train_loss
from dfo_lora.options import Option
from dfo_lora.search.run import CHECKPOINT
from dfo_lora.server.losses import LOSSES

# The options each loop reads, declared once for the methods that run it (a method may
# replace a default, as subspace-gradient does for lr and weight_decay on z).
ADAMW_OPTIONS = {
    "lr": Option(5e-4, "AdamW learning rate", positive=True),
    "weight_decay": Option(0.01, "AdamW weight decay (torch's default)", minimum=0),
    "steps": Option(
        100, "optimizer steps, each one full batch over the train split", positive=True
    ),
    "eval_every": Option(10, "steps between dev evaluations", positive=True),
    "loss": Option("ce", "loss on the verbalizer logits: ce | hinge", choices=("ce", "hinge")),
    "calibrate": Option(False, "train and score calibrated logits (tune's --calibrate)"),
}
MEZO_OPTIONS = {
    "lr": Option(1e-3, "learning rate of the projected-gradient step", positive=True),
    "eps": Option(1e-2, "perturbation scale", positive=True),
    "weight_decay": Option(0.0, "decoupled weight decay", minimum=0),
    "steps": Option(200, "steps, each two forwards over the train split", positive=True),
    "eval_every": Option(20, "steps between dev evaluations", positive=True),
    "loss": Option("ce", "loss on the verbalizer logits: " + " | ".join(LOSSES), choices=LOSSES),
    "calibrate": Option(False, "train and score calibrated logits (tune's --calibrate)"),
}


def nothing() -> None:
    return None


def dev_checker(
    ctx,
    options: dict,
    select: DevSelection,
    bar: ProgressBar,
    state,
    prepare,
    forwards_per_step: int = 1,
):
    """The dev check both loops run at step 0, every `eval_every` steps and after the last:
    prepare the state, score dev, offer it to the selection, log it."""

    def check(step: int) -> None:
        prepare()
        dev = ctx.evaluate("dev", options["calibrate"])
        evals = forwards_per_step * step
        select.offer(dev, evals=evals, step=step, state=state())
        ctx.log_dev({"evals": evals, "step": step, "dev": dev, "best_dev": select.best})
        bar.dev(select.best)

    return check


def train_adamw(
    ctx,
    tensors: list[torch.Tensor],
    options: dict,
    *,
    state: Callable[[], object],
    install: Callable[[], None] = nothing,
    before_dev: Callable[[], None] | None = None,
    last: bool = False,
    extras: Callable[[], dict] = dict,
) -> tuple[DevSelection, list[float]]:
    """Train `tensors` for `options["steps"]`; returns the selection and each step's loss
    (the loss before that step's update)."""
    o = options
    server = ctx.server
    optimizer = torch.optim.AdamW(tensors, lr=o["lr"], weight_decay=o["weight_decay"])
    select = DevSelection(ctx.metric, last=last)
    prepare_dev = install if before_dev is None else before_dev
    bar = ProgressBar(o["steps"], ctx.metric, disable=not ctx.progress)

    dev_check = dev_checker(ctx, o, select, bar, state, prepare_dev)
    dev_check(0)
    losses: list[float] = []
    for step in range(1, o["steps"] + 1):
        optimizer.zero_grad(set_to_none=True)
        install()
        loss, accuracy = train_loss(server, o["loss"], o["calibrate"])
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        record = step_record(step, losses[-1], min(losses), accuracy, ctx.started, **extras())
        ctx.log_step(record)
        bar.step(losses[-1])
        if step % o["eval_every"] == 0 or step == o["steps"]:
            dev_check(step)
    bar.close()
    return select, losses


def perturb(tensors: list[torch.Tensor], seed: int, scale: float) -> None:
    """theta += scale * u(seed), u regenerated tensor by tensor in a fixed order."""
    gen = None
    for p in tensors:
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        u = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        p.add_(u, alpha=scale)


def _update(tensors: list[torch.Tensor], seed: int, grad: float, lr: float, decay: float):
    gen = None
    for p in tensors:
        if gen is None or gen.device != p.device:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        u = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        if decay:
            p.mul_(1.0 - lr * decay)
        p.add_(u, alpha=-lr * grad)


def mezo_seeds(run_seed: int, steps: int) -> np.ndarray:
    """Each step's perturbation seed, from the run's seed."""
    return np.random.default_rng([run_seed, 2023]).integers(0, 2**62, size=steps)


@torch.no_grad()
def train_mezo(
    ctx,
    tensors: list[torch.Tensor],
    options: dict,
    *,
    state: Callable[[], object],
    install: Callable[[], None] = nothing,
) -> tuple[DevSelection, list[float], int]:
    """MeZO on `tensors` for `options["steps"]`; returns the selection, each step's mean of
    L+ and L-, and the number of skipped (non-finite) steps. Two forwards per step."""
    o = options
    seeds = mezo_seeds(ctx.config.seed, o["steps"])
    select = DevSelection(ctx.metric)
    eps = o["eps"]
    path = ctx.out / CHECKPOINT
    losses: list[float] = []
    skipped = 0
    first = 1
    if ctx.resumed is not None:  # the checkpoint's step, tensors, losses and selection
        resume.restore_tensors(path, ctx.resumed, tensors)
        resume.restore_selection(path, ctx.resumed, select, state())
        losses, skipped = list(ctx.resumed["losses"]), ctx.resumed["skipped"]
        first = ctx.resumed["step"] + 1
    bar = ProgressBar(o["steps"], ctx.metric, disable=not ctx.progress, initial=first - 1)

    def loss_now() -> tuple[float, float]:
        install()
        loss, accuracy = train_loss(ctx.server, o["loss"], o["calibrate"])
        return float(loss), accuracy

    dev_check = dev_checker(ctx, o, select, bar, state, install, forwards_per_step=2)

    def check_and_save(step: int) -> None:
        dev_check(step)
        resume.save(path, ctx, step, tensors, losses, skipped, select)

    if ctx.resumed is None:  # a resumed run's step-0 check is in its checkpoint already
        check_and_save(0)
    for step in range(first, o["steps"] + 1):
        seed = int(seeds[step - 1])
        perturb(tensors, seed, eps)
        plus, acc_plus = loss_now()
        perturb(tensors, seed, -2 * eps)
        minus, acc_minus = loss_now()
        perturb(tensors, seed, eps)
        if math.isfinite(plus) and math.isfinite(minus):
            _update(tensors, seed, (plus - minus) / (2 * eps), o["lr"], o["weight_decay"])
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
                "loss_plus": plus,
                "loss_minus": minus,
                "projected_grad": (plus - minus) / (2 * eps),
                "time_s": time.perf_counter() - ctx.started,
            }
        )
        bar.step(losses[-1])
        if step % o["eval_every"] == 0 or step == o["steps"]:
            check_and_save(step)
    bar.close()
    return select, losses, skipped
