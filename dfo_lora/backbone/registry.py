"""The one registry of architecture knowledge.

Most of what the server needs from a Hugging Face model is discovered, not listed:

- the layer list: the model's `nn.ModuleList` with `num_hidden_layers` entries;
- entering the stack at layer l: recorded from the model's own forward (`stack.py`), so
  rotary tables, sliding-window masks, scaled embeddings and position ids are whatever
  the model computes;
- the q/k/v/o and MLP projections: from the first layer's module names (`q_proj`,
  `query`, `out_proj`, `fc1`, `dense_h_to_4h`, ...), as PEFT's target-module mapping
  names them;
- the verbalizer head: the final norm (the one norm outside the layers), the output
  embeddings, and Gemma's logit soft-capping where the config sets it.

Per-architecture entries remain only for what cannot be discovered: fused projections
(GPT-2's `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`, GPT-NeoX's interleaved
`query_key_value`), masked-LM heads (RoBERTa, BERT) and OPT's head (its final norm and
output projection live under `decoder`). A model that still cannot be handled fails with
one line saying what is missing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dfo_lora.backbone.stack import StackInputs, enter, enter_after_prefix, run_at_slots
from dfo_lora.errors import UserError


@dataclass(frozen=True)
class Projection:
    """Where one adaptable projection lives inside a layer.

    `module` is a dotted path relative to the layer. `out_slice` is set when several
    projections are fused into one module (GPT-2's `c_attn` holds q, k and v side by
    side; GPT-NeoX's `query_key_value` interleaves them per head, given as several
    ranges): the low-rank delta then only touches those output columns. `reads_layer_input`
    marks projections whose input is the layer's (normalised) input, identical for every
    candidate at the layer being searched, so their base output can be shared.
    `writes_residual` marks projections whose output is added to the residual stream
    (attention output, MLP output), whose directions the verbalizer head reads.
    """

    module: str
    out_slice: tuple[int, int] | tuple[tuple[int, int], ...] | None = None
    reads_layer_input: bool = False
    writes_residual: bool = False


# Leaf names of the projections a layer holds, per target, as the families name them.
PROJECTION_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("q_proj", "query", "q_lin"),
    "k": ("k_proj", "key", "k_lin"),
    "v": ("v_proj", "value", "v_lin"),
    "o": ("o_proj", "out_proj", "out_lin"),
    "gate": ("gate_proj",),
    "up": ("up_proj", "fc1", "dense_h_to_4h", "fc_in"),
    "down": ("down_proj", "fc2", "dense_4h_to_h", "fc_out"),
}
READS_LAYER_INPUT = ("q", "k", "v")
WRITES_RESIDUAL = ("o", "down")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")
NOT_LANGUAGE = ("vision", "visual", "image", "audio")  # multimodal towers' layer lists

Head = Callable[[nn.Module, torch.Tensor], torch.Tensor]
HeadRows = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Architecture:
    """How to drive one family of HF models layer by layer.

    Fields left None are discovered from the model (module docstring).
    """

    name: str
    causal: bool = True
    fused_projections: Callable[[nn.Module], dict[str, Projection]] | None = None
    head_transform: Head | None = None  # (B, H) last-layer output -> head input
    head_rows: HeadRows | None = None  # (V, H') output embeddings and bias

    # ------------------------------------------------------------ the stack
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder (or encoder) layer list."""
        return _find_layers(model, self.name)

    def enter(
        self, model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, StackInputs]:
        """Layer 0's input for a right-padded batch and every layer's extra arguments."""
        mask = None if self.causal else attention_mask
        return enter(model, self.layers(model), ids, mask)

    def enter_after_prefix(
        self, model: nn.Module, prefix: torch.Tensor, ids: torch.Tensor
    ) -> tuple[StackInputs, StackInputs] | None:
        """The arguments for a prefix alone and for `ids` after it (`stack.enter_after_prefix`);
        None for a masked LM, whose prefix positions read the whole input."""
        if not self.causal:
            return None
        return enter_after_prefix(model, self.layers(model), prefix, ids)

    @staticmethod
    def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        return inputs.call(layer, hidden)

    def run_layer_at_slots(
        self,
        model: nn.Module,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: StackInputs,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """A layer's output (B, H) at each sequence's slot only (`stack.run_at_slots`):
        for the last layer, whose other positions nothing reads. Exact for causal and
        bidirectional (RoBERTa, BERT) layers: attention still sees every position."""
        attention = layer.get_submodule(self.attention_path(model))
        return run_at_slots(layer, attention, hidden, inputs, slots)

    def attention_path(self, model: nn.Module) -> str:
        """The attention module inside a layer: the deepest module holding both the q and
        the o projection (`self_attn`, `attn`, `attention`; BERT's `attention` with its
        output dense and LayerNorm)."""
        return _cached(model, "attention", lambda: self._scan_attention(model))

    def _scan_attention(self, model: nn.Module) -> str:
        q = self.projection(model, "q").module.split(".")
        o = self.projection(model, "o").module.split(".")
        common = []
        for a, b in zip(q[:-1], o[:-1], strict=False):
            if a != b:
                break
            common.append(a)
        if not common:
            raise UserError(
                f"cannot find the attention module of {self.name}: its q and o projections "
                f"({'.'.join(q)}, {'.'.join(o)}) share no parent; add an entry to "
                "dfo_lora/backbone/registry.py"
            )
        return ".".join(common)

    def word_embeddings(self, model: nn.Module) -> torch.Tensor:
        """(V, H) what the input embedding module gives each token (with any scaling)."""
        embedding = model.get_input_embeddings()
        ids = torch.arange(embedding.num_embeddings, device=embedding.weight.device)
        with torch.no_grad():
            return embedding(ids)

    # ------------------------------------------------------------ projections
    def projections(self, model: nn.Module) -> dict[str, Projection]:
        if self.fused_projections is not None:
            return self.fused_projections(model)
        return _discover_projections(self.layers(model)[0], self.name)

    def projection(self, model: nn.Module, target: str) -> Projection:
        table = self.projections(model)
        if target not in table:
            raise UserError(
                f"targets: {target!r} is not a projection of {self.name} "
                f"(choose from {', '.join(table)})"
            )
        return table[target]

    # ------------------------------------------------------------ head
    def verbalizer_logits(
        self, model: nn.Module, hidden_at_slot: torch.Tensor, token_ids: torch.Tensor
    ) -> torch.Tensor:
        """Logits of the verbalizer tokens only: (B, H) -> (B, V_verb) in fp32, never the
        full vocab. Outside any autocast (bf16-mixed), in the weights' dtype up to the
        product, then fp32: a bf16 logit near 10 is rounded by up to 0.03, which left a
        floor of 0.003 in a 32-example mean loss, the size of the differences between a
        search's candidates (BENCHMARKS.md "Precision"); the (B, C) product costs nothing."""
        with torch.autocast(hidden_at_slot.device.type, enabled=False):
            transform = self.head_transform or _final_norm(model, self)
            hidden = transform(model, hidden_at_slot)
            weight, bias = (self.head_rows or _output_rows)(model)
            logits = hidden.float() @ weight[token_ids].float().T
            if bias is not None:
                logits = logits + bias[token_ids].float()
            cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
            if cap:  # Gemma: logits = cap * tanh(logits / cap)
                logits = torch.tanh(logits / cap) * cap
        return logits


# ---------------------------------------------------------------- discovery
# What was discovered per model object: the layer list and the final norm keep their
# identity once loaded (adapters wrap projections inside the layers, never these), and
# scoring asks for them on every chunk, so the module tree is scanned once.
_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(model: nn.Module, key: str, find: Callable[[], object]):
    found = _DISCOVERED.setdefault(model, {})
    if key not in found:
        found[key] = find()
    return found[key]


def _find_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    layers = _cached(model, "layers", lambda: _scan_layers(model, arch))
    if len(layers) != model.config.get_text_config().num_hidden_layers:  # edited since
        _DISCOVERED[model].clear()
        layers = _cached(model, "layers", lambda: _scan_layers(model, arch))
    return layers


def _scan_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    count = model.config.get_text_config().num_hidden_layers
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and not any(word in name for word in NOT_LANGUAGE)
    ]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(n for n, _ in found)})"
        raise UserError(
            f"cannot find the layers of {arch}: {what} module lists of num_hidden_layers = "
            f"{count} entries; add an entry to dfo_lora/backbone/registry.py"
        )
    return found[0][1]


