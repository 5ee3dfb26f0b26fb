"""An estimated-gradient step: antithetic probes, a least-squares gradient, one step.

Why it is here. Best-of-20 (what the layer-wise loop commits from CMA-ES after one or two
generations) moves z along the descent direction by about 1.9 sigma per visit, but also
by sigma * sqrt(dim - 1) in directions the loss did not choose; over many rounds that
random part adds up and the longer search fits 32 examples in directions that do not
generalise (issue 21's traces). This optimizer spends the same evaluations on an estimate
of the gradient and moves only along it, as gradient descent in the same space does.

Each generation, with m the current point and n = popsize / 2:

    u_1..u_n   directions, stacked random orthonormal blocks scaled to length sqrt(dim)
               (the length of a typical N(0, I) sample)
    candidates m + sigma u_i and m - sigma u_i           (antithetic: the mean cancels)
    Delta_i  = (f(m + sigma u_i) - f(m - sigma u_i)) / (2 sigma)   ~ u_i . grad f(m)
    g        = the least-squares solution of U g = Delta (minimum norm when n < dim: the
               gradient's projection on the directions; exact for a quadratic when n >= dim)
    m       <- m - lr * s / |s|   (normalize, the default: a step of length lr)
               m - lr * s          (normalize false: plain SGD, or Adam with adam)
    s        = g (direction gradient, the default), sign(g) (sign), or Adam's
               m_hat / (sqrt(v_hat) + 1e-12) of the estimates so far (adam: betas 0.9 and
               0.999, bias-corrected; its first step is sign(g))

Pairs with a non-finite loss are left out of the estimate; with none left, m stays.
`mean` is m after the last step, which is what the loop must commit (`commit: mean`;
the run config refuses `commit: best`, since the best probe is a random perturbation of
m, not a step). `best` is the best probe ever scored, as for every optimizer.

Options:
  lr             step length (normalize) or learning rate           [sigma]
  normalize      true: steps of length lr; false: lr * g             [true]
  direction      gradient | sign | adam: the step's direction (s)    [gradient]
                 given the estimate. In exact-gradient replays on
                 trec (experiments/step_oracle.py --normalize adam)
                 adam matched AdamW on the one seed of three where
                 the gradient's direction fell short, and fitted
                 slower on the others: no gain on average at the
                 recommended budget, so not the default
  reference_dim  lr is the step at this d; at the optimizer's d the   [none]
                 step is lr * sqrt(d / reference_dim). The projected
                 spaces' maps have a std falling as 1 / sqrt(d), so a
                 step of length lr moves the weights as far at every d
                 (a space whose d grows with the task, `class_dim`)

Randomness: the optimizer's own PCG64 generator; the state is m, that generator and (adam)
the moments and their step count, so `load_state_dict()` continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.optim import _blas
from dfo_lora.optim.base import (
    Optimizer,
    check_float,
    check_options,
    rng_from_state,
    rng_state_dict,
)
from dfo_lora.optim.registry import OPTIMIZERS

DIRECTIONS = ("gradient", "sign", "adam")
BETAS = (0.9, 0.999)  # Adam's defaults


def adam_direction(moments: np.ndarray, steps, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Adam's first and second moments (stacked, shape (2, *g.shape)) after folding in g,
    and the direction m_hat / (sqrt(v_hat) + 1e-12); `steps` counts the estimates with g
    (an int, or an array that broadcasts against g: one count per row)."""
    b1, b2 = BETAS
    moments = np.stack([b1 * moments[0] + (1 - b1) * g, b2 * moments[1] + (1 - b2) * g * g])
    first = moments[0] / (1 - b1**steps)
    second = moments[1] / (1 - b2**steps)
    return moments, first / (np.sqrt(second) + 1e-12)


