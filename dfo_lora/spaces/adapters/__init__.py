"""Bottleneck adapters (LLM-Adapters): series (after a residual write) and parallel (beside
the MLP)."""

from dfo_lora.spaces.adapters.config import ParallelConfig, SeriesConfig
from dfo_lora.spaces.adapters.layer import AdapterModule, Tap
from dfo_lora.spaces.adapters.model import ParallelSpace, SeriesSpace

__all__ = ["AdapterModule", "ParallelConfig", "ParallelSpace", "SeriesConfig", "SeriesSpace", "Tap"]
