"""`subspace-gradient`: AdamW on the search space's own z (the space's ceiling).

Its training forward must be the search's objective: the loss it back-propagates at a z
equals what the server scores for that z, and its gradient matches finite differences of
the server's own scores. Tiny random Llama, real SmolLM2 tokenizer, real sst2 data, fp32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dfo_lora.baselines import get_method
from dfo_lora.baselines.common import train_loss
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.subspace_gradient import install
from dfo_lora.cli import main
from dfo_lora.config import TuneConfig
from tests.test_baselines import cli_args

SPACE = dict(targets=["v", "o"], a_factor="pca", intrinsic_dim=8, alpha=0.5, sigma=0.2)
# Every space: the method trains whichever space the run names.
SPACES = {
    "lora": SPACE,
    "hydra": dict(space="hydra", intrinsic_dim=12, alpha=0.5, sigma=0.2),
    "series": dict(space="series", adapter_down="pca", intrinsic_dim=8, alpha=0.5, sigma=0.2),
    "parallel": dict(space="parallel", intrinsic_dim=8, alpha=0.5, sigma=0.2),
}


def tiny(model_dir, space=SPACE, **overrides) -> TuneConfig:
    values = dict(model=str(model_dir), task="sst2", test_limit=24, dtype="fp32", **space)
    values.update(overrides)
    return TuneConfig(**values).validate()


@pytest.mark.parametrize("space", list(SPACES))
def test_training_forward_and_gradient_are_the_servers_objective(space, tiny_llama_dir, tmp_path):
    config = tiny(tiny_llama_dir, SPACES[space])
    options = get_method("subspace-gradient").resolve({"calibrate": True})
    ctx = prepare_context("subspace-gradient", config, options, tmp_path / "never")
    server = ctx.server
    assert server.space.name == space  # the run's own space, not the plain-model LoRA
    rng = np.random.default_rng(0)
    state = 0.3 * rng.standard_normal((server.num_layers, server.dim))

    z = torch.tensor(state, dtype=torch.float32, requires_grad=True)
    install(server, z)
    loss, _ = train_loss(server, "ce", calibrate=True)
    loss.backward()
    grad = z.grad.double().numpy()

    server.set_state(state)  # the plain inference path of the same state
    assert server.evaluate("train", calibrate=True)["loss"] == pytest.approx(
        float(loss.detach()), rel=1e-5
    )
    # Finite differences of the server's own scores, the other layers at `state`.
    h = 1e-3
    for layer in range(server.num_layers):
        plus = state[layer] + h * np.eye(server.dim)
        minus = state[layer] - h * np.eye(server.dim)
        server.calibrate = True
        scores = server.score(layer, np.vstack([plus, minus]))["loss"]
        numeric = (scores[: server.dim] - scores[server.dim :]) / (2 * h)
        assert np.abs(grad[layer]).max() > 1e-4  # the layer's z moves the loss
        np.testing.assert_allclose(grad[layer], numeric, rtol=2e-2, atol=2e-4)
    assert not (tmp_path / "never").exists()


def test_run_lowers_the_loss_and_keeps_the_selected_z(tmp_path, tiny_llama_dir, capsys):
    config = tmp_path / "space.yaml"
    config.write_text(json.dumps(SPACE))  # YAML is a superset of JSON

    def args(out, *extra):
        options = ["--steps", "6", "--eval-every", "3", "--lr", "0.05", "--calibrate"]
        return cli_args(
            tiny_llama_dir, "subspace-gradient", out, "--config", config, *options, *extra
        )

    out = tmp_path / "run"
    assert main(args(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "subspace-gradient" and results["evaluations"] == 6
    assert results["train_loss"]["last"] < results["train_loss"]["first"]
    assert results["subspace_parameters"] == 3 * 8  # tiny Llama: 3 layers x d = 8
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    devs = [x for x in lines if x["kind"] == "dev"]
    assert [x["step"] for x in devs] == [0, 3, 6]
    assert devs[0]["dev"] == pytest.approx(results["calibrated_zero_shot"]["dev"], abs=1e-6)
    z = load_file(str(out / "z.safetensors"))["z"]
    assert z.shape == (3, 8)
    assert (float(z.norm()) == 0.0) == (results["best_dev_step"] == 0)
    assert results["z_norm"] == pytest.approx(float(z.double().norm()), rel=1e-6)
    assert "best dev at step" in capsys.readouterr().out

    final = tmp_path / "final"
    assert main(args(final, "--select", "final")) == 0
    kept = json.loads((final / "results.json").read_text())
    assert kept["best_dev_step"] == 6  # the last state, whatever dev says
    assert kept["tuned"]["dev"] == devs[-1]["dev"]  # the same run, the same last state


def test_a_non_lora_space_trains_through_the_cli(tmp_path, tiny_llama_dir):
    """`--space series`: the adapters' z is trained and kept, as LoRA's is."""
    config = tmp_path / "series.yaml"
    config.write_text(json.dumps(SPACES["series"]))
    out = tmp_path / "run"
    options = ["--steps", "4", "--eval-every", "2", "--lr", "0.05", "--select", "final"]
    args = cli_args(tiny_llama_dir, "subspace-gradient", out, "--config", config, *options)
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["train_loss"]["last"] < results["train_loss"]["first"]
    z = load_file(str(out / "z.safetensors"))["z"]
    assert z.shape == (3, 8) and float(z.norm()) > 0