def _discover_projections(layer: nn.Module, arch: str) -> dict[str, Projection]:
    # By leaf name, whatever the module is now: adapters (ours, peft's) wrap the Linear
    # under the same name.
    by_leaf: dict[str, list[str]] = {}
    for name, _ in layer.named_modules():
        by_leaf.setdefault(name.rpartition(".")[2], []).append(name)
    table = {}
    for target, leaves in PROJECTION_NAMES.items():
        paths = [path for leaf in leaves for path in by_leaf.get(leaf, [])]
        if target == "o" and not paths:  # GPT-NeoX, Falcon: the attention's `dense`
            paths = [p for p in by_leaf.get("dense", []) if "attention" in p or "attn" in p]
        if len(paths) == 1:
            table[target] = Projection(
                paths[0],
                reads_layer_input=target in READS_LAYER_INPUT,
                writes_residual=target in WRITES_RESIDUAL,
            )
    missing = [t for t in ("q", "k", "v", "o") if t not in table]
    if missing:
        linear = sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear))
        raise UserError(
            f"cannot find the {'/'.join(missing)} projections of {arch} among its layer's "
            f"linear modules ({', '.join(linear)}); add an entry to "
            "dfo_lora/backbone/registry.py"
        )
    return table


def _final_norm(model: nn.Module, arch: Architecture) -> Head:
    return _cached(model, "final_norm", lambda: _scan_final_norm(model, arch))


