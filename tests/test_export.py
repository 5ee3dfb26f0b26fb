"""`dfo-lora export`: the PEFT adapter and the merged model give the in-tool logits, on
tiny models of every architecture and on a real tuning run; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from dfo_lora.bench import plain_model_copy
from dfo_lora.config import TuneConfig
from dfo_lora.export import merge_into, save_peft
from dfo_lora.search.run import tune
from dfo_lora.search.tuned import factor_tensors, read_factors
from dfo_lora.server.factory import build_server
from tests.test_cli import one_line_error, run_cli
from tests.test_server_exactness import ARCHS, VERBALIZER, make_server, rel_err
from tests.tiny_models import hf_logits

# q and v share GPT-2's fused c_attn: its LoRA must touch only their slices.
TARGETS = ("q", "v", "o")


def tuned_server(arch):
    server, splits = make_server(arch, TARGETS)
    rng = np.random.default_rng(7)
    for layer in (0, 2):
        server.commit(layer, rng.normal(size=server.dim))
    factors = read_factors(factor_tensors(server.state_factors(server.get_state()), "best"), "best")
    assert sorted(factors) == [(layer, t) for layer in (0, 2) for t in sorted(TARGETS)]
    return server, splits, factors


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_gives_the_in_tool_logits(arch, tmp_path):
    import peft

    server, splits, factors = tuned_server(arch)
    save_peft(plain_model_copy(server), server.arch, factors, 4, tmp_path, "tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4  # scaling 1
    model = peft.PeftModel.from_pretrained(plain_model_copy(server), tmp_path)
    got = hf_logits(model, splits["dev"], VERBALIZER)
    want = server.predict("dev")["logits"]
    assert rel_err(got.numpy(), want) <= 1e-4
    assert rel_err(hf_logits(plain_model_copy(server), splits["dev"], VERBALIZER), want) > 1e-3


def test_zero_state_exports_an_adapter_that_changes_nothing(tmp_path):
    import peft

    from dfo_lora.export import zero_factors

    server, splits = make_server("gpt2", TARGETS)
    plain = plain_model_copy(server)
    save_peft(plain, server.arch, zero_factors(plain, server.arch, TARGETS, 4), 4, tmp_path, "t")
    model = peft.PeftModel.from_pretrained(plain_model_copy(server), tmp_path)
    got = hf_logits(model, splits["dev"], VERBALIZER)
    assert rel_err(got.numpy(), server.predict("dev")["logits"]) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_gives_the_in_tool_logits(arch, tmp_path):
    server, splits, factors = tuned_server(arch)
    merged = plain_model_copy(server)
    merge_into(merged, server.arch, factors)
    merged.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if server.backbone.causal else AutoModelForMaskedLM
    loaded = auto.from_pretrained(tmp_path).to(server.backbone.device)
    got = hf_logits(loaded, splits["dev"], VERBALIZER)
    assert rel_err(got.numpy(), server.predict("dev")["logits"]) <= 1e-4


def exported_logits(model, server, split: str) -> np.ndarray:
    """A stock HF forward of the server's encoded split, verbalizer logits at the slots."""
    logits = np.zeros((server.split_sizes[split], len(server.verbalizer)), dtype=np.float32)
    with torch.no_grad():
        for bucket in server.buckets[split]:
            out = model(input_ids=bucket.input_ids, attention_mask=bucket.attention_mask).logits
            rows = out[torch.arange(bucket.size), bucket.slots][:, server.verbalizer]
            logits[bucket.order] = rows.float().numpy()
    return logits


@pytest.fixture(scope="module")
def tuned_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    config = TuneConfig(
        model=str(tiny_llama_dir),
        task="sst2",
        test_limit=30,
        popsize=6,
        budget=36,
        intrinsic_dim=40,
        targets=["q", "v"],
        dtype="fp32",
        select="final",  # a changed state for certain (tiny runs often keep z = 0 on dev)
    ).validate()
    tune(config, out, progress=False)
    return out, config


@pytest.mark.parametrize("state", ["best", "final"])
def test_exported_run_equals_the_tool(tuned_run, tmp_path, state, tiny_llama_dir):
    import peft

    run, config = tuned_run
    server = build_server(config.server_spec())
    tensors = load_file(str(run / "tuned.safetensors"))
    z = tensors["z"] if state == "best" else None
    if state == "final":  # the checkpoint holds the last searched state
        from dfo_lora.search.checkpoint import load_state

        z = load_state(run / "checkpoint" / "state.safetensors")["z"]
    server.set_state(z)
    want = server.predict("test")["logits"]
    for fmt in ("peft", "merged"):
        out = tmp_path / fmt
        done = run_cli("export", run, "--format", fmt, "--state", state, "--out", out)
        assert done.returncode == 0, done.stderr
        if fmt == "peft":
            base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
            model = peft.PeftModel.from_pretrained(base, out)
        else:
            model = AutoModelForCausalLM.from_pretrained(out)
        assert rel_err(exported_logits(model, server, "test"), want) <= 1e-4, fmt
        assert json.loads((out / "dfo_lora_export.json").read_text())["state"] == state


def test_export_bad_input_is_one_line_and_writes_nothing(tuned_run, tmp_path):
    run, _ = tuned_run
    out = tmp_path / "x"
    assert "format 'onnx'" in one_line_error(
        run_cli("export", run, "--format", "onnx", "--out", out)
    )
    assert "state 'last'" in one_line_error(
        run_cli("export", run, "--format", "peft", "--state", "last", "--out", out)
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    line = one_line_error(run_cli("export", unfinished, "--format", "peft", "--out", out))
    assert "has not finished" in line
    taken = tmp_path / "taken"
    taken.mkdir()
    assert "exists" in one_line_error(run_cli("export", run, "--format", "merged", "--out", taken))
    # A run tuned before exports existed: z only in tuned.safetensors.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("results.json", "config.yaml"):
        (old / name).write_bytes((run / name).read_bytes())
    tensors = load_file(str(run / "tuned.safetensors"))
    from safetensors import safe_open

    with safe_open(str(run / "tuned.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    save_file({"z": tensors["z"]}, str(old / "tuned.safetensors"), metadata=meta)
    line = one_line_error(run_cli("export", old, "--format", "peft", "--out", out))
    assert "re-run it" in line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]
