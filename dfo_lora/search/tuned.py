"""tuned.safetensors, the tuned state of a run: its format, its writer and its checked reader.

The file holds
- `z` (layers, intrinsic_dim): the best-dev state, which `dfo-lora eval` loads (the config
  in the metadata rebuilds the same projections);
- `<state>.<layer>.<group>.<name>`: the fp32 weights of the `best` and the `final` state
  (the space's `export_tensors`; LoRA: `<state>.<layer>.<target>.A|B`), which `export`
  writes as PEFT, merged or native weights without the data or the statistics;
- metadata: `config` (the run's config.yaml) and `space` (the space's own state: name,
  seed, sigma_hat) as JSON.

It is written atomically (`checkpoint.atomic_write_safetensors`) and read back whole
(`read_tuned`): every check is one line naming the file and the tensor or field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from dfo_lora.config import TuneConfig, load_config, read_yaml_mapping
from dfo_lora.errors import UserError
from dfo_lora.search.checkpoint import atomic_write_safetensors, read_safetensors

STATES = ("best", "final")
Factors = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, target) -> (A, B)


def factor_tensors(factors: dict[str, np.ndarray], state: str) -> dict[str, np.ndarray]:
    """A server's `state_factors` ("<layer>.<target>.A|B") as entries of one state."""
    return {f"{state}.{key}": np.ascontiguousarray(value) for key, value in factors.items()}


def read_factors(tensors: dict[str, np.ndarray], state: str | None = None) -> Factors:
    """LoRA's factors from "<layer>.<target>.A|B" arrays (with `state`: from the entries
    "<state>.<layer>.<target>.A|B" of tuned.safetensors)."""
    if state is not None:
        prefix = f"{state}."
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    factors: Factors = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[2] == "A":
            layer, target = int(parts[0]), parts[1]
            b = tensors[f"{layer}.{target}.B"]
            factors[(layer, target)] = (torch.from_numpy(value), torch.from_numpy(b))
    return factors


def check_state_tensors(
    path: Path,
    tensors: dict[str, np.ndarray],
    space: str,
    config,
    source: str,
    states: bool = False,
    layers: int | None = None,
) -> None:
    """A state's weights ("<layer>.<group>.<name>"; with `states`, "<state>.<layer>..." as
    in tuned.safetensors) agree with the space's `config`, read from `source`: known names,
    the config's groups (targets), shapes of the config's rank / heads / size, widths equal
    across layers, every tensor of a group there. One line naming the file and the tensor,
    so an edited or mismatched file stops here, not as a traceback inside peft or torch."""
    from dfo_lora.spaces import SPACES

    names = SPACES[space][1].tensor_names
    shapes = SPACES[space][1].tensor_shapes  # sizes naming each tensor's dimensions
    groups = getattr(config, "targets", None) or {"parallel": ("mlp",)}.get(space)
    widths: dict[tuple[str, str], tuple[int, str]] = {}
    found: dict[tuple[str, int, str], set[str]] = {}
    for key, array in sorted(tensors.items()):
        parts = key.split(".")
        state = parts.pop(0) if states else ""
        if (
            (states and state not in STATES)
            or len(parts) < 3
            or not parts[0].isdigit()
            or parts[-1] not in names
        ):
            form = "<state>.<layer>.<group>.<name>" if states else "<layer>.<group>.<name>"
            raise UserError(
                f"{path}: tensor {key!r} is not {form} with a {space} name "
                f"({', '.join(names)}); the file was edited or is another space's"
            )
        layer, group, name = int(parts[0]), ".".join(parts[1:-1]), parts[-1]
        if layers is not None and layer >= layers:
            raise UserError(f"{path}: tensor {key!r} is for layer {layer}, the run has {layers}")
        if groups is not None and group not in groups:
            raise UserError(
                f"{path}: tensor {key!r} adapts {group!r}, not one of {','.join(groups)} "
                f"(targets in {source})"
            )
        spec = shapes.get(name)
        if spec is not None:
            want = tuple(getattr(config, s) if hasattr(config, s) else s for s in spec)
            if array.ndim != len(spec) or not all(
                w == d for w, d in zip(want, array.shape, strict=True) if isinstance(w, int)
            ):
                sizes = ", ".join(f"{s} {getattr(config, s)}" for s in spec if hasattr(config, s))
                raise UserError(
                    f"{path}: tensor {key!r} has shape {tuple(array.shape)}, expected "
                    f"({', '.join(map(str, want))}) ({sizes} in {source})"
                )
            for symbol, size in zip(spec, array.shape, strict=True):
                if not hasattr(config, symbol):
                    seen, where = widths.setdefault((group, symbol), (size, key))
                    if seen != size:
                        raise UserError(
                            f"{path}: tensor {key!r} has {symbol} width {size}, {where!r} "
                            f"{seen}; the tensors are not of one model"
                        )
        found.setdefault((state, layer, group), set()).add(name)
    for (state, layer, group), have in found.items():
        if set(names) - have:
            missing = ", ".join(n for n in names if n not in have)
            prefix = f"{state}." if states else ""
            raise UserError(f"{path}: {prefix}{layer}.{group} has no {missing} tensor")


def save_tuned(
    path: Path,
    z: np.ndarray,
    config: TuneConfig,
    factors: dict[str, np.ndarray] | None = None,
    space_state: dict | None = None,
) -> None:
    """The tuned state: z per layer (the config, in metadata, rebuilds the same
    projections), the fp32 weights of the best and final states (LoRA's factors, for
    `export`) and the space's own state (name, seed, sigma_hat) as JSON metadata."""
    arrays = {"z": np.ascontiguousarray(z), **(factors or {})}
    metadata = {"config": config.to_yaml()}
    if space_state is not None:
        metadata["space"] = json.dumps(space_state)
    atomic_write_safetensors(path, arrays, metadata)  # the umask's mode, as open() gives


