"""dfo-lora: derivative-free optimization of low-rank adapters with forward passes only."""

from dfo_lora.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
