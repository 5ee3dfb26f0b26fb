"""The layer-wise search loop, its run-level policy, callbacks, checkpoints and the on-disk run.

Names are imported on first use, so `dfo_lora.config` can import `dfo_lora.search.policy`
without loading the loop (which reads the config): no import cycle.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LayerwiseSearch": "dfo_lora.search.loop",
    "layer_order": "dfo_lora.search.policy",
    "rounds_for": "dfo_lora.search.policy",
    "load_tuned": "dfo_lora.search.tuned",
    "tune": "dfo_lora.search.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dfo_lora.search' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
