"""`dfo-lora bench --synthetic`: real shapes with random weights, the GPU script on a CPU,
and the chunk size chosen for the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfo_lora.bench import (
    NaiveScorer,
    _count_round_flops,
    count_round_flops,
    eager_attention,
    interleaved_round,
    peak_memory,
    plain_model_copy,
)
from dfo_lora.cli import main
from dfo_lora.config import load_config
from dfo_lora.errors import UserError
from dfo_lora.server import ServerOptions
from dfo_lora.server.factory import ServerSpec
from dfo_lora.server.server import CPU_CHUNK_TOKENS
from dfo_lora.synthetic import (
    SHAPES,
    parameter_count,
    shape_config,
    synthetic_examples,
    synthetic_server,
)
from tests.test_cli import one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_bench_reports_every_figure(capsys):
    argv = ["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--dtype", "fp32"]
    assert main([*argv, "--popsize", "6", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "synthetic:tiny-llama"
    assert result["task"].startswith("synthetic N=32 C=2")
    assert (result["n_train"], result["num_layers"], result["dtype"]) == (32, 3, "fp32")
    assert result["evaluations"] == 6 * 3
    assert result["evals_per_s"] > 0 and result["naive_evals_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["evals_per_s"] / result["naive_evals_per_s"])
    assert result["projected_8000_evals_s"] == pytest.approx(
        result["maps_setup_s"] + 8000 / result["evals_per_s"]
    )
    assert result["chunk_tokens"] == CPU_CHUNK_TOKENS  # auto on a CPU
    assert result["round_flops"] > 0 and result["flops_counted_with"] == "sdpa"
    peaks = result["matmul_peak_flops_per_s"]
    assert result["peak_sampled_with_round"] == "fp32" and peaks["bf16"] > 0
    assert result["peak_fraction"] == pytest.approx(result["achieved_flops_per_s"] / peaks["fp32"])
    assert result["gradient_step_peak_mem_bytes"] > 0  # peft is in the dev extra
    assert result["gradient_step_error"] is None
    assert result["train_tokens"] <= result["train_padded_tokens"]


def test_bench_in_bf16_mixed_names_it_and_takes_the_bf16_peak(capsys):
    """bf16-mixed runs its matmuls in bf16: its fraction is of the bf16 peak."""
    argv = ["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--dtype", "bf16-mixed"]
    assert main([*argv, "--popsize", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "bf16-mixed" and result["peak_sampled_with_round"] == "bf16"
    peaks = result["matmul_peak_flops_per_s"]
    assert result["peak_fraction"] == pytest.approx(result["achieved_flops_per_s"] / peaks["bf16"])
    assert result["evals_per_s"] > 0 and result["naive_evals_per_s"] > 0


def test_synthetic_bench_text_report(capsys):
    assert main(["bench", "--synthetic", "tiny-roberta", "--popsize", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model synthetic:tiny-roberta" in out
    assert "speedup:" in out and "8000 evaluations" in out and "gradient-LoRA step" in out


def test_synthetic_bad_input_is_one_line():
    line = one_line_error(run_cli("bench", "--synthetic", "gpt5"))
    assert "unknown shape 'gpt5'" in line and "roberta-large" in line and "llama-1b" in line
    line = one_line_error(run_cli("bench", "--synthetic", "smollm2-135m", "--max-memory", "0.1"))
    assert "needs about" in line and "0.1 GiB is available" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_gpu_is_one_line():
    line = one_line_error(run_cli("bench", "--synthetic", "tiny-llama", "--device", "cuda"))
    assert "no CUDA device" in line


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("roberta-large", 355e6),  # RoBERTa-large's published size
        ("gpt2-large", 774e6),
        ("gpt2-xl", 1558e6),
        ("llama-1b", 1236e6),  # Llama-3.2-1B (tied embeddings)
        ("smollm2-135m", 134.5e6),
    ],
)
def test_shapes_have_the_real_models_sizes(name, params):
    assert parameter_count(shape_config(name)) == pytest.approx(params, rel=0.01)


def test_every_shape_builds_a_config():
    for name in SHAPES:
        assert shape_config(name).model_type in ("llama", "gpt2", "roberta")


def test_synthetic_examples_follow_the_length_law():
    examples = synthetic_examples(1000, causal=True, examples=2000, classes=3, median_tokens=20)
    lengths = np.array([len(ex.input_ids) for ex in examples])
    assert abs(np.median(lengths) - 20) <= 1
    assert lengths.min() >= 4 and lengths.max() <= 160
    assert [ex.label for ex in examples[:6]] == [0, 1, 2, 0, 1, 2]
    assert all(ex.slot == len(ex.input_ids) - 1 for ex in examples)
    masked = synthetic_examples(1000, causal=False, examples=5)
    assert all(ex.slot == len(ex.input_ids) - 2 for ex in masked)
    again = synthetic_examples(1000, causal=False, examples=5)
    assert [ex.input_ids for ex in again] == [ex.input_ids for ex in masked]  # seeded
    with pytest.raises(UserError):
        synthetic_examples(1000, causal=True, classes=1)


def test_eager_flop_count_is_close_to_sdpa_and_restores_the_model():
    """The fallback for torch releases that cannot count grouped-query sdpa."""
    server = synthetic_server("tiny-llama", ServerSpec(dtype="fp32", device="cpu"))
    flops, how = count_round_flops(server, 4, np.random.default_rng(0))
    assert how == "sdpa"
    with eager_attention(server.model):
        assert server.model.config._attn_implementation == "eager"
        eager = _count_round_flops(server, 4, np.random.default_rng(0))
    assert server.model.config._attn_implementation == "sdpa"
    assert flops <= eager <= 1.15 * flops  # eager also counts the masked causal half


def test_interleaved_round_commits_what_a_plain_round_commits():
    """The naive samples between the server's layers neither draw from the server's
    candidates nor change what it commits."""
    spec = ServerSpec(dtype="fp32", device="cpu")
    server = synthetic_server("tiny-llama", spec)
    naive = NaiveScorer(server, plain_model_copy(server))
    times = interleaved_round(server, naive, 5, 2, seed=3, scale=0.5)
    layers = server.num_layers
    assert (times.evals, times.naive_evals) == (5 * layers, 2 * layers)
    assert times.seconds > 0 and times.naive_seconds > 0

    plain = synthetic_server("tiny-llama", spec)
    rng = np.random.default_rng(3)
    for layer in range(layers):
        cands = rng.normal(scale=0.5, size=(5, plain.dim))
        plain.commit(layer, cands[int(np.argmin(plain.score(layer, cands)["loss"]))])
    assert np.abs(plain.get_state()).max() > 0
    np.testing.assert_array_equal(server.get_state(), plain.get_state())


def test_peak_memory_counts_memory_an_earlier_block_freed():
    """Without trimming the heap first, a block that reuses freed pages reads near zero."""
    cpu = torch.device("cpu")
    for _ in range(3):  # glibc's mmap threshold rises to 16 MiB: such blocks stay on the heap
        freed = torch.ones(16 * 2**20, dtype=torch.uint8)
        del freed
    with peak_memory(cpu) as mem:
        block = torch.ones(16 * 2**20, dtype=torch.uint8)
        assert int(block[-1]) == 1
    assert mem.bytes >= 12 * 2**20


def test_naive_per_layer_below_one_is_one_line():
    line = one_line_error(run_cli("bench", "--synthetic", "tiny-llama", "--naive-per-layer", "0"))
    assert "--naive-per-layer" in line


def test_max_tokens_auto_and_explicit():
    assert load_config(None, {"max_tokens": "auto"}).max_tokens is None
    assert load_config(None, {"max_tokens": "none"}).max_tokens is None
    assert load_config(None, {"max_tokens": 64}).max_tokens == 64
    with pytest.raises(UserError, match="max_tokens"):
        load_config(None, {"max_tokens": 0})
    spec = ServerSpec(dtype="fp32", device="cpu")
    assert synthetic_server("tiny-llama", spec).chunk_tokens == CPU_CHUNK_TOKENS
    small = ServerSpec(dtype="fp32", device="cpu", options=ServerOptions(max_tokens=64))
    assert synthetic_server("tiny-llama", small).chunk_tokens == 64


def test_gpu_script_runs_on_a_cpu(tmp_path):
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SHAPES": "tiny-llama nope",
        "PYTHON": sys.executable,
        "BENCH_ARGS": "--popsize 4 --dtype fp32",
        "COMPILE_SHAPES": "tiny-llama",
        "GRAPH_SHAPES": "tiny-llama",  # CUDA graphs on a CPU: a clear error, the others kept
    }
    done = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_bench.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["gpu"] is None and report["machine"]["torch"] == torch.__version__
    good, bad, compiled, graphed = report["results"]
    assert good["model"] == "synthetic:tiny-llama" and good["device"] == "cpu"
    assert good["evaluations"] == 4 * 3 and good["dtype"] == "fp32"
    assert (good["compile"], compiled["compile"]) == (False, True)
    assert compiled["model"] == good["model"] and compiled["compile_s"] > 0
    assert bad == {"model": "synthetic:nope", "error": "failed or timed out (stderr above)"}
    assert "unknown shape 'nope'" in done.stderr
    assert "synthetic:tiny-llama " in done.stdout
    assert "synthetic:tiny-llama --compile" in done.stdout
    assert graphed["error"] == "failed or timed out (stderr above)"
    assert "cuda_graphs: needs a CUDA device" in done.stderr
