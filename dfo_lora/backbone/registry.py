"""The one registry of architecture knowledge.

Everything that depends on how a Hugging Face architecture is laid out lives here and
nowhere else: where the layer list is, which modules are the q/k/v/o (and MLP)
projections, how to enter the layer stack at layer l with a cached hidden state, and how
the verbalizer logits are computed at the slot position. The rest of the code talks to
an `Architecture` and never to a model's attributes.

Supported: Llama family (llama, qwen2, mistral — SmolLM2 is llama), GPT-2, RoBERTa and
BERT (masked LM). Any other `config.model_type` raises a one-line `UserError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dfo_lora.errors import UserError


@dataclass(frozen=True)
class Projection:
    """Where one adaptable projection lives inside a layer.

    `module` is a dotted path relative to the layer. `out_slice` is set when several
    projections are fused into one module (GPT-2's `c_attn` holds q, k and v side by
    side): the low-rank delta then only touches those output columns. `reads_layer_input`
    marks projections whose input is the layer's (normalised) input, identical for every
    candidate at the layer being searched, so their base output can be shared.
    `writes_residual` marks projections whose output is added to the residual stream
    (attention output, MLP output), whose directions the verbalizer head reads.
    """

    module: str
    out_slice: tuple[int, int] | None = None
    reads_layer_input: bool = False
    writes_residual: bool = False


@dataclass
class StackInputs:
    """What the layers need besides the hidden state, for one padded batch.

    `attention_mask` is None for causal models (right padding + causal attention never
    lets a real token see a pad); masked LMs get an additive (B, 1, 1, T) mask.
    """

    attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def repeat(self, times: int) -> StackInputs:
        """The same inputs for a batch stacked `times` over (candidates x examples)."""
        mask = self.attention_mask
        if mask is not None and times > 1:
            mask = mask.repeat(times, 1, 1, 1)
        extra = {k: _repeat_batch(v, times) for k, v in self.extra.items()}
        return StackInputs(attention_mask=mask, extra=extra)


def _repeat_batch(value, times: int):
    if times == 1:
        return value
    if isinstance(value, tuple):
        return tuple(_repeat_batch(v, times) for v in value)
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] > 1:
        return value.repeat(times, *([1] * (value.dim() - 1)))
    return value  # batch-broadcast tensors (leading dim 1) need no copy


@dataclass(frozen=True)
class Architecture:
    """How to drive one family of HF models layer by layer."""

    name: str
    causal: bool
    layers: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # ids (B, T) -> layer-0 input
    word_embeddings: Callable[[nn.Module], torch.Tensor]  # (V, H), for layer 0's sigma_hat
    stack_inputs: Callable[[nn.Module, torch.Tensor, torch.Tensor], StackInputs]
    run_layer: Callable[[nn.Module, torch.Tensor, StackInputs], torch.Tensor]
    head_transform: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (B, H) -> (B, H')
    head_rows: Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]
    projections: Callable[[nn.Module], dict[str, Projection]]  # from the model config

    def projection(self, model: nn.Module, target: str) -> Projection:
        table = self.projections(model)
        if target not in table:
            raise UserError(
                f"targets: {target!r} is not a projection of {self.name} "
                f"(choose from {', '.join(table)})"
            )
        return table[target]

    def verbalizer_logits(
        self, model: nn.Module, hidden_at_slot: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the verbalizer tokens only: (B, H) -> (B, V_verb), never the full vocab."""
        hidden = self.head_transform(model, hidden_at_slot)
        weight, bias = self.head_rows(model)
        logits = hidden @ weight[token_ids].T
        if bias is not None:
            logits = logits + bias[token_ids]
        return logits


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


# ---------------------------------------------------------------- Llama family
def _llama_stack_inputs(model, ids, attention_mask) -> StackInputs:
    # Rotary tables are per position; every sequence is right-padded from 0.
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    probe = model.model.embed_tokens.weight[:1].unsqueeze(0)  # dtype/device carrier
    cos, sin = model.model.rotary_emb(probe, positions)
    return StackInputs(attention_mask=None, extra={"position_embeddings": (cos, sin)})


def _llama_run_layer(layer, hidden, inputs: StackInputs):
    return layer(
        hidden, attention_mask=None, position_embeddings=inputs.extra["position_embeddings"]
    )


def _llama_projections(model) -> dict[str, Projection]:
    return {
        "q": Projection("self_attn.q_proj", reads_layer_input=True),
        "k": Projection("self_attn.k_proj", reads_layer_input=True),
        "v": Projection("self_attn.v_proj", reads_layer_input=True),
        "o": Projection("self_attn.o_proj", writes_residual=True),
        "gate": Projection("mlp.gate_proj"),
        "up": Projection("mlp.up_proj"),
        "down": Projection("mlp.down_proj", writes_residual=True),
    }


LLAMA = Architecture(
    name="llama",
    causal=True,
    layers=lambda m: m.model.layers,
    embed=lambda m, ids: m.model.embed_tokens(ids),
    word_embeddings=lambda m: m.model.embed_tokens.weight,
    stack_inputs=_llama_stack_inputs,
    run_layer=_llama_run_layer,
    head_transform=lambda m, h: m.model.norm(h),
    head_rows=lambda m: (m.lm_head.weight, m.lm_head.bias),
    projections=_llama_projections,
)