def _scan_final_norm(model: nn.Module, arch: Architecture) -> Head:
    layers_name = {id(m): n for n, m in model.named_modules()}[id(arch.layers(model))]
    norms = [
        module
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in FINAL_NORM_NAMES
        and not name.startswith(layers_name + ".")
        and not any(word in name for word in NOT_LANGUAGE)
    ]
    if len(norms) != 1:
        raise UserError(
            f"cannot find the final norm of {arch.name} ({len(norms)} candidates named "
            f"{', '.join(FINAL_NORM_NAMES)}); add an entry to dfo_lora/backbone/registry.py"
        )
    norm = norms[0]
    return lambda m, h: norm(h)


def _output_rows(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


# ---------------------------------------------------------------- GPT-2
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


# ---------------------------------------------------------------- Phi-3
def _phi3_projections(model) -> dict[str, Projection]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    q = cfg.num_attention_heads * head_dim
    kv = cfg.num_key_value_heads * head_dim
    inter = cfg.intermediate_size
    return {
        # qkv_proj is [q | k | v]; gate_up_proj is [gate | up]
        "q": Projection("self_attn.qkv_proj", (0, q), reads_layer_input=True),
        "k": Projection("self_attn.qkv_proj", (q, q + kv), reads_layer_input=True),
        "v": Projection("self_attn.qkv_proj", (q + kv, q + 2 * kv), reads_layer_input=True),
        "o": Projection("self_attn.o_proj", writes_residual=True),
        "gate": Projection("mlp.gate_up_proj", (0, inter)),
        "up": Projection("mlp.gate_up_proj", (inter, 2 * inter)),
        "down": Projection("mlp.down_proj", writes_residual=True),
    }


# ---------------------------------------------------------------- GPT-NeoX (Pythia)
def _neox_projections(model) -> dict[str, Projection]:
    cfg = model.config
    heads = cfg.num_attention_heads
    size = cfg.hidden_size // heads

    def part(i: int) -> tuple[tuple[int, int], ...]:  # query_key_value is [q | k | v] per head
        return tuple((h * 3 * size + i * size, h * 3 * size + (i + 1) * size) for h in range(heads))

    return {
        "q": Projection("attention.query_key_value", part(0), reads_layer_input=True),
        "k": Projection("attention.query_key_value", part(1), reads_layer_input=True),
        "v": Projection("attention.query_key_value", part(2), reads_layer_input=True),
        "o": Projection("attention.dense", writes_residual=True),
        "up": Projection("mlp.dense_h_to_4h"),
        "down": Projection("mlp.dense_4h_to_h", writes_residual=True),
    }


# ---------------------------------------------------------------- OPT
def _opt_head(model, h):
    decoder = model.model.decoder
    if decoder.final_layer_norm is not None:
        h = decoder.final_layer_norm(h)
    if decoder.project_out is not None:
        h = decoder.project_out(h)
    return h


# ---------------------------------------------------------------- BERT / RoBERTa
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
    fused_projections=_bert_like_projections,
    head_transform=_roberta_head_transform,
    head_rows=lambda m: (m.lm_head.decoder.weight, m.lm_head.bias),
)

