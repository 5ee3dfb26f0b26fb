"""`zero-shot` and `calibrated`: the plain prompt and the calibrated zero state.

Both score the unmodified model (z = 0) through the same server as `tune`:
- `zero-shot`: the task's template and verbalizer, argmax over the verbalizer logits;
- `calibrated`: the same logits minus their mean over the k-shot train examples (the
  label bias of the prompt, estimated from train only), i.e. `tune --calibrate`'s zero
  state.
`tuned` in results.json is that state's dev and test; nothing is trained or selected.
"""

from __future__ import annotations

HELP_ZERO_SHOT = "the plain prompt: the unmodified model, the task's template and verbalizer"
HELP_CALIBRATED = "the calibrated zero state: the prompt's mean train logits subtracted"


def run_zero_shot(ctx) -> dict:
    return ctx.finish(dict(ctx.zero_shot))


def run_calibrated(ctx) -> dict:
    return ctx.finish(dict(ctx.calibrated_zero_shot))
