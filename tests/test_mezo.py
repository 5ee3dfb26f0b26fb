"""`mezo`: MeZO on any space, its own weights or its projected z, through one loop.

`mezo --on weights --space lora` must do what peft's `mezo-lora` does: from the same
initial A and the same seeds, the same losses step by step within fp32 rounding. With
`--on z`, each step's L+ is the server's own score of z + eps u. Tiny random Llama, real
SmolLM2 tokenizer, real sst2 data, fp32.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dfo_lora.baselines import get_method
from dfo_lora.baselines.gradient import initial_parameters, install, snapshot, tensors
from dfo_lora.baselines.lora import add_lora
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.training import mezo_seeds, perturb, train_mezo
from dfo_lora.cli import main
from tests.test_baselines import cli_args, tiny

STEPS = {"steps": 3, "eval_every": 3, "lr": 1e-2, "eps": 1e-2}


def test_mezo_on_lora_weights_agrees_with_peft_mezo_lora(tiny_llama_dir, tmp_path):
    config = tiny(tiny_llama_dir, targets=["q", "v"], rank=4)
    peft_options = get_method("mezo-lora").resolve({**STEPS, "rank": 4, "lora_alpha": 4})
    peft_ctx = prepare_context("mezo-lora", config, peft_options, tmp_path / "peft")
    peft_params = add_lora(peft_ctx, "mezo-lora", ["q", "v"], rank=4, lora_alpha=4.0)

    ctx = prepare_context("mezo", config, get_method("mezo").resolve(STEPS), tmp_path / "own")
    params = initial_parameters(ctx)
    with torch.no_grad():
        for name, p in peft_params:
            found = re.search(r"layers\.(\d+)\.self_attn\.(q|v)_proj\..*lora_(A|B)", name)
            layer, target, factor = int(found[1]), found[2], found[3]
            params[layer][target]["AB".index(factor)][0].copy_(p)
    own = tensors(params)
    for t in own:
        t.requires_grad_(False)
    # the same perturbation order: per layer, per target, A then B, as peft lists them
    assert [tuple(t.shape[1:]) for t in own] == [tuple(p.shape) for _, p in peft_params]

    def own_install():
        install(ctx.server, params)

    _, own_losses, _ = train_mezo(
        ctx, own, ctx.options, state=lambda: snapshot(params), install=own_install
    )
    peft_tensors = [p for _, p in peft_params]
    _, peft_losses, _ = train_mezo(peft_ctx, peft_tensors, peft_options, state=lambda: None)
    assert own_losses == pytest.approx(peft_losses, rel=1e-5)
    assert len(set(own_losses)) == len(own_losses)  # the weights did move


def test_mezo_on_z_scores_what_the_server_scores(tiny_llama_dir, tmp_path):
    space = dict(targets=["v", "o"], a_factor="pca", intrinsic_dim=8, alpha=0.5, sigma=0.2)
    config = tmp_path / "space.yaml"
    config.write_text(json.dumps(space))
    out = tmp_path / "run"
    args = ["--config", config, "--on", "z", "--steps", "2", "--eval-every", "2", "--eps", "0.1"]
    assert main(cli_args(tiny_llama_dir, "mezo", out, *args)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["evaluations"] == 4 and results["parameters"] == 3 * 8
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first = next(x for x in steps if x["kind"] == "generation")
    assert load_file(str(out / "z.safetensors"))["z"].shape == (3, 8)

    ctx = prepare_context("mezo", tiny(tiny_llama_dir, **space), {}, tmp_path / "never")
    z = torch.zeros(3, 8)
    perturb([z], int(mezo_seeds(42, 2)[0]), 0.1)  # step 1's z + eps u, from z = 0
    ctx.server.set_state(z.double().numpy())
    assert ctx.server.evaluate("train")["loss"] == pytest.approx(first["loss_plus"], rel=1e-5)


def test_mezo_on_adapter_weights_runs(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "series.yaml"
    config.write_text("space: series\n")
    assert main(cli_args(tiny_llama_dir, "mezo", out, "--config", config, "--steps", "2")) == 0
    results = json.loads((out / "results.json").read_text())
    saved = load_file(str(out / "parameters.safetensors"))
    assert sum(t.numel() for t in saved.values()) == results["parameters"]
    assert all(k.endswith((".down", ".up")) for k in saved) and results["skipped_steps"] == 0
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    moves = [x["loss_plus"] - x["loss_minus"] for x in steps if x["kind"] == "generation"]
    assert len(moves) == 2 and all(abs(m) > 0 for m in moves)  # u moves the adapters' loss
