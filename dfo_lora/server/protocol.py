"""What the search needs from a server: the interface both servers implement.

`LayerwiseSearch` (search/loop.py) and `tune` drive a server only through these calls,
so the in-process `EvaluationServer` and the Ray backend's `RemoteServer`
(distributed/servers.py: the same numbers from a group of actors) are interchangeable;
tests/test_server_exactness.py checks that both implement it with these signatures.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class SearchServer(Protocol):
    """A frozen model and its data that scores populations of one layer's z."""

    def info(self) -> dict:
        """Facts of the server: num_layers, dim, metric, sigma_hat, backend, ..."""

    def score(self, layer: int, candidates: np.ndarray) -> dict[str, np.ndarray]:
        """Train loss and accuracy of each candidate z (P, d) for `layer`, the other
        layers at their commits."""

    def commit(self, layer: int, z: np.ndarray) -> None:
        """Keep z (d,) at `layer`."""

    def set_state(self, z: np.ndarray) -> None:
        """Commit every layer at once: z (L, d)."""

    def get_state(self) -> np.ndarray:
        """The committed z (L, d)."""

    def evaluate(self, split: str, calibrate: bool | None = None) -> dict:
        """Metric and loss of a split under the committed state."""
