"""The layer-wise search loop, its callbacks, checkpoints and the on-disk run."""

from dfo_lora.search.loop import LayerwiseSearch, layer_order, rounds_for
from dfo_lora.search.run import load_tuned, tune

__all__ = ["LayerwiseSearch", "layer_order", "load_tuned", "rounds_for", "tune"]
