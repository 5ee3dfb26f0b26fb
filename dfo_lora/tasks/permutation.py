"""Version-stable permutations: the order of n items from n raw PCG64 outputs.

Unlike `Generator.permutation`, `argsort` (stable) of raw 64-bit outputs depends only on
the PCG64 bit stream, which numpy guarantees across versions and machines; few-shot
sampling, the embedded mr split and ICL's demonstration order all use it.
"""

from __future__ import annotations

import numpy as np


def permute(bitgen: np.random.PCG64, n: int) -> np.ndarray:
    """A permutation of range(n) from n raw outputs of `bitgen` (version-stable)."""
    keys = np.asarray(bitgen.random_raw(n), dtype=np.uint64).reshape(n)
    return np.argsort(keys, kind="stable")


def stable_permutation(seed: int, n: int) -> np.ndarray:
    """A permutation of range(n) determined by `seed` alone, on any machine."""
    return permute(np.random.PCG64(seed), n)
