"""Checkpoints as one safetensors file: numpy arrays as tensors, everything else as JSON.

A state is a nested dict of JSON values and numpy arrays (the optimizers' state_dicts,
z per layer, counters, RNG states). Arrays are lifted out into the safetensors tensors
under their path ("optimizers.3.mean"), the remaining tree goes into the file's metadata
as JSON. The file is written to a temporary name and renamed over the old one, so a
kill at any moment leaves either the previous or the new checkpoint, never half of one.
Temporary files get the mode a plain open() gives (the umask applies), so the renamed
file is as readable as any other file the user writes. No pickle anywhere.

Every safetensors file of a run is read back through `read_safetensors`: a missing file,
one that does not parse (truncated, replaced, appended to) and a tensor holding NaN or
inf are each one line naming the file (and the tensor), so no reader passes a damaged
file on to a traceback, a loss of 10000 or an adapter full of NaN. No size or checksum
is recorded at write time, on purpose: the safetensors header already fixes every
tensor's dtype, shape and byte range, and the reader refuses a file whose length differs
from it, so truncation and appended bytes are caught without one; writes are atomic, so
a torn write never lands; and a checksum kept in the file's own metadata could not cover
that metadata, nor stop a hand edit that rewrites it too. What it would add, a bit
flipped in place into another finite number, is not worth a field that every older run's
files lack; NaN, inf and shape damage are caught here, and CMA-ES's replay check catches
a changed optimizer on resume (beyond 1e-6 relative, the rounding another CPU brings).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from dfo_lora.errors import UserError
from dfo_lora.fileio import create_temp_file

ARRAY_KEY = "__array__"


def _split(tree, path: str, arrays: dict[str, np.ndarray]):
    if isinstance(tree, np.ndarray):
        arrays[path] = np.ascontiguousarray(tree)
        return {ARRAY_KEY: path}
    if isinstance(tree, dict):
        return {
            str(k): _split(v, f"{path}.{k}" if path else str(k), arrays) for k, v in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [_split(v, f"{path}.{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def _join(tree, arrays: dict[str, np.ndarray]):
    if isinstance(tree, dict):
        if set(tree) == {ARRAY_KEY}:
            return arrays[tree[ARRAY_KEY]]
        return {k: _join(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join(v, arrays) for v in tree]
    return tree


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> None:
    """numpy arrays as a safetensors file, written atomically with the umask's mode
    (safetensors' own save_file makes the file 0o600)."""
    atomic_write_bytes(path, save(arrays, metadata=metadata))


def save_state(path: Path, state: dict) -> None:
    arrays: dict[str, np.ndarray] = {}
    tree = _split(state, "", arrays)
    atomic_write_safetensors(path, arrays, {"state": json.dumps(tree)})


def read_safetensors(
    path: Path, infinite_ok: Callable[[str], bool] | None = None, hint: str = ""
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor and the metadata of a safetensors file, checked: it exists, it parses
    (the header covers the file exactly) and every float tensor is finite (`infinite_ok`
    names the keys that may hold +inf, e.g. a worst loss). Each failure is one line naming
    the file and the tensor key, with `hint` (what to do) appended.

    The bytes are read once, so the tensors and the metadata come from the same file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"{path}: {what}{hint}")
    try:
        data = path.read_bytes()
        arrays = load(data)
        (size,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, TypeError, struct.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors file ({reason}){hint}") from None
    for key, array in arrays.items():
        if array.dtype.kind not in "fc":
            continue
        bad = ~np.isfinite(array)
        if infinite_ok is not None and infinite_ok(key):
            bad &= ~np.isposinf(array)
        if bad.any():
            kind = "NaN" if np.isnan(array).any() else "inf"
            raise UserError(
                f"{path}: tensor {key!r} holds {kind} ({int(bad.sum())} of {array.size} "
                f"values are not finite){hint}"
            )
    return arrays, metadata


def _loss_key(key: str) -> bool:
    """Optimizer arrays of losses, where +inf is a legitimate worst (a NaN loss)."""
    return "loss" in key.rpartition(".")[2]


CORRUPT = "; the checkpoint is corrupt, so the run cannot resume (start it again with --overwrite)"


def load_state(path: Path, config=None) -> dict:
    """A checkpoint's state, read back through `read_safetensors`; with the run's `config`
    (its config.yaml) it must also be that run's: the same settings, z of shape
    (layers, intrinsic_dim) and a best-dev z of the same shape."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    arrays, meta = read_safetensors(path, _loss_key, CORRUPT)
    try:
        state = _join(json.loads(meta["state"]), arrays)
    except KeyError as exc:
        raise UserError(f"{path}: no {exc.args[0]!r} entry{CORRUPT}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path}: metadata 'state' is not JSON ({exc}){CORRUPT}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: metadata 'state' is not a mapping{CORRUPT}")
    if config is not None:
        check_run_state(path, state, config)
    return state


def check_run_state(path: Path, state: dict, config) -> None:
    """The checkpoint belongs to the run whose config.yaml is `config` (a TuneConfig)."""
    saved = state.get("config")
    want = json.loads(json.dumps(config.to_dict()))
    if isinstance(saved, dict) and saved != want:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise UserError(
            f"{path}: its config differs from config.yaml in {', '.join(diff)}; "
            "the checkpoint is another run's or was edited"
        )
    z = state.get("z")
    if not isinstance(z, np.ndarray) or z.ndim != 2 or z.shape[1] != config.intrinsic_dim:
        shape = getattr(z, "shape", None)
        raise UserError(
            f"{path}: tensor 'z' has shape {shape}, expected (layers, {config.intrinsic_dim}) "
            f"(intrinsic_dim in config.yaml){CORRUPT}"
        )
    best = state.get("best_dev_z")
    if not isinstance(best, np.ndarray) or best.shape != z.shape:
        raise UserError(
            f"{path}: tensor 'best_dev_z' has shape {getattr(best, 'shape', None)}, "
            f"not z's {z.shape}{CORRUPT}"
        )
