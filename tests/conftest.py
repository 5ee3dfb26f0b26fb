"""Shared fixtures: the real SmolLM2 folder and a tiny random Llama with its tokenizer."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, converted once from the package's GGUF (cached)."""
    from dfo_lora.backbone.loading import converted_gguf_folder, preset_gguf

    return converted_gguf_folder(preset_gguf("smollm2-135m"), "smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 3-layer random Llama (hidden 32) saved with the real SmolLM2 tokenizer.

    Real tokenizer and real task data, tiny compute: end-to-end runs take seconds.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
