"""LoRA parameters for the gradient and zeroth-order baselines, through `peft`.

`add_lora` injects peft LoRA layers (`peft.inject_adapter_in_model`) into the modules
that the backbone registry names for each target (q, k, v, o, MLP projections) in every
layer of the server's own model, so the server's buckets, forward and `evaluate` see the
adapted model as it is, with nothing merged or copied. peft starts B at zero, so the
injected model is exactly the zero state until a step changes it (tested).

The server wraps its search-space targets in `LoraProjection`s (identity while
nothing is committed); LoRA then goes on the frozen module inside (`<path>.base`).
A fused module (GPT-2's `c_attn` holds q, k and v) gets one LoRA over the whole module:
peft cannot adapt a slice of it, and the run's notes say so.

Adapter weights are kept in fp32 whatever the backbone's dtype (AdamW and MeZO's small
perturbations need it); peft casts the input to them and the output back.
"""

from __future__ import annotations

import torch
from torch import nn

from dfo_lora.backbone.registry import layer_prefix
from dfo_lora.errors import UserError
from dfo_lora.extras import require_peft
from dfo_lora.spaces.lora import LoraProjection


def lora_modules(server, targets: list[str]) -> tuple[list[str], list[str]]:
    """Full module names to adapt (every layer x target) and notes on fused modules."""
    model, arch = server.model, server.arch
    prefix = layer_prefix(model, arch)
    names: list[str] = []
    fused: dict[str, list[str]] = {}
    for index in range(len(server.layers)):
        for target in targets:
            proj = arch.projection(model, target)  # UserError for a name the model lacks
            path = f"{prefix}.{index}.{proj.module}"
            if isinstance(model.get_submodule(path), LoraProjection):
                path += ".base"
            if proj.out_slice is not None:
                fused.setdefault(proj.module, []).append(target)
            if path not in names:
                names.append(path)
    notes = [
        f"LoRA targets {','.join(sorted(set(t)))} share the fused module {module}: "
        "peft adapts the whole module"
        for module, t in fused.items()
    ]
    return names, notes


def add_lora(
    ctx, method: str, targets: list[str], rank: int, lora_alpha: float
) -> list[tuple[str, nn.Parameter]]:
    """Inject LoRA (seeded by the run's seed) and return its (name, parameter) pairs."""
    peft = require_peft(method)
    server = ctx.server
    names, notes = lora_modules(server, targets)
    ctx.notes.extend(notes)
    conv1d = any(not isinstance(server.model.get_submodule(n), nn.Linear) for n in names)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        lora_dropout=0.0,
        target_modules=names,
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out)
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # A's init, seeded, global RNG untouched
        torch.manual_seed(ctx.config.seed)
        peft.inject_adapter_in_model(config, server.model)
    params = [(n, p) for n, p in server.model.named_parameters() if ".lora_" in n]
    if not params:
        raise UserError(f"{method}: no LoRA parameters were created for targets {targets}")
    for _, p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def snapshot(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params}


def restore(params: list[tuple[str, nn.Parameter]], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params:
            p.copy_(state[n])


def save_lora(path, params: list[tuple[str, nn.Parameter]], meta: dict) -> None:
    """The kept LoRA weights (fp32, peft's parameter names) as safetensors, written
    atomically with the umask's mode (safetensors' save_file makes files 0o600)."""
    from dfo_lora.search.checkpoint import atomic_write_safetensors

    arrays = {n: p.detach().cpu().contiguous().numpy() for n, p in params}
    atomic_write_safetensors(path, arrays, {k: str(v) for k, v in meta.items()})


def lora_parameter_count(params) -> int:
    return int(sum(p.numel() for _, p in params))


def finish_lora_run(ctx, params, select, options: dict, losses: list[float], **extra) -> dict:
    """The end shared by the LoRA baselines: restore the dev-selected weights, score test
    once, save the weights, and write results.json with the run's figures."""
    restore(params, select.state)
    test = ctx.evaluate("test", options["calibrate"])
    save_lora(
        ctx.open_out() / "lora.safetensors",
        params,
        {"method": ctx.method, "step": select.best_step, **options},
    )
    return ctx.finish(
        {"dev": select.best, "test": test},
        best_dev_evals=select.best_evals,
        steps=options["steps"],
        best_dev_step=select.best_step,
        train_loss={"first": losses[0], "last": losses[-1], "min": min(losses)},
        lora_parameters=lora_parameter_count(params),
        **extra,
    )
