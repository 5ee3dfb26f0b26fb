"""Classification metrics: accuracy, and binary F1 of label 1 (MRPC). Values are in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.tasks.spec import METRICS


def compute_metric(metric: str, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """{"accuracy": a} for metric "accuracy"; {"f1": f, "accuracy": a} for metric "f1".

    F1 is that of the positive class (label 1), as GLUE reports for MRPC; it is 0.0 when
    there are no true and no predicted positives (nothing to find, nothing found).
    """
    if metric not in METRICS:
        raise UserError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    accuracy = float(np.mean(p == y))
    if metric == "accuracy":
        return {"accuracy": accuracy}
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y != 1)))
    fn = int(np.sum((p != 1) & (y == 1)))
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"f1": float(f1), "accuracy": accuracy}