def orthonormal_directions(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    """(count, dim) directions of length sqrt(dim), orthogonal within blocks of dim rows."""
    blocks = []
    while count > 0:
        rows = min(count, dim)
        q, r = np.linalg.qr(rng.standard_normal((dim, rows)))
        q *= np.sign(np.diag(r))  # a uniformly random orthonormal frame (Haar)
        blocks.append(q.T * math.sqrt(dim))
        count -= rows
    return np.concatenate(blocks)


class GradientStep(Optimizer):
    """Antithetic least-squares gradient estimate and one step per generation."""

    def __init__(
        self, name: str, dim: int, popsize: int, sigma: float, seed: int, **options: Any
    ) -> None:
        check_options(name, options, OPTIMIZERS[name].options)
        super().__init__(name, dim, popsize, sigma, seed, options)
        if self.popsize % 2:
            raise UserError(f"{name}.popsize: {self.popsize} must be even (antithetic pairs)")
        lr = self.options.get("lr")
        self.lr = self.sigma if lr is None else check_float(f"{name}.lr", lr, positive=True)
        normalize = self.options.get("normalize", True)
        if not isinstance(normalize, bool):
            raise UserError(f"{name}.normalize: {normalize!r} is not true or false")
        self.normalize = normalize
        self.direction = self.options.get("direction", "gradient")
        if self.direction not in DIRECTIONS:
            raise UserError(
                f"{name}.direction: {self.direction!r} is not one of {', '.join(DIRECTIONS)}"
            )
        reference = self.options.get("reference_dim")
        if reference is not None:
            if isinstance(reference, bool) or not isinstance(reference, int) or reference < 1:
                raise UserError(f"{name}.reference_dim: {reference!r} is not a whole number >= 1")
            self.lr *= math.sqrt(self.dim / reference)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._m = np.zeros(self.dim)
        self._moments = np.zeros((2, self.dim))  # adam: first and second moments of g
        self._steps = 0  # adam: estimates folded into the moments

    def _ask(self) -> np.ndarray:
        with _blas.single_thread():
            step = self.sigma * orthonormal_directions(self._rng, self.popsize // 2, self.dim)
        return np.concatenate([self._m + step, self._m - step])

    def _tell(self, losses: np.ndarray) -> None:
        n = self.popsize // 2
        plus, minus = losses[:n], losses[n:]
        ok = np.isfinite(plus) & np.isfinite(minus)
        # from the candidates themselves, so a resumed pending ask steps bit for bit alike
        directions = (self._pending[:n] - self._pending[n:]) / (2.0 * self.sigma)
        if not ok.any():
            return
        delta = (plus[ok] - minus[ok]) / (2.0 * self.sigma)
        with _blas.single_thread():
            g = np.linalg.lstsq(directions[ok], delta, rcond=None)[0]
        s = self._step_direction(g)
        norm = float(np.linalg.norm(s))
        if self.normalize:
            if norm > 0:
                self._m = self._m - (self.lr / norm) * s
        else:
            self._m = self._m - self.lr * s

    def _step_direction(self, g: np.ndarray) -> np.ndarray:
        if self.direction == "sign":
            return np.sign(g)
        if self.direction == "gradient":
            return g
        self._steps += 1
        self._moments, direction = adam_direction(self._moments, self._steps, g)
        return direction

    @property
    def mean(self) -> np.ndarray:
        return self._m.copy()

    def _state(self) -> dict:
        state = {**rng_state_dict(self._rng), "point": self._m.copy()}
        if self.direction == "adam":
            state |= {"moments": self._moments.copy(), "adam_steps": self._steps}
        return state

    def _load_state(self, state: dict, *, generation: int, pending: np.ndarray | None) -> None:
        where = f"{self.name} optimizer state"
        try:
            rng = rng_from_state(state)
            point = np.array(state["point"], dtype=np.float64).reshape(self.dim)
            if self.direction == "adam":
                moments = np.array(state["moments"], dtype=np.float64).reshape(2, self.dim)
                steps = state["adam_steps"]
                if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                    raise ValueError(f"adam_steps {steps!r} is not a whole number >= 0")
        except KeyError as exc:
            raise UserError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed ({exc})") from None
        if not np.all(np.isfinite(point)):
            raise UserError(f"{where}: point is not finite")
        self._rng, self._m = rng, point
        if self.direction == "adam":
            if not np.all(np.isfinite(moments)) or (moments[1] < 0).any():
                raise UserError(f"{where}: moments are not finite or a second moment is < 0")
            self._moments, self._steps = moments, steps
