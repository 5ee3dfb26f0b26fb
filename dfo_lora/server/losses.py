"""Per-example losses on verbalizer logits, in fp32.

- `ce`: cross-entropy over the verbalizer tokens (the paper's default);
- `hinge`: multi-class margin loss with margin 2 (BBT's hinge; torch's MultiMarginLoss:
  sum over wrong classes j of max(0, 2 - s_y + s_j), divided by the number of classes);
- `neg_acc`: minus the 0/1 accuracy.
"""

from __future__ import annotations

import torch

from dfo_lora.errors import UserError

LOSSES = ("ce", "hinge", "neg_acc")
HINGE_MARGIN = 2.0


def per_example_loss(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (..., C), labels (...) -> loss (...) in fp32."""
    logits = logits.float()
    if name == "ce":
        return torch.logsumexp(logits, -1) - logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if name == "hinge":
        true = logits.gather(-1, labels.unsqueeze(-1))
        margins = (HINGE_MARGIN - true + logits).clamp_min(0)
        margins = margins.scatter(-1, labels.unsqueeze(-1), 0.0)
        return margins.sum(-1) / logits.shape[-1]
    if name == "neg_acc":
        return -(logits.argmax(-1) == labels).float()
    raise UserError(f"loss: {name!r} is not one of {', '.join(LOSSES)}")
