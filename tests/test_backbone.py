"""Backbone loading: registry errors, presets, dtype choice, local folders."""

from __future__ import annotations

import json

import pytest
import torch

from dfo_lora.backbone import architecture_for, load_backbone, resolve_dtype
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
    with pytest.raises(UserError, match="dtype: 'fp8'"):
        resolve_dtype("fp8", cpu)


def test_local_folder_loads_frozen(tiny_llama_dir):
    backbone = load_backbone(str(tiny_llama_dir), dtype="fp32", device="cpu")
    assert backbone.num_layers == 3 and backbone.causal
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training
