"""The last layer at the slot positions only gives the full layer's numbers there."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers.pytorch_utils import Conv1D

from dfo_lora.server import ServerOptions
from dfo_lora.server.batching import make_buckets
from tests.test_server_exactness import RTOL, make_server, reference_losses, rel_err
from tests.tiny_models import ARCHS, DEVICE, PAD, random_examples, tiny_model

DTYPES = [torch.float32, torch.bfloat16]
# bf16: the slot rows go through matmuls of another shape than in the full layer, so
# their sums may round differently: a few bf16 ulps (2^-8) of the output's scale.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_at_slots_equals_full_layer_at_slots(arch, dtype):
    """Every layer of every family, run at the slots only, equals the full layer's output
    read at the slots (random slots: masked LMs' slots are mid-sequence)."""
    backbone = tiny_model(arch, 0, dtype)
    examples = random_examples(backbone, 9, seed=4)
    arch_entry, model = backbone.arch, backbone.model
    for bucket in make_buckets(examples, PAD, DEVICE, call_cost=0, max_groups=3):
        with torch.inference_mode():
            hidden, inputs = arch_entry.enter(model, bucket.input_ids, bucket.attention_mask)
            rows = torch.arange(bucket.size, device=DEVICE)
            for layer in arch_entry.layers(model):
                full = arch_entry.run_layer(layer, hidden, inputs)
                with _rows_seen_after_attention(arch_entry, model, layer) as seen:
                    got = arch_entry.run_layer_at_slots(model, layer, hidden, inputs, bucket.slots)
                assert seen and set(seen) == {bucket.size}  # the MLP ran at the slots only
                assert got.shape == (bucket.size, full.shape[-1])
                want = full[rows, bucket.slots]
                assert rel_err(got.float().cpu(), want.float().cpu()) <= TOLERANCE[dtype]
                hidden = full


@contextmanager
def _rows_seen_after_attention(arch_entry, model, layer):
    """Rows (tokens) each linear module (GPT-2: Conv1D) outside the layer's attention is called on."""
    attention = layer.get_submodule(arch_entry.attention_path(model))
    inside = {id(m) for m in attention.modules()}
    seen: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: seen.append(args[0][..., 0].numel()))
        for m in layer.modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and id(m) not in inside
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_the_last_layer_with_every_projection(arch):
    """Candidates on every projection of the last layer (q..o, the MLP's: the ones that
    now see the slot rows only) score as the merged HF forward, and as the full layer."""
    backbone = tiny_model(arch)
    targets = tuple(backbone.arch.projections(backbone.model))
    cands = np.random.default_rng(7).normal(size=(4, 40))
    got = {}
    for slot_only in (True, False):
        options = ServerOptions(slot_only_last_layer=slot_only)
        server, splits = make_server(arch, targets, options=options)
        server.commit(0, np.random.default_rng(8).normal(size=server.dim))
        got[slot_only] = server.score(server.num_layers - 1, cands)["loss"]
    want = reference_losses(server, server.get_state(), 2, cands, splits["train"])
    assert rel_err(got[True], want) <= RTOL, (got[True], want)
    assert rel_err(got[True], got[False]) <= 1e-5
    assert np.ptp(got[True]) > 1e-4  # the candidates really differ


@pytest.mark.parametrize("arch", ARCHS)
def test_slot_only_in_bf16_equals_the_full_last_layer(arch):
    """bf16 (`--dtype auto` on AMX CPUs): scores and predictions with the slot-only last
    layer are those of the full last layer up to bf16 rounding."""
    backbone = tiny_model(arch)
    targets = tuple(backbone.arch.projections(backbone.model))
    rng = np.random.default_rng(9)
    commits, cands = rng.normal(size=(3, 40)), rng.normal(size=(4, 40))
    scores, logits = {}, {}
    for slot_only in (True, False):
        options = ServerOptions(slot_only_last_layer=slot_only)
        server, _ = make_server(arch, targets, options=options, dtype=torch.bfloat16)
        server.commit(0, commits[0])
        server.commit(1, commits[1])
        scores[slot_only] = np.concatenate(
            [server.score(2, cands)["loss"], server.score(1, cands)["loss"]]
        )
        server.commit(2, commits[2])
        logits[slot_only] = server.predict("dev")["logits"]
    assert rel_err(scores[True], scores[False]) <= 2e-2, scores
    assert rel_err(logits[True], logits[False]) <= 2e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_finer_train_buckets_score_as_coarse_ones(arch):
    """The train split's finer buckets (less padding for the P-stacked scoring) give the
    scores of the coarse ones, and pad no more."""
    rng = np.random.default_rng(10)
    commit, cands = rng.normal(size=40), rng.normal(size=(4, 40))
    got, padded = {}, {}
    for cost in (None, 64):
        options = ServerOptions(train_bucket_call_cost=cost)
        server, _ = make_server(arch, options=options, n_train=16)
        server.commit(0, commit)
        got[cost] = server.score(1, cands)["loss"]
        padded[cost] = server.info()["train_padded_tokens"]
    assert rel_err(got[None], got[64]) <= 1e-5
    if DEVICE.type == "cpu":
        assert padded[None] < padded[64]


def test_the_train_call_cost_knows_the_device():
    """Cut finer on a CPU (FLOPs dominate), coarser on CUDA (calls dominate); an explicit
    cost wins on both."""
    from dfo_lora.server.server import (
        TRAIN_CPU_BUCKET_CALL_COST,
        TRAIN_CUDA_BUCKET_CALL_COST,
        train_call_cost,
    )

    auto, given = ServerOptions(), ServerOptions(train_bucket_call_cost=16)
    assert train_call_cost(auto, torch.device("cpu")) == TRAIN_CPU_BUCKET_CALL_COST == 4
    assert train_call_cost(auto, torch.device("cuda")) == TRAIN_CUDA_BUCKET_CALL_COST == 128
    assert train_call_cost(given, torch.device("cuda")) == 16
    assert train_call_cost(given, torch.device("cpu")) == 16