# ---------------------------------------------------------------- GPT-2
def _gpt2_embed(model, ids):
    positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    return model.transformer.wte(ids) + model.transformer.wpe(positions)


def _gpt2_projections(model) -> dict[str, Projection]:
    h = model.config.n_embd
    return {
        # c_attn is one Conv1D whose output is [q | k | v].
        "q": Projection("attn.c_attn", (0, h), reads_layer_input=True),
        "k": Projection("attn.c_attn", (h, 2 * h), reads_layer_input=True),
        "v": Projection("attn.c_attn", (2 * h, 3 * h), reads_layer_input=True),
        "o": Projection("attn.c_proj", writes_residual=True),
        "fc": Projection("mlp.c_fc"),
        "proj": Projection("mlp.c_proj", writes_residual=True),
    }


GPT2 = Architecture(
    name="gpt2",
    causal=True,
    layers=lambda m: m.transformer.h,
    embed=_gpt2_embed,
    word_embeddings=lambda m: m.transformer.wte.weight,
    stack_inputs=lambda m, ids, mask: StackInputs(),
    run_layer=lambda layer, h, inputs: layer(h, attention_mask=None),
    head_transform=lambda m, h: m.transformer.ln_f(h),
    head_rows=lambda m: (m.lm_head.weight, None),
    projections=_gpt2_projections,
)


# ---------------------------------------------------------------- BERT / RoBERTa
def _padding_mask(model, ids, attention_mask) -> StackInputs:
    # Additive (B, 1, 1, T) mask: 0 where attended, dtype-min on padding keys.
    dtype = next(model.parameters()).dtype
    keep = attention_mask[:, None, None, :].to(dtype)
    return StackInputs(attention_mask=(1.0 - keep) * torch.finfo(dtype).min)


def _bert_like_projections(model) -> dict[str, Projection]:
    return {
        "q": Projection("attention.self.query", reads_layer_input=True),
        "k": Projection("attention.self.key", reads_layer_input=True),
        "v": Projection("attention.self.value", reads_layer_input=True),
        "o": Projection("attention.output.dense", writes_residual=True),
        "intermediate": Projection("intermediate.dense"),
        "output": Projection("output.dense", writes_residual=True),
    }


def _roberta_head_transform(model, h):
    head = model.lm_head
    return head.layer_norm(nn.functional.gelu(head.dense(h)))


ROBERTA = Architecture(
    name="roberta",
    causal=False,
    layers=lambda m: m.roberta.encoder.layer,
    embed=lambda m, ids: m.roberta.embeddings(input_ids=ids),
    word_embeddings=lambda m: m.roberta.embeddings.word_embeddings.weight,
    stack_inputs=_padding_mask,
    run_layer=lambda layer, h, inputs: layer(h, attention_mask=inputs.attention_mask),
    head_transform=_roberta_head_transform,
    head_rows=lambda m: (m.lm_head.decoder.weight, m.lm_head.bias),
    projections=_bert_like_projections,
)

BERT = Architecture(
    name="bert",
    causal=False,
    layers=lambda m: m.bert.encoder.layer,
    embed=lambda m, ids: m.bert.embeddings(input_ids=ids),
    word_embeddings=lambda m: m.bert.embeddings.word_embeddings.weight,
    stack_inputs=_padding_mask,
    run_layer=lambda layer, h, inputs: layer(h, attention_mask=inputs.attention_mask),
    head_transform=lambda m, h: m.cls.predictions.transform(h),
    head_rows=lambda m: (m.cls.predictions.decoder.weight, m.cls.predictions.bias),
    projections=_bert_like_projections,
)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "mistral": LLAMA,
    "gpt2": GPT2,
    "roberta": ROBERTA,
    "bert": BERT,
}


def architecture_for(model_type: str) -> Architecture:
    """The registry entry for a `config.model_type`, or a one-line error naming it."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture {model_type!r}: dfo-lora knows "
            f"{', '.join(sorted(ARCHITECTURES))}; add an entry (layer list, q/k/v/o modules, "
            "stack entry, verbalizer head) to dfo_lora/backbone/registry.py"
        )
    return ARCHITECTURES[model_type]


# ---------------------------------------------------------------- MLP sites (adapters)
# Kept apart from the Architecture entries above: only the parallel adapter space
# (dfo_lora/spaces/adapters) reads it.
@dataclass(frozen=True)
class MlpSite:
    """Where a parallel adapter sits beside a layer's MLP (paths relative to the layer).

    The adapter reads the input of module `reads` (the MLP's input) and adds to the output
    of module `writes` (the MLP's output, before the residual add; BERT and RoBERTa: the
    output dense, before the residual add and LayerNorm). Llama and GPT-2 have one MLP
    module, so both are the same path.
    """

    reads: str
    writes: str


MLP_SITES: dict[str, MlpSite] = {
    "llama": MlpSite("mlp", "mlp"),
    "gpt2": MlpSite("mlp", "mlp"),
    "roberta": MlpSite("intermediate", "output.dense"),
    "bert": MlpSite("intermediate", "output.dense"),
}


def mlp_site(arch: Architecture) -> MlpSite:
    """The registry's MLP site of an architecture, or a one-line error naming it."""
    if arch.name not in MLP_SITES:
        raise UserError(
            f"space parallel: no MLP site is known for {arch.name} "
            "(add one to MLP_SITES in dfo_lora/backbone/registry.py)"
        )
    return MLP_SITES[arch.name]
