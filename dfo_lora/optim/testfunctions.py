"""Shifted benchmark functions for the optimizers' tests and `experiments/optim_bench.py`.

Each takes a batch Z (P, dim) and returns losses (P,). The optimum x* is drawn uniform in
[-2, 2]^dim from `seed`, so it is not at the start point z = 0 (where every optimizer
begins, as z = 0 is the unmodified model) and lies inside the Fireworks' default box
[-5 sigma, 5 sigma] for sigma = 1. The optimum value is 0 for all four.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dfo_lora.errors import UserError

_SHIFT_TAG = 0x0DF0  # separates the optimum's random stream from the optimizers'

Objective = Callable[[np.ndarray], np.ndarray]


def sphere(y: np.ndarray) -> np.ndarray:
    return np.sum(y**2, axis=1)


def ellipsoid(y: np.ndarray) -> np.ndarray:
    """Axis-parallel ellipsoid, condition number 1e6."""
    d = y.shape[1]
    weights = 10.0 ** (6.0 * np.arange(d) / max(d - 1, 1))
    return np.sum(weights * y**2, axis=1)


def rastrigin(y: np.ndarray) -> np.ndarray:
    return 10.0 * y.shape[1] + np.sum(y**2 - 10.0 * np.cos(2.0 * np.pi * y), axis=1)


def rosenbrock(y: np.ndarray) -> np.ndarray:
    """Rosenbrock with its optimum moved to y = 0 (evaluated at y + 1)."""
    x = y + 1.0
    return np.sum(100.0 * (x[:, 1:] - x[:, :-1] ** 2) ** 2 + (1.0 - x[:, :-1]) ** 2, axis=1)


FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sphere": sphere,
    "ellipsoid": ellipsoid,
    "rastrigin": rastrigin,
    "rosenbrock": rosenbrock,
}


def make_problem(name: str, dim: int, seed: int = 0) -> Objective:
    """`f(Z) = g(Z - x*)` for the named g, x* ~ U[-2, 2]^dim drawn from (`seed`, a tag)."""
    if name not in FUNCTIONS:
        raise UserError(f"function: unknown {name!r} (choices: {', '.join(FUNCTIONS)})")
    g = FUNCTIONS[name]
    # (seed, tag) seeds a stream unrelated to PCG64(seed): the Fireworks optimizers use
    # default_rng(seed), and with the same stream their first sparks would be drawn from
    # the very numbers that placed the optimum (a seed-1 run "found" it at once).
    shift = np.random.default_rng((seed, _SHIFT_TAG)).uniform(-2.0, 2.0, dim)

    def objective(z: np.ndarray) -> np.ndarray:
        return g(np.atleast_2d(np.asarray(z, dtype=np.float64)) - shift)

    return objective
