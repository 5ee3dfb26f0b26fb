"""Prompt spaces' hyper-parameters: BBT (one prompt at the input) and BBTv2 (every layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dfo_lora.errors import UserError, check_positive
from dfo_lora.options import Option, check_space_values

MAX_PROMPT_LENGTH = 256


@dataclass(frozen=True)
class PromptConfig:
    """`length` prompt tokens in front of every input; z shifts their hidden states at the
    input of the first layer only (BBT)."""

    name: ClassVar[str] = "prompt"
    deep: ClassVar[bool] = False
    RUN_KEYS: ClassVar[dict[str, str]] = {"length": "prompt_length"}
    OPTIONS: ClassVar[dict[str, Option]] = {  # help and checks (options.check_space_values)
        "length": Option(
            50, f"prompt tokens in front of every input (BBT: 50; at most {MAX_PROMPT_LENGTH})"
        ),
    }
    length: int = 50
    intrinsic_dim: int = 500  # d: entries of z per layer (BBT: 500)
    alpha: float = 1.0  # projection std multiplier
    sigma: float = 1.0  # the optimizer's initial step size (enters the projection std)
    seed: int = 0  # seeds the random projections and the prompt's token ids

    def validate(self) -> None:
        check_space_values(self)
        check_positive(self, ("intrinsic_dim",), ("alpha", "sigma"))
        if isinstance(self.length, bool) or not isinstance(self.length, int):
            raise UserError(f"prompt_length: must be a whole number, got {self.length!r}")
        if not 1 <= self.length <= MAX_PROMPT_LENGTH:
            raise UserError(f"prompt_length: must be in 1..{MAX_PROMPT_LENGTH}, got {self.length}")


@dataclass(frozen=True)
class DeepPromptConfig(PromptConfig):
    """The same prompt tokens, with a shift of their hidden states at every layer's input
    (BBTv2's deep prompt, searched layer-wise; trained by gradients: P-Tuning v2's)."""

    name: ClassVar[str] = "deep-prompt"
    deep: ClassVar[bool] = True
