"""The one AdamW loop of the gradient methods (gradient-lora, gradient, subspace-gradient).

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
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dfo_lora.baselines.common import DevSelection, ProgressBar, step_record, train_loss


def nothing() -> None:
    return None


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

    def dev_check(step: int) -> None:
        prepare_dev()
        dev = ctx.evaluate("dev", o["calibrate"])
        select.offer(dev, evals=step, step=step, state=state())
        ctx.log_dev({"evals": step, "step": step, "dev": dev, "best_dev": select.best})
        bar.dev(select.best)

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