BERT = Architecture(
    name="bert",
    causal=False,
    fused_projections=_bert_like_projections,
    head_transform=lambda m, h: m.cls.predictions.transform(h),
    head_rows=lambda m: (m.cls.predictions.decoder.weight, m.cls.predictions.bias),
)

# Families whose exactness tests pass on a tiny random model (tests/test_server_exactness.py).
ARCHITECTURES: dict[str, Architecture] = {
    **{
        name: Architecture(name)
        for name in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "olmo2")
    },
    "gpt2": Architecture("gpt2", fused_projections=_gpt2_projections),
    "phi3": Architecture("phi3", fused_projections=_phi3_projections),
    "gpt_neox": Architecture("gpt_neox", fused_projections=_neox_projections),
    "opt": Architecture("opt", head_transform=_opt_head),
    "roberta": ROBERTA,
    "bert": BERT,
}


def architecture_for(model_type: str) -> Architecture:
    """The registry entry for a `config.model_type`.

    A tested family gets its entry. Another causal LM that transformers knows is tried
    with discovery alone (its errors say what is missing); anything else is one line.
    """
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return Architecture(model_type)
    raise UserError(
        f"unsupported architecture {model_type!r}: dfo-lora drives causal LMs that "
        f"transformers knows and the masked LMs {', '.join(n for n, a in ARCHITECTURES.items() if not a.causal)}; "
        "add an entry (layer list, projections, head) to dfo_lora/backbone/registry.py"
    )


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


# Where the MLP is not one child module named `mlp` (discovered for the decoders).
MLP_SITES: dict[str, MlpSite] = {
    "roberta": MlpSite("intermediate", "output.dense"),
    "bert": MlpSite("intermediate", "output.dense"),
    "opt": MlpSite("fc1", "fc2"),
}


def mlp_site(arch: Architecture, layer: nn.Module) -> MlpSite:
    """The MLP site of a layer: the registry's, or the layer's `mlp` child; else one line."""
    if arch.name in MLP_SITES:
        return MLP_SITES[arch.name]
    if isinstance(getattr(layer, "mlp", None), nn.Module):
        return MlpSite("mlp", "mlp")
    raise UserError(
        f"space parallel: no MLP site is known for {arch.name} "
        "(add one to MLP_SITES in dfo_lora/backbone/registry.py)"
    )


def layer_prefix(model: nn.Module, arch) -> str:
    """The dotted name of the model's layer list (`model.layers`, `transformer.h`, ...)."""
    names = {id(m): n for n, m in model.named_modules()}
    return names[id(arch.layers(model))]