def load_tuned_state(run_dir: Path, state: str = "best"):
    """The fp32 weights of a run's best or final state ("<layer>.<group>.<name>", the
    space's `export_tensors`; LoRA: the factors A, B) and its config, for `export`."""
    tensors, config = read_tuned(run_dir, "export")
    if not any(key.startswith(("best.", "final.")) for key in tensors):
        if np.any(tensors["z"]):
            raise UserError(
                f"export: {run_dir}/tuned.safetensors holds z only (tuned before exports "
                f"existed); re-run it: dfo-lora tune --config {run_dir}/config.yaml --out NEW"
            )
    prefix = f"{state}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, config


def load_tuned(run_dir: Path) -> tuple[np.ndarray, TuneConfig]:
    """The best-dev z (layers, intrinsic_dim) of a finished run and its config.yaml."""
    tensors, config = read_tuned(run_dir)
    return tensors["z"], config


# What a damaged tuned.safetensors leaves: the checkpoint still holds the best-dev state.
TUNED_HINT = "; rewrite it from the run's checkpoint with dfo-lora tune --resume {run}"


def read_tuned(run_dir: Path, command: str = "eval") -> tuple[dict[str, np.ndarray], TuneConfig]:
    """Every array of tuned.safetensors and the run's config.yaml, read back whole: the
    file parses, every tensor is finite (`checkpoint.read_safetensors`), its metadata
    (config, space) agrees with config.yaml, z is (layers, intrinsic_dim) and the best and
    final weights have the space's shapes (`check_state_tensors`). Each failure is
    one line naming the file and the tensor or field."""
    run_dir = Path(run_dir)
    path = run_dir / "tuned.safetensors"
    if not path.is_file():
        raise UserError(f"{command}: {path} does not exist (is {run_dir} a finished run?)")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{command}: {saved} does not exist (is {run_dir} a finished run?)")
    config = load_config(saved)
    hint = TUNED_HINT.format(run=run_dir)
    tensors, meta = read_safetensors(path, hint=hint)
    _check_tuned_metadata(path, meta, saved)
    space = _space_metadata(path, meta, config)
    layers = len(space["sigma_hat"]) if isinstance(space.get("sigma_hat"), list) else None
    z = tensors.get("z")
    if z is None:
        raise UserError(f"{path}: no tensor 'z'{hint}")
    if z.ndim != 2 or z.shape[1] != config.intrinsic_dim or layers not in (None, z.shape[0]):
        rows = "layers" if layers is None else layers
        raise UserError(
            f"{path}: tensor 'z' has shape {tuple(z.shape)}, expected ({rows}, "
            f"{config.intrinsic_dim}) (intrinsic_dim in {saved}){hint}"
        )
    factors = {k: v for k, v in tensors.items() if k != "z"}
    check_state_tensors(
        path, factors, config.space, config.space_config(), str(saved), True, z.shape[0]
    )
    if factors:  # the best weights are z's: one entry per layer that z changes
        best = sorted({int(k.split(".")[1]) for k in factors if k.startswith("best.")})
        changed = [int(i) for i in np.flatnonzero(np.any(z != 0, axis=1))]
        if best != changed:
            raise UserError(
                f"{path}: z changes layers {changed} but the best weights are for layers "
                f"{best}; the file was edited{hint}"
            )
    return tensors, config


# Where a run reads from and runs on, not what it tuned: `dfo-lora eval` takes them again.
WHERE_FIELDS = ("model", "data_dir", "device", "dtype", "test_limit")


def _check_tuned_metadata(path: Path, meta: dict, saved: Path) -> None:
    """tuned.safetensors' copy of the config equals config.yaml (both are written by the
    same tune): a difference means one was edited or they are two runs' files."""
    try:
        values = yaml.safe_load(meta["config"])
    except KeyError:
        raise UserError(f"{path}: no 'config' metadata (not a tuned.safetensors)") from None
    except yaml.YAMLError:
        raise UserError(f"{path}: its 'config' metadata is not YAML") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: its 'config' metadata is not a mapping")
    want = read_yaml_mapping(saved)  # as written, so fields added since compare equal
    diff = [k for k in {**want, **values} if values.get(k) != want.get(k)]
    if diff:
        shown = ", ".join(f"{k} ({values.get(k)!r} vs {want.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        why = "one was edited or they are two runs' files"
        if set(diff) <= set(WHERE_FIELDS):  # a moved model or data folder, edited in by hand
            why = "put config.yaml back (eval takes --model, --data-dir, --device, --dtype again)"
        raise UserError(f"{path}: its config metadata differs from {saved} in {shown}{more}; {why}")


def _space_metadata(path: Path, meta: dict, config: TuneConfig) -> dict:
    """The space's saved state (name, seed, sigma_hat); {} in files from before it."""
    if "space" not in meta:
        return {}
    try:
        space = json.loads(meta["space"])
    except ValueError:
        raise UserError(f"{path}: its 'space' metadata is not JSON") from None
    if not isinstance(space, dict):
        raise UserError(f"{path}: its 'space' metadata is not a mapping")
    for key, want in (("space", config.space), ("seed", config.seed)):
        if key in space and space[key] != want:
            raise UserError(
                f"{path}: its space metadata has {key} {space[key]!r}, config.yaml {want!r}"
            )
    return space
