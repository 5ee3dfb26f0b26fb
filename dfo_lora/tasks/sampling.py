"""Few-shot sampling by seed (BBT protocol) and the one-call `build_few_shot`.

Protocol (BBT / LM-BFF): from the pool (the task's train file), k examples per class for
train and another, disjoint k per class for dev; the official test split for test.

Algorithm, fixed so that a seed means the same examples everywhere:

1. The pool is deduplicated by value (first occurrence kept, file order otherwise), so
   train and dev never share an example even when the file repeats a sentence (SST-2 does).
2. One PCG64 stream per call, `PCG64(seed)` (the bit generator of `default_rng(seed)`).
   A permutation of n items is `argsort` (stable) of n raw 64-bit outputs: unlike
   `Generator.permutation`, this depends only on the PCG64 bit stream, which numpy
   guarantees across versions and machines.
3. For each label 0..n-1 in order: permute that class's pool indices; the first k go to
   train, the next k to dev.
4. Train, then dev, are put in a seeded order by a permutation from the same stream.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.tasks.custom import resolve_task
from dfo_lora.tasks.loaders import load_splits
from dfo_lora.tasks.permutation import permute, stable_permutation
from dfo_lora.tasks.spec import Example, TaskSpec


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def dedupe(pool: Sequence[Example]) -> list[Example]:
    """The pool without repeated examples (first occurrence kept, order kept)."""
    return list(dict.fromkeys(pool))


def _sample_indices(
    pool: Sequence[Example],
    k: int,
    seed: int,
    n_labels: int,
    label_names: Sequence[str] | None,
    task: str | None,
) -> tuple[list[int], list[int]]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise UserError(f"k (examples per class) must be a positive integer, got {k!r}")
    seed = _check_seed(seed)
    by_label: list[list[int]] = [[] for _ in range(n_labels)]
    for i, example in enumerate(pool):
        if not 0 <= example.label < n_labels:
            raise UserError(
                f"pool example {i}: label {example.label} is not one of 0..{n_labels - 1}"
            )
        by_label[example.label].append(i)
    prefix = f"{task}: " if task else ""
    bitgen = np.random.PCG64(seed)
    train: list[int] = []
    dev: list[int] = []
    for label, indices in enumerate(by_label):
        if len(indices) < 2 * k:
            name = f"{label_names[label]!r} (label {label})" if label_names else f"{label}"
            raise UserError(
                f"{prefix}class {name} has {len(indices)} examples in the pool; "
                f"k={k} needs {2 * k} ({k} train + {k} dev)"
            )
        order = permute(bitgen, len(indices))
        train.extend(indices[j] for j in order[:k])
        dev.extend(indices[j] for j in order[k : 2 * k])
    train = [train[j] for j in permute(bitgen, len(train))]
    dev = [dev[j] for j in permute(bitgen, len(dev))]
    return train, dev


def sample_few_shot(
    pool: Sequence[Example],
    k: int,
    seed: int,
    n_labels: int,
    label_names: Sequence[str] | None = None,
    task: str | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, dev): k examples per class each, disjoint, drawn from `pool` by `seed`.

    See the module docstring for the exact algorithm. UserError if k <= 0 or a class has
    fewer than 2k distinct examples (`label_names` / `task` only make that message clearer).
    """
    unique = dedupe(pool)
    train, dev = _sample_indices(unique, k, seed, n_labels, label_names, task)
    return [unique[i] for i in train], [unique[i] for i in dev]


@dataclass
class FewShotData:
    """Everything a run needs from a task: the spec and the three splits, plus notes
    (one line each) that a report should repeat, e.g. that a test set is not the official one.
    """

    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str] = field(default_factory=list)


def build_few_shot(
    task: str | TaskSpec,
    data_dir: str | os.PathLike | None = None,
    k: int = 16,
    seed: int = 42,
    test_limit: int | None = None,
) -> FewShotData:
    """Load a task (name, YAML path or spec) and sample its k-shot train/dev by seed.

    Test is the task's test file; for tasks without one (yelp_polarity, dbpedia locally,
    custom tasks with no test file) it is the deduplicated pool minus train and dev.
    `test_limit` keeps a seed-0 random subset of that many test examples (in file order),
    the same subset for every few-shot seed.
    """
    spec = resolve_task(task)
    if test_limit is not None and (
        isinstance(test_limit, bool) or not isinstance(test_limit, int) or test_limit <= 0
    ):
        raise UserError(f"test_limit must be a positive integer or None, got {test_limit!r}")
    splits = load_splits(spec, data_dir)
    unique = dedupe(splits.pool)
    train_idx, dev_idx = _sample_indices(
        unique, k, seed, spec.n_labels, spec.label_names, spec.name
    )
    train = [unique[i] for i in train_idx]
    dev = [unique[i] for i in dev_idx]
    notes = [splits.test_note]
    if len(unique) < len(splits.pool):
        notes.append(
            f"{spec.name}: {len(splits.pool) - len(unique)} duplicate examples in the pool "
            "were ignored for sampling"
        )
    if splits.test_from_pool:
        used = set(train_idx) | set(dev_idx)
        test = [e for i, e in enumerate(unique) if i not in used]
        notes.append(f"{spec.name}: test = {len(test)} pool examples not in train/dev")
    else:
        test = list(splits.test)
    if test_limit is not None and len(test) > test_limit:
        keep = np.sort(stable_permutation(0, len(test))[:test_limit])
        notes.append(
            f"{spec.name}: test limited to {test_limit} of {len(test)} examples "
            "(a fixed seed-0 random subset)"
        )
        test = [test[i] for i in keep]
    return FewShotData(spec=spec, train=train, dev=dev, test=test, notes=notes)
