"""LoRA, the paper's space: z -> factor pairs (A, B) per adapted projection."""

from dfo_lora.spaces.lora.config import A_FACTORS, B_BASES, DEFAULT_TARGETS, LoraConfig
from dfo_lora.spaces.lora.layer import LoraLayer, LoraProjection
from dfo_lora.spaces.lora.model import FactorShape, LoraSpace

__all__ = [
    "A_FACTORS",
    "B_BASES",
    "DEFAULT_TARGETS",
    "FactorShape",
    "LoraConfig",
    "LoraLayer",
    "LoraProjection",
    "LoraSpace",
]
