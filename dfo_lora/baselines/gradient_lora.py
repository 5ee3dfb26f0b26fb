"""`gradient-lora`: LoRA trained by back-propagation (peft + AdamW), the ceiling.

The ceiling that the forward-only search is judged against, on exactly its data: peft
LoRA on the registry's `targets` projections of every layer (default q,v, r = 8,
lora_alpha = 8, i.e. scaling 1, no dropout), AdamW over the LoRA weights only, full
batch: each step is one forward and backward over the whole k-shot train split. The loss
is the server's (`ce` or `hinge` on the verbalizer logits at the slot; with `calibrate`
on the calibrated logits, as `tune --calibrate` scores). Dev is scored at step 0 (the
zero state) and every `eval_every` steps and after the last; the state kept is chosen by
tune's rule (best dev metric, ties: lower dev loss, then earlier) and scored on test once.

results.json adds `steps`, `best_dev_step`, `train_loss` (first, last, min over steps:
each the loss before that step's update), `lora_parameters`; `evaluations` counts
forward passes over the train split (one per step, each with its backward). The kept
LoRA weights are saved as `lora.safetensors` (peft's parameter names).
"""

from __future__ import annotations

from dfo_lora.baselines.lora import add_lora, finish_lora_run, snapshot
from dfo_lora.baselines.training import ADAMW_OPTIONS, train_adamw
from dfo_lora.options import Option

HELP = "LoRA trained with gradients (peft, AdamW, full batch, dev-selected): the ceiling"
LORA_OPTIONS = {
    "targets": Option(["q", "v"], "adapted projections (backbone registry names)"),
    "rank": Option(8, "LoRA rank r", positive=True),
    "lora_alpha": Option(8.0, "LoRA alpha; the delta is scaled by alpha / r", positive=True),
}
OPTIONS = {**LORA_OPTIONS, **ADAMW_OPTIONS}


def run(ctx) -> dict:
    o = ctx.options
    params = add_lora(ctx, ctx.method, o["targets"], o["rank"], o["lora_alpha"])
    tensors = [p for _, p in params]
    select, losses = train_adamw(ctx, tensors, o, state=lambda: snapshot(params))
    return finish_lora_run(ctx, params, select, o, losses, evaluations=o["steps"])
