"""`mezo`: MeZO on any space, its own weights or its projected z, through one loop.

`mezo --on weights --space lora` must do what peft's `mezo-lora` does: from the same
initial A and the same seeds, the same losses step by step within fp32 rounding. With
`--on z`, each step's L+ is the server's own score of z + eps u. Tiny random Llama, real
SmolLM2 tokenizer, real sst2 data, fp32.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dfo_lora.baselines import get_method
from dfo_lora.baselines.gradient import initial_parameters, install, snapshot, tensors
from dfo_lora.baselines.lora import add_lora
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.training import mezo_seeds, perturb, train_mezo
from dfo_lora.cli import main
from dfo_lora.search.checkpoint import load_state, save_state
from dfo_lora.search.run import CHECKPOINT, hardware
from tests.test_baselines import cli_args, one_line_error, read, tiny
from tests.test_search import _kill_mid_search

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


# ---------------------------------------------------------------- checkpoint and resume
RESUME_STEPS = ["--steps", "120", "--lr", "1e-2"]


def _strip_time(log: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(x).items() if k != "time_s"}
        for x in log.read_text().splitlines()
    ]


def _assert_same_run(whole: Path, killed: Path, weights: str, trained: slice) -> None:
    """Results, kept weights, final tensors and log equal; `trained` picks the final
    tensors that start at zero (LoRA's B, or z), so the run is seen to have moved them."""
    a, b = json.loads((whole / "results.json").read_text()), read(killed)
    for key in ("tuned", "zero_shot", "calibrated_zero_shot", "best_dev_step", "best_dev_evals"):
        assert a[key] == b[key], key
    assert a["train_loss"] == b["train_loss"] and a["skipped_steps"] == b["skipped_steps"]
    assert a["machines"] == b["machines"] == [hardware()]  # resumed on the same machine
    wa, wb = load_file(str(whole / weights)), load_file(str(killed / weights))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    final_a = load_state(whole / CHECKPOINT)["tensors"]
    final_b = load_state(killed / CHECKPOINT)["tensors"]
    assert all(np.array_equal(x, y) for x, y in zip(final_a, final_b, strict=True))
    assert all(np.abs(x).max() > 0 for x in final_a[trained])
    assert _strip_time(whole / "log.jsonl") == _strip_time(killed / "log.jsonl")


@pytest.mark.parametrize(
    ("method", "extra", "weights", "trained", "eval_every", "kill_after_lines"),
    [
        # killed some checks in; (A, B) per module, B starts at zero
        ("mezo-lora", [], "lora.safetensors", slice(1, None, 2), 6, 30),
        # killed before the first check after step 0: resumed from the step-0 checkpoint
        ("mezo", ["--on", "z"], "z.safetensors", slice(None), 60, 1),
    ],
    ids=["mezo-lora-mid-run", "mezo-on-z-from-step-0"],
)
def test_mezo_resume_after_sigkill_equals_uninterrupted_run(
    tiny_llama_dir, tmp_path, method, extra, weights, trained, eval_every, kill_after_lines
):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = [*RESUME_STEPS, "--eval-every", eval_every, *extra]
    assert main(cli_args(tiny_llama_dir, method, whole, *args)) == 0
    run = cli_args(tiny_llama_dir, method, killed, *args)
    _kill_mid_search(run, killed, min_lines=kill_after_lines)
    assert not (killed / "results.json").exists()  # really killed mid-run
    stopped_at = load_state(killed / CHECKPOINT)["step"]
    if kill_after_lines == 1:
        assert stopped_at == 0
    else:
        assert 0 < stopped_at < 120
    assert main(["baseline", "--resume", str(killed), "--quiet"]) == 0
    _assert_same_run(whole, killed, weights, trained)


def test_a_sweep_resumes_a_killed_mezo_cell(tiny_llama_dir, tmp_path):
    from dfo_lora.sweep import run_sweep

    sweep = tmp_path / "sweep.yaml"
    options = {"steps": 120, "eval_every": 6, "lr": 1e-2}
    spec = {
        "out": str(tmp_path / "killed"),
        "concurrency": 1,
        "grid": {"method": ["mezo-lora"]},
        "config": {
            "model": str(tiny_llama_dir),
            "test_limit": 24,
            "dtype": "fp32",
            "backend": "local",
            "baseline": {"mezo-lora": options},
        },
    }
    sweep.write_text(yaml.safe_dump(spec))
    assert run_sweep(sweep, out=tmp_path / "whole", echo=lambda *_: None)["done"] == 1
    cell = tmp_path / "killed" / "method=mezo-lora"
    _kill_mid_search(["sweep", sweep], cell, min_lines=30)  # past the step-6 checkpoint
    assert not (cell / "results.json").exists()
    said: list[str] = []
    summary = run_sweep(sweep, echo=said.append)
    assert summary["done"] == 1 and "sweep: method=mezo-lora: resuming" in said
    whole = tmp_path / "whole" / "method=mezo-lora"
    _assert_same_run(whole, cell, "lora.safetensors", slice(1, None, 2))


def test_resume_errors_are_one_line(tiny_llama_dir, tmp_path, capsys):
    grad = tmp_path / "grad"
    assert main(cli_args(tiny_llama_dir, "gradient-lora", grad, "--steps", "2")) == 0
    capsys.readouterr()
    line = one_line_error(capsys, main(["baseline", "--resume", str(grad)]))
    assert "gradient-lora does not checkpoint" in line

    run = tmp_path / "mezo"
    assert (
        main(cli_args(tiny_llama_dir, "mezo-lora", run, "--steps", "4", "--eval-every", "2")) == 0
    )
    capsys.readouterr()
    line = one_line_error(capsys, main(["baseline", "--resume", str(run), "--lr", "1"]))
    assert "--lr cannot be given" in line
    line = one_line_error(capsys, main(["baseline", "gradient-lora", "--resume", str(run)]))
    assert "holds a mezo-lora run, not gradient-lora" in line
    line = one_line_error(capsys, main(["baseline", "--resume", str(tmp_path / "none")]))
    assert "baseline.yaml does not exist" in line

    temp = run / ".results.json.1a2b3c"  # a killed write's temporary file
    temp.write_text("{")
    assert main(["baseline", "--resume", str(run), "--quiet"]) == 0  # a finished run: again
    assert not temp.exists() and read(run)["steps"] == 4
    capsys.readouterr()

    log = (run / "log.jsonl").read_text()
    (run / "log.jsonl").write_text(log.splitlines(keepends=True)[0])
    line = one_line_error(capsys, main(["baseline", "--resume", str(run)]))
    assert "log.jsonl: 1 lines, but the checkpoint counts" in line
    (run / "log.jsonl").write_text(log)
    state = load_state(run / CHECKPOINT)
    del state["selection"]["best_step"]
    save_state(run / CHECKPOINT, state)
    line = one_line_error(capsys, main(["baseline", "--resume", str(run)]))
    assert "no 'selection.best_step' entry" in line

    saved = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(saved.replace("seed: 42", "seed: 7"))
    line = one_line_error(capsys, main(["baseline", "--resume", str(run)]))
    assert "config differs" in line and "seed" in line
    (run / "config.yaml").write_text(saved)
    (run / CHECKPOINT).unlink()
    line = one_line_error(capsys, main(["baseline", "--resume", str(run)]))
    assert "never checkpointed" in line
