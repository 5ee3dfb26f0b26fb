"""Backbone loading: registry errors, presets, dtype choice, local folders."""

from __future__ import annotations

import json

import pytest
import torch

from dfo_lora.backbone import architecture_for, load_backbone, resolve_dtype
from dfo_lora.backbone.loading import resolve_precision
from dfo_lora.errors import UserError


def test_unknown_architecture_is_one_line_naming_it(tmp_path):
    with pytest.raises(UserError) as err:
        architecture_for("t5")
    message = str(err.value)
    assert "'t5'" in message and "registry.py" in message and "\n" not in message
    # the same from a model folder whose config names an unsupported architecture
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UserError, match="unsupported architecture 't5'"):
        load_backbone(str(tmp_path), device="cpu")


def test_unknown_preset_and_missing_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id must fail fast, not retry
    with pytest.raises(UserError) as err:
        load_backbone("smollm3-135m", device="cpu")
    assert "smollm3-135m" in str(err.value) and "presets: smollm2-135m" in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_backbone(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        load_backbone(str(tmp_path / "empty"))


def test_dtype_and_device_choice():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", cpu) in (torch.float32, torch.bfloat16)
    # bf16-mixed keeps fp32 weights and runs the matmuls under a bf16 autocast
    assert resolve_precision("bf16-mixed", cpu) == (torch.float32, torch.bfloat16)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, None)
    with pytest.raises(UserError, match="dtype: 'fp8' is not one of .*bf16-mixed"):
        resolve_dtype("fp8", cpu)


def test_local_folder_loads_frozen(tiny_llama_dir):
    backbone = load_backbone(str(tiny_llama_dir), dtype="fp32", device="cpu")
    assert backbone.num_layers == 3 and backbone.causal
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_folder_with_unknown_model_type_or_custom_code_is_one_line(tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(UserError, match="model_type 'not_a_model' is unknown to transformers"):
        load_backbone(str(unknown), device="cpu")
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(
        json.dumps({"model_type": "my_net", "auto_map": {"AutoConfig": "conf.MyConfig"}})
    )
    with pytest.raises(UserError, match="pass --trust-remote-code true") as err:
        load_backbone(str(custom), device="cpu")
    assert "\n" not in str(err.value)


def test_gguf_of_an_unreadable_architecture_fails_before_conversion(tmp_path, monkeypatch):
    from gguf import GGUFWriter

    monkeypatch.setenv("DFO_LORA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'rwkv6', which transformers cannot read"):
        load_backbone(str(path), device="cpu")
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing half-written


def test_layers_and_projections_that_cannot_be_found_fail_at_load():
    from types import SimpleNamespace

    import transformers

    from dfo_lora.backbone import prepare_backbone
    from tests.tiny_models import tiny_model

    tok = SimpleNamespace(pad_token_id=1, eos_token_id=1)
    net = tiny_model("llama").model
    del net.model.layers[2]  # config says 3 layers, the model holds 2
    with pytest.raises(UserError, match="cannot find the layers of llama"):
        prepare_backbone(net, tok, "cut", torch.device("cpu"))
    # Falcon fuses q, k and v into one module the registry has no entry for.
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    with pytest.raises(UserError, match="cannot find the q/k/v projections of falcon") as err:
        prepare_backbone(transformers.FalconForCausalLM(config), tok, "f", torch.device("cpu"))
    assert "query_key_value" in str(err.value) and "\n" not in str(err.value)
