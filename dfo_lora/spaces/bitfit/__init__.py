"""BitFit (Ben Zaken et al. 2022): a bias shift on each target projection's output."""

from dfo_lora.spaces.bitfit.config import BitfitConfig
from dfo_lora.spaces.bitfit.layer import BiasShift
from dfo_lora.spaces.bitfit.model import BitfitSpace

__all__ = ["BiasShift", "BitfitConfig", "BitfitSpace"]
