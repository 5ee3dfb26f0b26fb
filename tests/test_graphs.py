"""Replayed layer graphs (`cuda_graphs`) give the eager server's scores.

On a CPU the graphs are the "snapshot" stand-in (server/graphs.py): each captured layer
is a frozen copy, so a replay computes with the weights of its capture, as a CUDA graph
does. The scores must equal the eager ones through a bottom-up round of commits, and a
server that forgot to drop a changed layer's graphs must show it. On CUDA (when present)
the real graphs are checked against eager within bf16 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfo_lora.errors import UserError
from dfo_lora.server import EvaluationServer, ServerOptions
from dfo_lora.server.graphs import LayerGraphs, pad_weights, padded_rows
from dfo_lora.spaces import DeepPromptConfig, HydraConfig, LoraConfig, SeriesConfig
from tests.tiny_models import ARCHS, DEVICE, random_examples, tiny_model

VERBALIZER = [7, 11, 13]


def servers(arch, space, graphs="snapshot", dtype=torch.float32):
    """An eager server and a graphed one on the same model, data and space (on DEVICE);
    a prompt space's prompt in front of every example, as the prompt once per candidate
    (`shared_prefix`) runs before graphs."""
    made = []
    for graphed in (False, graphs):
        options = ServerOptions(cuda_graphs=graphed, shared_prefix=False)
        backbone = tiny_model(arch, 0, dtype)
        splits = {
            "train": random_examples(backbone, 10, seed=1),
            "dev": random_examples(backbone, 5, seed=2),
        }
        made.append(EvaluationServer(backbone, splits, VERBALIZER, space=space, options=options))
    return made


def lora():
    return LoraConfig(targets=("q", "v"), rank=4, intrinsic_dim=24, alpha=3.0, seed=3)


def bottom_up_round(eager, graphed, popsize, rng, exact=True):
    """Score and commit every layer bottom-up on both servers; the scores must agree."""
    for layer in range(eager.num_layers):
        cands = rng.normal(size=(popsize, eager.dim))
        want, got = eager.score(layer, cands), graphed.score(layer, cands)
        for key in ("loss", "accuracy"):
            if exact:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} {layer}")
            else:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
        best = cands[int(np.argmin(want["loss"]))]
        eager.commit(layer, best)
        graphed.commit(layer, best)


@pytest.mark.parametrize("arch", ARCHS)
def test_graphed_scores_equal_eager_through_rounds_of_commits(arch):
    eager, graphed = servers(arch, lora())
    rng = np.random.default_rng(0)
    for _ in range(2):  # the second round replays graphs captured after the first's commits
        bottom_up_round(eager, graphed, 8, rng)
    assert graphed.graphs.captures > 0 and graphed.graphs.replays > graphed.graphs.captures
    evaluated = graphed.evaluate("dev"), eager.evaluate("dev")
    assert evaluated[0] == evaluated[1]


@pytest.mark.parametrize(
    "space",
    [
        HydraConfig(targets=("q", "v"), rank=2, heads=2, intrinsic_dim=24, seed=1),
        SeriesConfig(targets=("o",), size=4, intrinsic_dim=16, seed=1),
        DeepPromptConfig(length=3, intrinsic_dim=16, seed=1),
    ],
    ids=["hydra", "series", "deep-prompt"],
)
def test_other_spaces_through_graphs_equal_eager(space):
    eager, graphed = servers("llama", space)
    bottom_up_round(eager, graphed, 4, np.random.default_rng(1))
    assert graphed.graphs.replays > 0


def test_populations_of_other_sizes_are_padded_to_a_few_shapes():
    """6 and 7 candidates run as 8 (the padded ones dropped), 20 as 20: the scores stay
    the eager ones within rounding (a padded batch may take other matmul blocking)."""
    assert [padded_rows(n, 4, 100) for n in (1, 4, 6, 7, 20, 21)] == [4, 4, 8, 8, 20, 24]
    assert padded_rows(7, 4, 6) == 7 and padded_rows(5, 4, 6) == 6  # never above the chunk
    weights = {"a": (torch.arange(6.0).view(3, 2),)}
    padded = pad_weights(weights, 5)["a"][0]
    assert padded.shape == (5, 2) and torch.equal(padded[3], padded[2])
    eager, graphed = servers("llama", lora())
    rng = np.random.default_rng(2)
    shapes = set()
    for popsize in (6, 7, 6):
        cands = rng.normal(size=(popsize, eager.dim))
        want, got = eager.score(1, cands), graphed.score(1, cands)
        assert got["loss"].shape == (popsize,)
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        shapes |= {k[1] for k in graphed.graphs._graphs}
    assert {rows for _, rows in shapes} == {8}  # 6 and 7 share the captured shape of 8


def test_a_graph_not_dropped_after_a_commit_is_stale():
    """What the invalidation is for: with it switched off, scoring layer 0 after a commit
    at layer 2 replays layer 2 with its old weights and the scores differ."""
    eager, graphed = servers("llama", lora())
    rng = np.random.default_rng(3)
    cands = rng.normal(size=(4, eager.dim))
    np.testing.assert_array_equal(graphed.score(0, cands)["loss"], eager.score(0, cands)["loss"])
    graphed.graphs.invalidate = lambda index=None: None
    z = rng.normal(size=eager.dim)
    eager.commit(2, z)
    graphed.commit(2, z)
    stale, fresh = graphed.score(0, cands)["loss"], eager.score(0, cands)["loss"]
    assert not np.allclose(stale, fresh, rtol=1e-6)


def test_bad_graph_options_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^cuda_graphs: needs a CUDA device, the model is on cpu"):
        LayerGraphs("cuda", torch.device("cpu"))
    with pytest.raises(UserError, match=r"^cuda_graphs and compile: choose one"):
        ServerOptions(cuda_graphs=True, compile=True).validate()
    with pytest.raises(UserError, match=r"^cuda_graphs: 'yes' is not true or false"):
        ServerOptions(cuda_graphs="yes").validate()
    if DEVICE.type == "cpu":
        with pytest.raises(UserError, match="needs a CUDA device"):
            servers("llama", lora(), graphs=True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graphs_equal_eager_on_the_gpu(arch):
    eager, graphed = servers(arch, lora(), graphs=True, dtype=torch.bfloat16)
    bottom_up_round(eager, graphed, 8, np.random.default_rng(4), exact=False)
    assert graphed.graphs.captures > 0
