"""Checkpoints as one safetensors file: numpy arrays as tensors, everything else as JSON.

A state is a nested dict of JSON values and numpy arrays (the optimizers' state_dicts,
z per layer, counters, RNG states). Arrays are lifted out into the safetensors tensors
under their path ("optimizers.3.mean"), the remaining tree goes into the file's metadata
as JSON. The file is written to a temporary name and renamed over the old one, so a
kill at any moment leaves either the previous or the new checkpoint, never half of one.
Temporary files get the mode a plain open() gives (the umask applies), so the renamed
file is as readable as any other file the user writes. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

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


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        arrays = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tree = json.loads(meta["state"])
        return _join(tree, arrays)
    except (SafetensorError, KeyError, ValueError, OSError) as exc:
        raise UserError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__})"
        ) from None
