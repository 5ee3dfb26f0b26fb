"""Synthetic servers for `dfo-lora bench --synthetic NAME`: real shapes, random weights.

Speed does not depend on the weights, so a model of a real architecture and size built
from its config with seeded random weights, fed random token ids, measures what a user
of that model would see, on any machine, with no weights, tokenizer or download.

The examples: N token sequences (default 32, k = 16 x 2 classes) whose lengths follow a
log-normal law with median `median_tokens` (default 14: SST-2's k = 16 train split
averages 13.8 tokens with its prompt on SmolLM2's tokenizer) and sigma 0.5, clipped to
[4, 8 x median]; labels cycle over C classes (default 2); the slot is the last token
(causal) or the one before it (masked LM); the verbalizer is C fixed token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dfo_lora.backbone import Backbone, prepare_backbone
from dfo_lora.backbone.loading import resolve_device, resolve_precision
from dfo_lora.errors import UserError
from dfo_lora.tasks.encoding import EncodedExample


@dataclass(frozen=True)
class Shape:
    """A real model's configuration (transformers config class name and its values)."""

    config_class: str
    values: dict
    about: str


SHAPES: dict[str, Shape] = {
    "roberta-large": Shape(
        "RobertaConfig",
        dict(
            vocab_size=50265,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
            layer_norm_eps=1e-5,
        ),
        "RoBERTa-large, 355M (the paper's backbone)",
    ),
    "gpt2-large": Shape(
        "GPT2Config",
        dict(n_embd=1280, n_layer=36, n_head=20, n_positions=1024, vocab_size=50257),
        "GPT2-large, 774M (the paper)",
    ),
    "gpt2-xl": Shape(
        "GPT2Config",
        dict(n_embd=1600, n_layer=48, n_head=25, n_positions=1024, vocab_size=50257),
        "GPT2-XL, 1.5B (the paper)",
    ),
    "llama-1b": Shape(
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        "Llama-3.2-1B, 1.2B",
    ),
    "smollm2-135m": Shape(
        "LlamaConfig",
        dict(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
        ),
        "SmolLM2-135M (the default model)",
    ),
    "tiny-llama": Shape(
        "LlamaConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
        "a 3-layer toy, for smoke tests",
    ),
    "tiny-roberta": Shape(
        "RobertaConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=130,
            type_vocab_size=1,
            pad_token_id=1,
        ),
        "a 3-layer masked-LM toy, for smoke tests",
    ),
}


def shape_config(name: str):
    """The transformers config of a known shape, or a one-line error listing them."""
    if name not in SHAPES:
        raise UserError(f"synthetic: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    import transformers

    shape = SHAPES[name]
    return getattr(transformers, shape.config_class)(**shape.values)


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from dfo_lora.backbone.registry import architecture_for

    return (
        AutoModelForCausalLM if architecture_for(config.model_type).causal else AutoModelForMaskedLM
    )


def parameter_count(config) -> int:
    """Parameters of the model a config builds, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    return sum(p.numel() for p in model.parameters())


def available_memory(device: torch.device) -> int:
    """Bytes free on the device: CUDA's free memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62  # unknown: do not refuse


def check_fits(name: str, config, dtype: torch.dtype, device: torch.device, limit: int | None):
    """Refuse, in one line, a shape whose weights (twice: the bench's naive loop runs on a
    copy) and a margin for activations do not fit the device's free memory or `limit`."""
    weights = parameter_count(config) * torch.empty((), dtype=dtype).element_size()
    need = int(2.5 * weights)
    have = available_memory(device) if limit is None else limit
    if need > have:
        gib = 2**30
        raise UserError(
            f"synthetic: {name} needs about {need / gib:.1f} GiB on {device} in "
            f"{str(dtype).replace('torch.', '')} (weights {weights / gib:.1f} GiB, twice for the "
            f"naive loop, plus activations); {have / gib:.1f} GiB is available"
        )


def synthetic_backbone(
    name: str, dtype: str = "auto", device: str = "auto", seed: int = 0, max_memory=None
) -> Backbone:
    """A model of the named shape with seeded random weights, built on its device."""
    from dfo_lora.backbone.loading import quiet_transformers

    quiet_transformers()
    config = shape_config(name)
    torch_device = resolve_device(device)
    torch_dtype, autocast = resolve_precision(dtype, torch_device)
    check_fits(name, config, torch_dtype, torch_device, max_memory)
    with torch.random.fork_rng(devices=[torch_device] if torch_device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(torch_device):  # initialised where it runs: no host copy
            net = _auto_class(config).from_config(
                config, dtype=torch_dtype, attn_implementation="sdpa"
            )
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    tokenizer = SimpleNamespace(pad_token_id=pad, eos_token_id=pad)  # no tokenizer needed
    return prepare_backbone(net, tokenizer, f"synthetic:{name}", torch_device, autocast)


def synthetic_examples(
    vocab_size: int,
    causal: bool,
    examples: int = 32,
    classes: int = 2,
    median_tokens: int = 14,
    seed: int = 0,
) -> list[EncodedExample]:
    """Random token sequences of realistic lengths (module docstring), labels cycling."""
    if examples < 1 or classes < 2 or median_tokens < 1:
        raise UserError("synthetic: needs examples >= 1, classes >= 2 and median_tokens >= 1")
    rng = np.random.default_rng(seed)
    lengths = np.clip(
        np.rint(median_tokens * rng.lognormal(0.0, 0.5, size=examples)), 4, 8 * median_tokens
    ).astype(int)
    out = []
    for i, length in enumerate(lengths):
        ids = rng.integers(3, vocab_size, size=int(length)).tolist()
        slot = length - 1 if causal else length - 2
        out.append(EncodedExample(input_ids=ids, slot=int(slot), label=i % classes))
    return out


def verbalizer(vocab_size: int, classes: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed + 1)
    return rng.choice(np.arange(3, vocab_size), size=classes, replace=False).tolist()


def synthetic_server(
    name: str,
    spec,
    examples: int = 32,
    classes: int = 2,
    median_tokens: int = 14,
    max_memory: int | None = None,
):
    """An EvaluationServer over a synthetic model and train split, with `spec`'s space,
    loss, dtype, device, seed and performance options (a `ServerSpec`)."""
    from dfo_lora.server import EvaluationServer

    backbone = synthetic_backbone(name, spec.dtype, spec.device, spec.seed, max_memory)
    vocab = backbone.model.config.vocab_size
    train = synthetic_examples(vocab, backbone.causal, examples, classes, median_tokens, spec.seed)
    return EvaluationServer(
        backbone,
        {"train": train},
        verbalizer(vocab, classes, spec.seed),
        space=spec.space,
        loss=spec.loss,
        options=spec.options,
        notes=[f"synthetic {name}: random weights and token ids ({SHAPES[name].about})"],
    )
