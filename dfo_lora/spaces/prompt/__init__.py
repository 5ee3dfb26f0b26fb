"""Prompt spaces: BBT (`prompt`, the input) and BBTv2 (`deep-prompt`, every layer)."""

from dfo_lora.spaces.prompt.config import DeepPromptConfig, PromptConfig
from dfo_lora.spaces.prompt.model import DeepPromptSpace, PromptSpace, prompt_token_ids

__all__ = [
    "DeepPromptConfig",
    "DeepPromptSpace",
    "PromptConfig",
    "PromptSpace",
    "prompt_token_ids",
]
