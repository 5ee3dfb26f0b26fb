"""`dfo-lora export RUN --format peft|merged|native [--state best|final] --out DIR`.

A tuned LoRA state is a set of factor pairs: for each layer and target, A (r, in) and
B (out, r), delta = B @ A added to the projection's weight. `tune` stores them in fp32 in
`tuned.safetensors` (keys `<state>.<layer>.<target>.A|B`, state `best` = the dev-selected
state, `final` = the last searched one), so an export needs the base model only, not the
data or the projections' statistics.

- `peft`: a folder that `PeftModel.from_pretrained(base, DIR)` loads: `adapter_config.json`
  (the registry's module names as `target_modules`, `r`, and `lora_alpha = r` so peft's
  scaling alpha / r is 1) and `adapter_model.safetensors`. A fused module (GPT-2's
  `c_attn` holds q, k and v) gets one LoRA whose B is zero outside each target's slice of
  its output, with rank r per target it holds (`rank_pattern`).
- `merged`: the base model with every delta added to its weights, saved with its
  tokenizer: loadable by `AutoModelForCausalLM` / `AutoModelForMaskedLM.from_pretrained`.

- `native` (every space; the only one for hydra, series and parallel, whose change depends
  on the input): the base model's reference, the space and its config and the state's
  fp32 weights, which `dfo_lora.load_tuned(DIR)` installs (see dfo_lora/native.py).

All are written in fp32 into a staging folder and renamed into place, so a failed export
leaves nothing behind. A state that is the unmodified model (z = 0 everywhere, e.g. a run
whose dev selection kept the zero state) exports as a LoRA of zeros on the run's targets
(native: as no weights at all).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.fileio import create_temp_dir, honour_umask
from dfo_lora.search.tuned import STATES, Factors, read_factors

FORMATS = ("peft", "merged", "native")


def merge_into(model: nn.Module, arch, factors: Factors) -> None:
    """Add every B @ A into the model's weights (fused modules: into the target's slice)."""
    from dfo_lora.spaces.modules import merge_delta

    layers = arch.layers(model)
    for (layer, target), (a, b) in factors.items():
        proj = arch.projection(model, target)
        merge_delta(layers[layer].get_submodule(proj.module), b @ a, proj.out_slice)


def peft_weights(model: nn.Module, arch, factors: Factors, rank: int):
    """(target module names, {module: (A, B)} of the fused LoRA per module, rank pattern)."""
    from dfo_lora.backbone.registry import layer_prefix
    from dfo_lora.spaces.modules import out_columns, projection_shape

    prefix = layer_prefix(model, arch)
    per_module: dict[str, list] = {}
    for (layer, target), (a, b) in sorted(factors.items()):
        proj = arch.projection(model, target)
        name = f"{prefix}.{layer}.{proj.module}"
        per_module.setdefault(name, []).append((proj, a, b))
    weights, ranks = {}, {}
    for name, parts in per_module.items():
        out_features = projection_shape(model.get_submodule(name))[1]
        a_full = torch.cat([a for _, a, _ in parts])  # (k*r, in)
        b_full = torch.zeros(out_features, rank * len(parts))
        for i, (proj, _, b) in enumerate(parts):
            b_full[out_columns(proj.out_slice), i * rank : (i + 1) * rank] = b
        weights[name] = (a_full, b_full)
        if len(parts) > 1:
            ranks[name] = rank * len(parts)
    return weights, ranks


def zero_factors(model: nn.Module, arch, targets, rank: int) -> Factors:
    """Factors of the zero state for every layer and target: a LoRA that changes nothing
    (what a run whose dev-selected state is the unmodified model exports)."""
    from dfo_lora.spaces.modules import out_width, projection_shape

    factors = {}
    for index, layer in enumerate(arch.layers(model)):
        for target in targets:
            proj = arch.projection(model, target)
            in_features, out_features = projection_shape(layer.get_submodule(proj.module))
            out_features = out_width(proj.out_slice, out_features)
            factors[(index, target)] = (
                torch.zeros(rank, in_features),
                torch.zeros(out_features, rank),
            )
    return factors


def save_peft(model: nn.Module, arch, factors: Factors, rank: int, out: Path, base: str) -> None:
    """A PEFT LoRA adapter folder equal to the factors (scaling 1)."""
    import peft

    weights, ranks = peft_weights(model, arch, factors, rank)
    conv1d = any(not isinstance(model.get_submodule(n), nn.Linear) for n in weights)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(weights),
        rank_pattern={f"^{n}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{n}$": r for n, r in ranks.items()},
        lora_dropout=0.0,
        fan_in_fan_out=conv1d,
        bias="none",
        base_model_name_or_path=base,
    )
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, (a, b) in weights.items():
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(str(out))


def check_mergeable(space: str, fmt: str) -> None:
    """Only a space whose change is a fixed weight delta (LoRA) exports as PEFT LoRA or merged
    weights; the others change each token by a function of its input."""
    from dfo_lora.spaces import SPACES

    kind = SPACES[space][1]
    if fmt != "native" and not kind.mergeable:
        why = kind.not_mergeable_because
        raise UserError(
            f"export: a {space} run cannot be exported as {fmt}: {why}, so it is no fixed "
            "weight delta to merge (only lora runs do); use --format native"
        )


def export_run(run_dir: str | Path, fmt: str, out: str | Path, state: str = "best") -> Path:
    """Export a finished run's tuned state (checks first, then writes `out` atomically)."""
    from dfo_lora.search.tuned import load_tuned_state

    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise UserError(
            f"export: format {fmt!r} is not one of {', '.join(FORMATS)}"
            + did_you_mean(fmt, FORMATS)
        )
    if state not in STATES:
        raise UserError(f"export: state {state!r} is not one of {', '.join(STATES)}")
    if not (run_dir / "results.json").is_file():
        raise UserError(f"export: {run_dir} has no results.json (the run has not finished)")
    if out.exists():
        raise UserError(f"export: {out} exists; choose a new --out folder")
    tensors, config = load_tuned_state(run_dir, state)
    if fmt == "native":  # no base model needed: the manifest refers to it

        def write(staging: Path) -> None:
            from dfo_lora.native import write_native

            write_native(
                staging,
                tensors,
                config.model,
                config.space_config(),
                state,
                str(run_dir.resolve()),
                config.trust_remote_code,
            )

    else:
        write = lora_writer(fmt, tensors, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = create_temp_dir(out.parent, f".{out.name}-")  # the umask applies, as to mkdir
    try:
        write(staging)
        if fmt != "native":  # the native manifest is this file
            note = {"run": str(run_dir.resolve()), "format": fmt, "state": state}
            (staging / "dfo_lora_export.json").write_text(json.dumps(note, indent=2))
        honour_umask(staging)  # safetensors writes 0o600; the export is a plain folder
        os.replace(staging, out)
    except SafetensorError as exc:  # its own file writes: a full disk is not an OSError
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"export: cannot write {out}: {str(exc).split(': ', 1)[-1]}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def lora_writer(fmt: str, tensors: dict[str, np.ndarray], config):
    """Checks a peft or merged export (a LoRA run; peft installed), loads the base model
    and returns what writes the export into a staging folder."""
    from dfo_lora.backbone import load_backbone
    from dfo_lora.backbone.loading import resolve_source

    check_mergeable(config.space, fmt)
    if fmt == "peft":
        from dfo_lora.extras import require_peft

        require_peft("export --format peft")
    factors = read_factors(tensors)
    backbone = load_backbone(config.model, "fp32", "cpu")
    model, arch = backbone.model, backbone.arch
    if not factors:  # the state is the unmodified model: an adapter that changes nothing
        factors = zero_factors(model, arch, config.space_config().targets, config.rank)

    def write(staging: Path) -> None:
        if fmt == "peft":
            save_peft(model, arch, factors, config.rank, staging, resolve_source(config.model)[0])
        else:
            merge_into(model, arch, factors)
            model.save_pretrained(staging, safe_serialization=True)
            backbone.tokenizer.save_pretrained(staging)

    return write
