"""The native export: any space's tuned state in this project's own format, and its loader.

HydraLoRA's router and the bottleneck adapters change each token by a function of its
input, so they are no fixed weight delta that a PEFT LoRA or a merged model could hold.
The native format keeps what rebuilds them instead, with a reference to the base model
(its weights are not copied):

    DIR/dfo_lora_export.json   manifest: format "native", format_version, model (the run's
                               `model` as given: preset, folder or hub id),
                               trust_remote_code, space, space_config, state, run
    DIR/weights.safetensors    the state's fp32 weights "<layer>.<group>.<name>" (the
                               space's `export_tensors`; layers left at zero are absent)

`load_tuned(DIR)` loads the base model as `tune` does (the registry picks the HF class),
installs the space's own modules in every layer (`SearchSpace.install`) and commits the
stored weights (`LayerModules.commit`), so a stock HF forward gives the tuned logits. No
training data is needed: the weights are stored, not recomputed from z.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dfo_lora.errors import UserError

MANIFEST = "dfo_lora_export.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1


def write_native(
    out: Path,
    tensors: dict[str, np.ndarray],
    model: str,
    space,
    state: str,
    run: str = "",
    trust_remote_code: bool = False,
) -> None:
    """Write one state's weights and the manifest into the (new, empty) folder `out`;
    `space` is the space's config (dfo_lora.spaces), `model` the base model as given."""
    from safetensors.numpy import save_file

    from dfo_lora.spaces import space_name

    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    save_file(arrays, str(out / WEIGHTS))
    manifest = {
        "format": "native",
        "format_version": FORMAT_VERSION,
        "model": model,
        "trust_remote_code": bool(trust_remote_code),
        "space": space_name(space),
        "space_config": dataclasses.asdict(space),
        "state": state,
        "run": run,
        "weights": WEIGHTS,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(folder: Path) -> dict:
    """The manifest of a native export; one line for anything else."""
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"load_tuned: {path} does not exist (not a `dfo-lora export` folder)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"load_tuned: {path} is not a readable JSON manifest ({reason})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"load_tuned: {path} is not a JSON object (not a dfo-lora manifest)")
    if manifest.get("format") != "native":
        raise UserError(
            f"load_tuned: {folder} is a {manifest.get('format')} export, not native (load it "
            "with peft or transformers, or re-export with --format native)"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"load_tuned: {folder} has native format version {manifest.get('format_version')}; "
            f"this dfo-lora reads version {FORMAT_VERSION} (re-export the run)"
        )
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"load_tuned: {folder / WEIGHTS} does not exist (a partial copy?)")
    missing = [k for k in ("model", "space", "space_config") if k not in manifest]
    if missing or not isinstance(manifest["space_config"], dict):
        what = (
            f"has no {', '.join(missing)}" if missing else "has a space_config that is no mapping"
        )
        raise UserError(f"load_tuned: {path} {what} (edited? re-export the run)")
    return manifest


def read_weights(folder: Path, space: str, config) -> dict[str, np.ndarray]:
    """weights.safetensors read back whole (it parses, every tensor is finite) and of the
    manifest's space (names, rank / heads / size), each failure one line naming the file
    and the tensor: the checks every run file gets (`checkpoint.read_safetensors`)."""
    from dfo_lora.search.checkpoint import read_safetensors
    from dfo_lora.search.tuned import check_state_tensors

    path = folder / WEIGHTS
    tensors, _ = read_safetensors(path, hint="; re-export the run (dfo-lora export RUN)")
    check_state_tensors(path, tensors, space, config, str(folder / MANIFEST))
    return tensors


def space_config_of(name: str, values: dict):
    """The space config from the manifest's JSON (lists back to the tuples it holds)."""
    from dfo_lora.spaces import SPACES, check_space_name

    check_space_name(name)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        config = SPACES[name][0](**values)
    except TypeError as exc:  # a field this version's space does not have
        raise UserError(f"the {name} space_config: {exc}") from None
    config.validate()
    return config


def install_state(net: nn.Module, arch, space: str, config, tensors: dict[str, np.ndarray]):
    """Install the space's modules in every layer of `net` and commit the stored weights
    (per layer "<layer>.<group>.<name>"; a layer without any is the zero state)."""
    from dfo_lora.spaces import SPACES

    kind = SPACES[space][1]
    layers = arch.layers(net)
    per_layer: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        layer, _, rest = key.partition(".")
        per_layer.setdefault(int(layer), {})[rest] = value
    if per_layer and max(per_layer) >= len(layers):
        raise UserError(
            f"load_tuned: the weights are for layer {max(per_layer)}, the model has "
            f"{len(layers)} layers (another base model?)"
        )
    param = next(net.parameters())
    for index, layer in enumerate(layers):
        modules = kind.install(config, arch, net, layer)
        arrays = per_layer.get(index)
        if not arrays:
            modules.commit(None)
            continue
        groups = {key.rpartition(".")[0] for key in arrays}
        try:
            weights = {
                g: tuple(
                    torch.from_numpy(arrays[f"{g}.{n}"])[None].to(param.device, param.dtype)
                    for n in kind.tensor_names
                )
                for g in groups
            }
            modules.commit(weights)
        except KeyError as exc:
            raise UserError(
                f"load_tuned: layer {index} has no {space} weights for {exc.args[0]}"
            ) from None


def load_tuned(
    path: str | Path, dtype: str = "fp32", device: str = "cpu", model: str | None = None
) -> nn.Module:
    """A native export as a plain HF model with the space's modules installed and the
    tuned weights committed: `model(input_ids=...)` gives the tuned logits.

    `model` overrides the manifest's base model (e.g. a folder that has moved). The
    returned model holds the space's wrappers, so save it as a native export, not with
    `save_pretrained`.
    """
    from dfo_lora.backbone import load_backbone

    folder = Path(path)
    manifest = read_manifest(folder)
    try:
        config = space_config_of(manifest["space"], manifest["space_config"])
    except UserError as exc:  # an edited manifest: name it
        raise UserError(f"load_tuned: {folder / MANIFEST}: {exc}") from None
    tensors = read_weights(folder, manifest["space"], config)
    backbone = load_backbone(
        model or manifest["model"], dtype, device, bool(manifest.get("trust_remote_code"))
    )
    with torch.no_grad():
        install_state(backbone.model, backbone.arch, manifest["space"], config, tensors)
    return backbone.model
