"""`ServerOptions.compile`: the layers' per-token children compiled give the eager numbers.

Three families cover the shapes of a layer: Llama (RMSNorm children, gated MLP), GPT-2
(LayerNorm children, Conv1D MLP) and RoBERTa (the intermediate and output blocks, the
output's LayerNorm after the residual). Each compile takes seconds, so not all 13 tiny
architectures run here; the eager path's exactness is tested on all of them elsewhere.
fp32 tolerance: the exactness tests' RTOL (1e-4); inductor reorders the norms' reductions,
which moves the losses by about 1e-5 of their scale after three layers with large deltas.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dfo_lora.backbone.fusion import _EAGER
from dfo_lora.bench import NaiveScorer, count_round_flops, plain_model_copy
from dfo_lora.cli import main
from dfo_lora.server import EvaluationServer, ServerOptions
from dfo_lora.server.factory import ServerSpec
from dfo_lora.spaces.lora import LoraConfig
from dfo_lora.synthetic import synthetic_server
from tests.test_server_exactness import RTOL, VERBALIZER, rel_err
from tests.tiny_models import random_examples, tiny_model

COMPILED_CHILDREN = {
    "llama": {"input_layernorm", "post_attention_layernorm", "mlp"},
    "gpt2": {"ln_1", "ln_2", "mlp"},
    "roberta": {"intermediate", "output"},
}


def build(backbone, compiled: bool, targets=("q", "k")) -> EvaluationServer:
    splits = {
        "train": random_examples(backbone, 10, seed=1),
        "dev": random_examples(backbone, 7, seed=2),
    }
    space = LoraConfig(targets=targets, rank=4, intrinsic_dim=40, alpha=3.0, seed=3)
    options = ServerOptions(compile=compiled)
    return EvaluationServer(backbone, splits, VERBALIZER, space=space, options=options)


def compiled_children(server: EvaluationServer) -> list[set[str]]:
    return [
        {name for name, child in layer.named_children() if _EAGER in child.__dict__}
        for layer in server.layers
    ]


def run(server: EvaluationServer) -> np.ndarray:
    """Scores above and below a commit (the cache rebuilt), and the dev split's logits."""
    rng = np.random.default_rng(5)
    server.commit(0, rng.normal(size=server.dim))
    cands = rng.normal(size=(4, server.dim))
    first = server.score(2, cands)["loss"]
    server.commit(1, rng.normal(size=server.dim))
    second = server.score(0, cands)["loss"]
    logits = server.predict("dev")["logits"].ravel()
    return np.concatenate([first, second, logits])


@pytest.mark.parametrize("arch", list(COMPILED_CHILDREN))
def test_compiled_layers_score_as_eager(arch):
    eager = run(build(tiny_model(arch), compiled=False))
    server = build(tiny_model(arch), compiled=True)
    assert compiled_children(server) == [COMPILED_CHILDREN[arch]] * server.num_layers
    assert rel_err(run(server), eager) <= RTOL


def test_a_child_holding_a_searched_module_stays_eager():
    """With the MLP's down projection searched, the MLP is left eager (its candidates
    change between calls); the norms are still compiled and the numbers still agree."""
    targets = ("q", "down")
    eager = run(build(tiny_model("llama"), compiled=False, targets=targets))
    server = build(tiny_model("llama"), compiled=True, targets=targets)
    assert compiled_children(server) == [{"input_layernorm", "post_attention_layernorm"}] * 3
    assert rel_err(run(server), eager) <= RTOL


def test_a_reused_backbone_comes_back_eager():
    """A server without compile on a backbone a compiled server used runs it eager again."""
    backbone = tiny_model("llama")
    build(backbone, compiled=True)
    server = build(backbone, compiled=False)
    assert compiled_children(server) == [set()] * server.num_layers
    assert all("forward" not in child.__dict__ for child in server.model.modules())
    assert rel_err(run(server), run(build(tiny_model("llama"), compiled=False))) <= 1e-6


def test_bench_times_the_compile_apart_and_keeps_its_references_eager(capsys):
    """`bench --compile`: the compile is timed apart (and in the projected run), the naive
    loop's model copy runs eager with its own weights, and the FLOPs are counted eager."""
    argv = ["bench", "--synthetic", "tiny-llama", "--device", "cpu", "--dtype", "fp32"]
    assert main([*argv, "--popsize", "4", "--compile", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["compile"] is True and result["compile_s"] > 0
    assert result["projected_8000_evals_s"] == pytest.approx(
        result["maps_setup_s"] + result["compile_s"] + 8000 / result["evals_per_s"]
    )

    def server(compiled: bool):
        spec = ServerSpec(dtype="fp32", device="cpu", options=ServerOptions(compile=compiled))
        return synthetic_server("tiny-llama", spec)

    compiled, plain = server(True), server(False)
    net = plain_model_copy(compiled)
    assert not any(_EAGER in m.__dict__ or "forward" in m.__dict__ for m in net.modules())
    z = np.random.default_rng(0).normal(size=(1, compiled.dim))
    naive = NaiveScorer(compiled, net).score(1, z[0])
    assert naive == pytest.approx(compiled.score(1, z)["loss"][0], rel=RTOL)
    flops = [count_round_flops(s, 4, np.random.default_rng(1)) for s in (compiled, plain)]
    assert flops[0] == flops[1]
