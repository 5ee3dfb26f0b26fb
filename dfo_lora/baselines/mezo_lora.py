"""`mezo-lora`: MeZO's zeroth-order SGD on the LoRA weights, forward passes only.

MeZO (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", 2023),
on the same peft LoRA parameters as `gradient-lora` (targets, rank, lora_alpha), with the
loop every MeZO method shares (`training.py: train_mezo`, which gives the step).

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

from dfo_lora.baselines.gradient_lora import LORA_OPTIONS
from dfo_lora.baselines.lora import add_lora, finish_lora_run, snapshot
from dfo_lora.baselines.training import MEZO_OPTIONS, train_mezo

HELP = "MeZO zeroth-order SGD on the same LoRA weights (two forwards per step, one seed)"
OPTIONS = {**LORA_OPTIONS, **MEZO_OPTIONS}


def run(ctx) -> dict:
    o = ctx.options
    params = add_lora(ctx, ctx.method, o["targets"], o["rank"], o["lora_alpha"])
    tensors = [p for _, p in params]
    select, losses, skipped = train_mezo(ctx, tensors, o, state=lambda: snapshot(params))
    return finish_lora_run(
        ctx, params, select, o, losses, evaluations=2 * o["steps"], skipped_steps=skipped
    )
