"""Checkpoints of a baseline's training loop, so a long run (MeZO on agnews: hours on a
CPU) continues where it was killed, with the same numbers as an uninterrupted run.

A resumable method (`Method.resumable`) writes `checkpoint/state.safetensors`, tune's
path and file format (`search/checkpoint.py`: atomic, numpy arrays as tensors, the rest
as JSON), after every dev check. It holds everything the rest of the run depends on:

- `config` and `options`: the run's, compared with config.yaml and baseline.yaml on resume;
- `step`, `tensors` (the trainable tensors' exact values, whatever float history made
  them), `losses`, `skipped`: the loop's own state;
- `selection`: the dev selection (best dev, its step and evaluations, and the kept state);
- `zero_shot`, `calibrated_zero_shot`: the prompt's scores, not recomputed on resume;
- `log_lines` and `elapsed_s`: log.jsonl is cut back to the lines written up to the
  checkpoint, and wall_time_s goes on from the checkpoint's time;
- `machines`: where the run has run so far (`search.run.machines_so_far`).

Torch tensors are stored as numpy (bf16 as fp32, exact) and rebuilt in the structure and
dtype of the live state (`like`), so tuples, dicts and lists of tensors all round-trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dfo_lora.errors import UserError
from dfo_lora.search.callbacks import JsonlLog
from dfo_lora.search.checkpoint import CORRUPT, load_state, save_state


def to_arrays(tree):
    """torch tensors in `tree` -> numpy arrays (tuples become lists)."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().copy()
    if isinstance(tree, dict):
        return {k: to_arrays(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [to_arrays(v) for v in tree]
    return tree


def from_arrays(saved, like, where: str = "state"):
    """`saved` (as `to_arrays` wrote it) rebuilt in the types, dtypes and devices of `like`."""
    if isinstance(like, torch.Tensor):
        if not isinstance(saved, np.ndarray) or tuple(saved.shape) != tuple(like.shape):
            raise UserError(
                f"{where}: shape {getattr(saved, 'shape', None)}, expected {tuple(like.shape)}"
            )
        return torch.from_numpy(np.array(saved)).to(dtype=like.dtype, device=like.device)
    if isinstance(like, np.ndarray):
        if not isinstance(saved, np.ndarray) or saved.shape != like.shape:
            raise UserError(
                f"{where}: shape {getattr(saved, 'shape', None)}, expected {like.shape}"
            )
        return saved.astype(like.dtype)
    if isinstance(like, dict):
        if not isinstance(saved, dict) or set(saved) != set(map(str, like)):
            raise UserError(f"{where}: its keys differ from the run's")
        return {k: from_arrays(saved[str(k)], v, f"{where}.{k}") for k, v in like.items()}
    if isinstance(like, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(like):
            raise UserError(
                f"{where}: {len(saved) if isinstance(saved, list) else 'no'} "
                f"entries, expected {len(like)}"
            )
        items = [
            from_arrays(s, v, f"{where}.{i}")
            for i, (s, v) in enumerate(zip(saved, like, strict=True))
        ]
        return type(like)(items)
    return saved


# What a checkpoint must hold besides config, method and options.
ENTRIES = (
    "step",
    "tensors",
    "losses",
    "skipped",
    "selection",
    "zero_shot",
    "calibrated_zero_shot",
    "log_lines",
    "elapsed_s",
)


def _plain(value):
    """A value as JSON reads it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value))


def save(path: Path, ctx, step: int, tensors, losses, skipped: int, select) -> None:
    """The loop's state after `step` (called right after a dev check)."""
    save_state(
        path,
        {
            "config": _plain(ctx.config.to_dict()),
            "method": ctx.method,
            "options": _plain(ctx.options),
            "step": step,
            "tensors": to_arrays(list(tensors)),
            "losses": list(losses),
            "skipped": skipped,
            "selection": {
                "best": select.best,
                "best_evals": select.best_evals,
                "best_step": select.best_step,
                "state": to_arrays(select.state),
            },
            "zero_shot": ctx.zero_shot,
            "calibrated_zero_shot": ctx.calibrated_zero_shot,
            "log_lines": ctx.log_lines(),
            "elapsed_s": ctx.elapsed(),
            "machines": ctx.machines,
        },
    )


def load(path: Path, method: str, config, options: dict) -> dict:
    """A checkpoint's state, refused (one line naming the file) unless it is this run's
    (the same method, config.yaml settings and options), whole, and its folder's
    log.jsonl still holds the lines it counts; checked before the model loads."""
    state = load_state(path)
    for key, want in (
        ("method", method),
        ("config", _plain(config.to_dict())),
        ("options", _plain(options)),
    ):
        saved = state.get(key)
        if saved != want:
            if isinstance(saved, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
                what = f"{key} differs in {', '.join(diff)}"
            else:
                what = f"{key} is {saved!r}, not {want!r}"
            raise UserError(f"{path}: {what}; the checkpoint is another run's or was edited")
    for key in ENTRIES:
        if key not in state:
            raise UserError(f"{path}: no {key!r} entry{CORRUPT}")
    selection = state["selection"]
    for key in ("best", "best_evals", "best_step", "state"):
        if not isinstance(selection, dict) or key not in selection:
            raise UserError(f"{path}: no 'selection.{key}' entry{CORRUPT}")
    step, losses = state["step"], state["losses"]
    if not isinstance(step, int) or not 0 <= step <= options["steps"]:
        raise UserError(f"{path}: step {step!r} is not in 0..{options['steps']}{CORRUPT}")
    if not isinstance(losses, list) or len(losses) != step:
        raise UserError(f"{path}: 'losses' does not hold one loss per step to {step}{CORRUPT}")
    JsonlLog(path.parent.parent / "log.jsonl").check_holds(state["log_lines"])  # <out>/checkpoint/
    return state


def restore_tensors(path: Path, state: dict, tensors) -> None:
    """The saved values into the live trainable tensors, in place."""
    saved = from_arrays(state["tensors"], list(tensors), f"{path}: tensors")
    with torch.no_grad():
        for live, value in zip(tensors, saved, strict=True):
            live.copy_(value)


def restore_selection(path: Path, state: dict, select, like) -> None:
    """The dev selection as it was at the checkpoint; `like` is a live state() for types."""
    kept = state["selection"]
    select.best = kept["best"]
    select.best_evals = kept["best_evals"]
    select.best_step = kept["best_step"]
    select.state = from_arrays(kept["state"], like, f"{path}: selection.state")
