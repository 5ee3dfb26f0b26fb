"""HydraLoRA (asymmetric LoRA): one shared A, N heads B_i and a per-token router."""

from dfo_lora.spaces.hydra.config import HydraConfig
from dfo_lora.spaces.hydra.layer import HydraProjection, hydra_delta
from dfo_lora.spaces.hydra.model import HydraSpace

__all__ = ["HydraConfig", "HydraProjection", "HydraSpace", "hydra_delta"]
