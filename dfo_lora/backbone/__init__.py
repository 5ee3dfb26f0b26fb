"""Frozen HF backbones and the registry of per-architecture knowledge."""

from dfo_lora.backbone.loading import (
    PRESETS,
    Backbone,
    load_backbone,
    prepare_backbone,
    resolve_dtype,
)
from dfo_lora.backbone.registry import ARCHITECTURES, Architecture, Projection, architecture_for

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Architecture",
    "Backbone",
    "Projection",
    "architecture_for",
    "load_backbone",
    "prepare_backbone",
    "resolve_dtype",
]
