"""The prompt spaces: `length` prompt tokens in front of every example, and z_l -> a
shift of their hidden states at layer l's input.

BBT (Sun et al. 2022) searches a soft prompt through a random projection A z (d = 500)
with CMA-ES; BBTv2 gives every layer its own prompt, searched layer-wise. Here the
prompt tokens are `length` token ids drawn from the vocabulary by the space's seed (BBT
starts from random vocabulary words) and put before everything else (position 0 on);
z_l goes through one seeded random map scaled from sigma_hat_l (`ProjectedSpace`,
BBTv2's initialisation) to p_l (n, H), which is added to the prompt positions' hidden
states at the input of layer l: the first layer only (`prompt`) or every layer
(`deep-prompt`). z = 0 is the model on the input with the prompt tokens in front.
BBTv2 replaces the prompt positions at each layer (as prefix keys and values); the shift
keeps what the layer below computed there and adds to it, so the zero state is a model
forward. Not mergeable: a model loaded with `load_tuned` needs the same prompt tokens in
front of its inputs (`prompt_token_ids`). Trained by gradients (`gradient --space
deep-prompt`) it is P-Tuning v2's deep prompt in this additive form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from dfo_lora.errors import UserError
from dfo_lora.spaces.base import LayerModules, Weights
from dfo_lora.spaces.projection import ProjectedSpace
from dfo_lora.spaces.prompt.config import PromptConfig
from dfo_lora.spaces.prompt.layer import PromptShift, prompt_shift
from dfo_lora.spaces.statistics import SpaceStatistics


def prompt_token_ids(config: PromptConfig, vocab_size: int) -> list[int]:
    """The prompt's token ids: `length` draws from range(vocab_size), seeded by the space's
    seed (the same ids for every task and machine)."""
    rng = np.random.default_rng([int(config.seed), 0xB87])
    return [int(i) for i in rng.integers(0, vocab_size, size=config.length)]


class PromptLayer(dict):
    """One layer's prompt shift (empty where the space leaves the layer alone)."""

    def __init__(self, shift: PromptShift | None):
        super().__init__({} if shift is None else {"prompt": shift})

    def set_candidates(self, weights: Weights) -> None:
        if "prompt" in weights and "prompt" in self:
            self["prompt"].candidates = weights["prompt"][0]

    def clear_candidates(self) -> None:
        for shift in self.values():
            shift.candidates = None

    def commit(self, weights: Weights | None) -> None:
        for shift in self.values():
            shift.committed = None if weights is None else weights["prompt"][0][0]

    def set_span(self, span: str) -> None:
        for shift in self.values():
            shift.span = span


class PromptSpace(ProjectedSpace):
    """BBT: one prompt, shifted at the first layer's input."""

    name = "prompt"
    mergeable = False
    tensor_names = ("shift",)
    tensor_shapes = {"shift": ("length", "out")}
    not_mergeable_because = "it adds prompt tokens in front of the input"

    def __init__(self, config: PromptConfig, hidden: int, sigma_hat, device):
        self.hidden = hidden
        super().__init__(config, sigma_hat, device)

    @classmethod
    def install(cls, config: PromptConfig, arch, model: nn.Module, layer: nn.Module) -> PromptLayer:
        first = next(iter(arch.layers(model))) is layer
        return PromptLayer(prompt_shift(layer) if config.deep or first else None)

    @classmethod
    def build(
        cls,
        config: PromptConfig,
        arch,
        model: nn.Module,
        modules: list[LayerModules],
        stats: SpaceStatistics,
        device: torch.device,
    ) -> PromptSpace:
        return cls(config, int(model.config.hidden_size), stats.sigma_hat, device)

    @classmethod
    def prepare_examples(cls, config: PromptConfig, model: nn.Module, examples: list) -> list:
        """Every example with the prompt's token ids in front (its slot moves with it);
        a one-line error where the prompt and the longest example exceed the context."""
        ids = prompt_token_ids(config, int(model.config.vocab_size))
        context = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        longest = max((len(e.input_ids) for e in examples), default=0)
        if context is not None and len(ids) + longest > int(context):
            raise UserError(
                f"prompt_length: {len(ids)} prompt tokens and the longest example "
                f"({longest} tokens) exceed the model's context of {context} positions"
            )
        return [
            dataclasses.replace(e, input_ids=ids + list(e.input_ids), slot=e.slot + len(ids))
            for e in examples
        ]

    @property
    def shared_prefix(self) -> int:
        return self.config.length

    @contextmanager
    def prefix_span(self, modules: list[LayerModules], span: str) -> Iterator[None]:
        """Every layer's shift on `span` ("prompt": calls on the prompt alone; "off":
        calls on the input after it), back to the prompt in front on leaving."""
        for layer in modules:
            layer.set_span(span)
        try:
            yield
        finally:
            for layer in modules:
                layer.set_span("front")

    def _chunk_numels(self) -> list[int]:
        return [self.config.length * self.hidden]

    def searches(self, layer: int) -> bool:
        return self.config.deep or layer == 0

    def weights(self, layer: int, z: torch.Tensor, dtype: torch.dtype) -> Weights:
        """z (P, d) -> {"prompt": (shift (P, n, H),)}; zero where the layer has no prompt."""
        if self.searches(layer):
            (flat,) = self.project(layer, z)
        else:  # no prompt there: nothing to project
            flat = torch.zeros(z.shape[0], self._chunk_numels()[0], device=self.device)
        return {"prompt": (flat.view(-1, self.config.length, self.hidden).to(dtype),)}

    def own_parameters(self, layer: int, generator: torch.Generator) -> Weights:
        """The shifts themselves, zero (P-Tuning v2's prompts in the additive form)."""
        shift = torch.zeros(1, self.config.length, self.hidden, requires_grad=True)
        return {"prompt": (shift,)}


class DeepPromptSpace(PromptSpace):
    """BBTv2: a prompt shift at every layer's input."""

    name = "deep-prompt"
