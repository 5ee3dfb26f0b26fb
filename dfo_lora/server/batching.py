"""Length bucketing: few padded batches with little padding.

Examples are sorted by length and cut into contiguous groups, each padded only to its
own longest member (right padding). The cut points minimise
`padded tokens + call_cost * number of groups` exactly (a small dynamic programme over
the sorted lengths), so short and long examples are not padded to each other while the
number of separate forward calls stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Bucket:
    """One right-padded batch of examples of similar length."""

    input_ids: torch.Tensor  # (n, T) long
    attention_mask: torch.Tensor  # (n, T) long, 1 on real tokens
    slots: torch.Tensor  # (n,) long: position whose output gives the verbalizer logits
    labels: torch.Tensor  # (n,) long
    order: np.ndarray  # (n,) positions of these examples in the split's original order

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_groups(lengths: list[int], call_cost: int, max_groups: int) -> list[list[int]]:
    """Indices (into `lengths`) of each group, minimising padded tokens + call_cost * groups."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    max_groups = max(1, min(max_groups, n))
    inf = float("inf")
    # best[g][j]: cost of covering the first j sorted examples with g groups
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(g - 1, j):
                cost = best[g - 1][i] + (j - i) * sorted_len[j - 1] + call_cost
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    groups_used = min(range(1, max_groups + 1), key=lambda g: best[g][n])
    bounds, j = [], n
    for g in range(groups_used, 0, -1):
        i = cut[g][j]
        bounds.append((i, j))
        j = i
    return [[order[k] for k in range(i, j)] for i, j in reversed(bounds)]


def make_buckets(
    examples: list,
    pad_id: int,
    device: torch.device,
    call_cost: int = 64,
    max_groups: int = 8,
) -> list[Bucket]:
    """Right-padded buckets from encoded examples (`input_ids`, `slot`, `label` attributes)."""
    if not examples:
        return []
    lengths = [len(ex.input_ids) for ex in examples]
    buckets = []
    for group in plan_groups(lengths, call_cost, max_groups):
        width = max(lengths[i] for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : lengths[i]] = torch.tensor(examples[i].input_ids)
            mask[row, : lengths[i]] = 1
        buckets.append(
            Bucket(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                slots=torch.tensor([examples[i].slot for i in group], device=device),
                labels=torch.tensor([examples[i].label for i in group], device=device),
                order=np.asarray(group),
            )
        )
    return buckets
