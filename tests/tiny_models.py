"""Tiny random models of each supported architecture, built from config (no downloads).

They live on CUDA when a GPU is present (`DEVICE`), so the exactness tests run there too
(in fp32, as on the CPU); CI has none and runs them on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForMaskedLM,
)

from dfo_lora.backbone import prepare_backbone
from dfo_lora.spaces.modules import merge_delta

VOCAB = 96
PAD = 1  # RoBERTa's padding_idx; used as the pad id for every tiny model
MASK = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Encoded:
    input_ids: list[int]
    slot: int
    label: int


# The decoder families built like Llama (rotary, grouped-query attention): config and
# model class names in transformers, and what each adds to the common shape.
DECODERS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    # sliding-window and global layers, scaled embeddings, soft-capped logits
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 8,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 8,
        },
    ),
}
# Every tiny architecture the exactness tests run on; "-eager" builds use eager attention.
ARCHS = [*DECODERS, "gemma3-eager", "opt", "gpt_neox", "gpt2", "roberta", "bert"]


def tiny_model(
    arch: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    autocast: torch.dtype | None = None,
):
    torch.manual_seed(seed)
    # A larger init than HF's 0.02 so that low-rank deltas visibly change the outputs.
    common = dict(vocab_size=VOCAB, pad_token_id=PAD, initializer_range=0.2)
    arch, _, attention = arch.partition("-")
    if arch in DECODERS:
        config_name, model_name, extra = DECODERS[arch]
        cfg = getattr(transformers, config_name)(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **{**common, **extra},
        )
        net = getattr(transformers, model_name)(cfg)
    elif arch == "opt":
        cfg = transformers.OPTConfig(
            hidden_size=32,
            ffn_dim=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=24,  # exercises project_in / project_out
            **{**common, "init_std": 0.2},
        )
        net = transformers.OPTForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            rotary_pct=0.5,  # rotary on half of each head, as Pythia
            **common,
        )
        net = transformers.GPTNeoXForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
        net = GPT2LMHeadModel(cfg)
    elif arch == "roberta":
        cfg = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=80,
            **common,
        )
        net = RobertaForMaskedLM(cfg)
    elif arch == "bert":
        cfg = BertConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            **common,
        )
        net = BertForMaskedLM(cfg)
    else:
        raise ValueError(arch)
    net.config._attn_implementation = attention or "sdpa"
    net = net.to(dtype)
    tok = SimpleNamespace(pad_token_id=PAD, eos_token_id=PAD)
    return prepare_backbone(net, tok, f"tiny-{arch}", DEVICE, autocast)


def random_examples(backbone, n: int, seed: int, min_len=4, max_len=14) -> list[Encoded]:
    """Random token sequences; masked LMs get a mask token at a random slot."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        ids = [int(t) for t in rng.integers(5, VOCAB, size=length)]
        if backbone.causal:
            slot = length - 1
        else:
            slot = int(rng.integers(1, length - 1))
            ids[slot] = MASK
        examples.append(Encoded(ids, slot, i % 2))
    return examples


def merged_reference_logits(
    server, z: np.ndarray, examples: list[Encoded], verbalizer, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain HF forwards, one example at a time, with every layer's delta merged into a copy
    (cast to `dtype` first when given: an fp32 truth for a bf16 server)."""
    backbone = server.backbone
    net = copy.deepcopy(backbone.model)
    if dtype is not None:
        net = net.to(dtype)
    # Unwrap the adapters in the copy so its forward is the stock HF one.
    for layer_index, layer in enumerate(backbone.arch.layers(net)):
        for target in server.space.config.targets:
            proj = backbone.arch.projection(net, target)
            parent_path, _, attr = proj.module.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            wrapped = getattr(parent, attr)
            if hasattr(wrapped, "base"):
                setattr(parent, attr, wrapped.base)
        deltas = server.space.deltas(layer_index, z[layer_index])
        for target, delta in deltas.items():
            proj = backbone.arch.projection(net, target)
            merge_delta(layer.get_submodule(proj.module), delta, proj.out_slice)
    return hf_logits(net, examples, verbalizer)


def hf_logits(net, examples: list[Encoded], verbalizer) -> torch.Tensor:
    """Stock HF forwards (any model object: plain, PEFT-wrapped, loaded from disk), one
    example at a time, verbalizer logits at each example's slot (N, C) on the CPU."""
    rows = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids], device=DEVICE)
            out = net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            rows.append(out[0, ex.slot, verbalizer])
    return torch.stack(rows).float().cpu()


def save_tiny_llama(folder, tokenizer_dir):
    """A 3-layer random Llama (hidden 32, seeded) saved in `folder` with the tokenizer of
    `tokenizer_dir` (the real SmolLM2's in the tests): real text in, tiny compute."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
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
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
