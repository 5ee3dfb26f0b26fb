"""`gradient`: AdamW on a space's own weights, through the server's modules.

`gradient --space lora` must train what peft's `gradient-lora` trains: from the same
initial A, the same losses step by step within fp32 rounding. Adapter weights start at
the model and train; a space without weights of its own is refused in one line. Tiny
random Llama, real SmolLM2 tokenizer, real sst2 data, fp32.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from dfo_lora.baselines import get_method
from dfo_lora.baselines.gradient import initial_parameters, install, train
from dfo_lora.baselines.lora import add_lora
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.training import train_adamw
from dfo_lora.cli import main
from tests.test_baselines import cli_args, tiny

STEPS = {"steps": 4, "eval_every": 2, "lr": 1e-2}


def test_gradient_on_the_lora_space_agrees_with_peft_gradient_lora(tiny_llama_dir, tmp_path):
    config = tiny(tiny_llama_dir, targets=["q", "v"], rank=4)
    peft_options = get_method("gradient-lora").resolve({**STEPS, "rank": 4, "lora_alpha": 4})
    peft_ctx = prepare_context("gradient-lora", config, peft_options, tmp_path / "peft")
    peft_params = add_lora(peft_ctx, "gradient-lora", ["q", "v"], rank=4, lora_alpha=4.0)
    initial_a = {}
    for name, p in peft_params:
        found = re.search(r"layers\.(\d+)\.self_attn\.(q|v)_proj\..*lora_A", name)
        if found:
            initial_a[int(found[1]), found[2]] = p.detach().clone()
    assert len(initial_a) == 3 * 2

    options = get_method("gradient").resolve(STEPS)
    ctx = prepare_context("gradient", config, options, tmp_path / "own")
    params = initial_parameters(ctx)
    assert set(params[0]) == {"q", "v"}
    with torch.no_grad():
        for (layer, target), a in initial_a.items():
            params[layer][target][0][0].copy_(a)
    own_select, own_losses = train(ctx, params)

    tensors = [p for _, p in peft_params]
    peft_select, peft_losses = train_adamw(peft_ctx, tensors, peft_options, state=lambda: None)
    assert own_losses == pytest.approx(peft_losses, rel=1e-5)
    assert own_losses[-1] < own_losses[0] - 1e-3  # it trained
    assert own_select.best_step == peft_select.best_step
    assert own_select.best == pytest.approx(peft_select.best, rel=1e-5)


@pytest.mark.parametrize("space", ["series", "parallel"])
def test_adapter_weights_start_at_the_model_and_train(space, tiny_llama_dir, tmp_path):
    config = tiny(tiny_llama_dir, space=space)
    options = get_method("gradient").resolve({**STEPS, "steps": 2})
    ctx = prepare_context("gradient", config, options, tmp_path / "never")
    server = ctx.server
    before = server.evaluate("train")
    params = initial_parameters(ctx)
    down, up = next(iter(params[0].values()))
    assert float(down.detach().abs().max()) > 0 and float(up.detach().abs().max()) == 0
    install(server, params)
    assert server.evaluate("train") == pytest.approx(before, abs=1e-6)  # the zero state
    _, losses = train(ctx, params)
    assert float(up.detach().abs().max()) > 0
    assert server.evaluate("train")["loss"] < before["loss"] - 1e-4  # trained, live


def test_run_saves_the_kept_weights(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "series.yaml"
    config.write_text("space: series\n")
    args = ["--config", config, "--steps", "3", "--eval-every", "3", "--lr", "0.01"]
    assert main(cli_args(tiny_llama_dir, "gradient", out, *args)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "gradient" and results["evaluations"] == 3
    saved = load_file(str(out / "parameters.safetensors"))
    assert sum(t.numel() for t in saved.values()) == results["parameters"]
    assert {k.split(".")[0] for k in saved} == {"0", "1", "2"}
    assert all(k.endswith((".down", ".up")) for k in saved)


def test_a_space_without_own_weights_is_a_one_line_error(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "run"
    config = tmp_path / "hydra.yaml"
    config.write_text("space: hydra\n")
    assert main(cli_args(tiny_llama_dir, "gradient", out, "--config", config)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hydra space has no weights of its own" in err[0]
    assert not out.exists()


def test_bitfit_trains_the_bias_shifts_from_zero(tiny_llama_dir, tmp_path):
    """BitFit: `gradient --space bitfit` trains one shift per projection output, from 0."""
    config = tiny(tiny_llama_dir, space="bitfit", targets=["q", "v", "down"])
    options = get_method("gradient").resolve({**STEPS, "steps": 2})
    ctx = prepare_context("gradient", config, options, tmp_path / "never")
    before = ctx.server.evaluate("train")
    params = initial_parameters(ctx)
    assert set(params[0]) == {"q", "v", "down"}
    (bias,) = params[0]["down"]
    hidden = ctx.server.model.config.hidden_size  # down writes the residual stream
    assert bias.shape == (1, hidden) and float(bias.detach().abs().max()) == 0
    _, losses = train(ctx, params)
    assert float(bias.detach().abs().max()) > 0
    assert ctx.server.evaluate("train")["loss"] < before["loss"] - 1e-4


def test_deep_prompt_trains_its_shifts_p_tuning_v2(tiny_llama_dir, tmp_path):
    """P-Tuning v2 in the additive form: `gradient --space deep-prompt` trains one prompt
    shift (n, H) per layer from zero, on inputs with the prompt tokens in front."""
    config = tiny(tiny_llama_dir, space="deep-prompt", prompt_length=3)
    options = get_method("gradient").resolve({**STEPS, "steps": 2})
    ctx = prepare_context("gradient", config, options, tmp_path / "never")
    before = ctx.server.evaluate("train")
    params = initial_parameters(ctx)
    hidden = ctx.server.model.config.hidden_size
    assert [tuple(p["prompt"][0].shape) for p in params] == [(1, 3, hidden)] * 3
    train(ctx, params)
    assert all(float(p["prompt"][0].detach().abs().max()) > 0 for p in params)
    assert ctx.server.evaluate("train")["loss"] < before["loss"] - 1e-4
