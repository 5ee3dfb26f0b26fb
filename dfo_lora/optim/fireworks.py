"""The Fireworks Algorithm family (F-LoRA's optimizer), vectorised numpy, ask/tell.

The DFO-LoRA reference code does not include the Fireworks Algorithm; these follow the
papers. A firework is a point; each generation it "explodes" into sparks scattered
uniformly within its explosion amplitude A, the sparks are scored, and the next
fireworks are selected among fireworks and sparks. Minimisation throughout.

Variants (registry names):

- "fwa"    Tan & Zhu, "Fireworks Algorithm for Optimization", ICSI 2010.
    Spark counts  s_i = m (y_max - f_i + eps) / (sum_j (y_max - f_j) + eps), bounded to
                  [round(a m), round(b m)] (a = 0.04, b = 0.8);
    amplitudes    A_i = A_hat (f_i - y_min + eps) / (sum_j (f_j - y_min) + eps);
    explosion     z = round(d U(0,1)) randomly chosen dimensions all move by the same
                  h = A_i U(-1,1);
    Gaussian      m_hat sparks: a random firework, z random dimensions multiplied by
                  g ~ N(1,1);
    mapping       out-of-bounds x_k -> x_min + |x_k| mod (x_max - x_min);
    selection     keep the best; the other n-1 drawn with probability proportional to
                  R(x_i) = sum_j ||x_i - x_j|| (distance-based, favours sparse regions).
    Paper defaults: n = 5 fireworks, m = 50 sparks, m_hat = 5, a = 0.04, b = 0.8,
    A_hat = 40 on [-100, 100]^d.
- "efwa"   Zheng, Janecek & Tan, "Enhanced Fireworks Algorithm", IEEE CEC 2013.
    As FWA with: minimal amplitude check A_i >= A_min(t),
                  A_min(t) = A_init - (A_init - A_final)/E sqrt((2E - t) t)
                  (t evaluations so far, E the evaluation budget; decreases nonlinearly
                  from A_init to A_final; paper A_init = 0.02, A_final = 0.001 x range);
    explosion     every dimension moves with probability 1/2, each by its own
                  A_i U(-1,1);
    mapping       out-of-bounds x_k -> uniform random in [x_min, x_max];
    Gaussian      x_k += (xbest_k - x_k) e, e ~ N(0,1), on a random half of the
                  dimensions of a random firework (pulls towards the best firework);
    selection     elitism-random: keep the best, the other n-1 uniformly at random.
- "dynfwa" Zheng, Janecek, Li & Tan, "Dynamic Search in Fireworks Algorithm",
           IEEE CEC 2014. The DEFAULT of the family.
    EFWA without Gaussian sparks and without the minimal amplitude check; the best
    firework (core firework, CF) gets a dynamic amplitude instead of the fitness-based
    one: A_CF *= Ca = 1.2 if a spark improved on the CF this generation, else
    A_CF *= Cr = 0.9. Non-core fireworks keep the FWA amplitude formula (A_hat = 40 on
    [-100, 100]^d in the authors' code).
- "bbfwa"  Li & Tan, "The bare bones fireworks algorithm: A minimalist global optimizer",
           Applied Soft Computing 62 (2018).
    One firework x; n sparks uniform in the box [x - A, x + A]^d (all dimensions);
    out-of-bounds coordinates uniform random in bounds; if the best spark beats x it
    becomes x and A *= Ca = 1.2, otherwise A *= Cr = 0.9. Papers start with A = range.

Adaptation to this project (documented, not in the papers):

- Budget: every ask() returns exactly `popsize` rows, so budgets compare with CMA-ES.
  The total sparks per generation are `popsize`: `n_gaussian` Gaussian sparks (FWA/EFWA)
  and m = popsize - n_gaussian explosion sparks, apportioned to the fireworks by the
  spark-count rule and rounded by largest remainders so that they sum to m exactly
  (each firework gets at least max(1, round(a m)) and at most
  max(round(b m), ceil(m/n)) sparks).
- Start: z = 0 is the unmodified model, so the first generation is z = 0 (row 0) plus
  popsize - 1 points uniform in [-A0, A0]^d around it, A0 = `init_amplitude` =
  sqrt(3) sigma (uniform noise of per-coordinate std sigma, like CMA-ES's first
  population). The first fireworks are selected from this population with the
  variant's selection rule. For dynFWA/BBFWA it counts as the explosion of the starting
  firework z = 0, so the Ca/Cr rule applies, and A0 is the initial CF/BBFWA amplitude
  (the papers' "whole range" has no meaning in an unbounded space).
- Search space: R^dim around 0 has no natural box; the variants need one (mapping
  rules). Default box [-bound, bound]^d with bound = 5 sigma. Paper amplitudes are
  fractions of the range; for the default box (range 10 sigma) they become
  A_hat = 0.2 x range = 2 sigma, A_init = 0.02 x range = 0.2 sigma,
  A_final = 0.001 x range = 0.01 sigma, the defaults here (in units of sigma, so they
  do not grow when a wider box is asked for).
- EFWA needs its evaluation budget E (`max_evals`); default 100 generations
  (100 x popsize evaluations, the order of a layer's optimizer in our use).
- eps in the count/amplitude formulas is the float64 machine epsilon, as in the papers
  ("the smallest constant in the computer"). Fitness-based rules replace +inf losses by
  the worst finite one.
- FWA's distance-based selection draws the n-1 fireworks without replacement.

State: the numpy Generator (PCG64) state, the fireworks and their losses, the dynamic
amplitude, the counters and the pending sparks: `load_state_dict` continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.optim.base import (
    Optimizer,
    check_float,
    check_int,
    check_options,
    rng_from_state,
    rng_state_dict,
)
from dfo_lora.optim.registry import FIREWORKS_NAMES, OPTIMIZERS

_EPS = float(np.finfo(np.float64).eps)
_SQRT3 = math.sqrt(3.0)


def apportion(targets: np.ndarray, total: int, low: int, high: int) -> np.ndarray:
    """Integers in [low, high] summing to `total`, close to the real `targets`
    (clipped to [low, high], then largest-remainder rounding). Needs
    len * low <= total <= len * high."""
    t = np.clip(targets, low, high)
    counts = np.clip(np.floor(t), low, high).astype(np.int64)
    remainder = t - counts
    while counts.sum() < total:
        room = np.flatnonzero(counts < high)
        for i in room[np.argsort(-remainder[room], kind="stable")]:
            if counts.sum() == total:
                break
            counts[i] += 1
            remainder[i] -= 1.0
    while counts.sum() > total:
        room = np.flatnonzero(counts > low)
        for i in room[np.argsort(remainder[room], kind="stable")]:
            if counts.sum() == total:
                break
            counts[i] -= 1
            remainder[i] += 1.0
    return counts


def _finite_for_rules(losses: np.ndarray) -> np.ndarray:
    """+inf -> the worst finite loss (all +inf -> zeros), for the fitness-based rules."""
    finite = np.isfinite(losses)
    if finite.all():
        return losses
    if not finite.any():
        return np.zeros_like(losses)
    return np.where(finite, losses, losses[finite].max())


class Fireworks(Optimizer):
    """FWA / EFWA / dynFWA / BBFWA (pick with `name`), all sharing this class.

    Options (defaults in brackets; sigma is the constructor's):
      n_fireworks   number of fireworks n                   [5]  (fwa, efwa, dynfwa)
      n_gaussian    Gaussian sparks per generation          [round(popsize * 5/55)] (fwa, efwa)
      a, b          spark-count bounds, 0 < a < b <= 1      [0.04, 0.8]
      amplitude     A_hat, fitness-based amplitude scale    [2 sigma]
      min_amplitude_start / min_amplitude_end
                    EFWA's A_init / A_final                 [0.2 sigma / 0.01 sigma]
      max_evals     EFWA's evaluation budget E              [100 * popsize]
      ca, cr        amplification / reduction               [1.2, 0.9] (dynfwa, bbfwa)
      init_amplitude  spread of the first population; initial CF (dynfwa) or
                    firework (bbfwa) amplitude              [sqrt(3) sigma]
      bound         search box [-bound, bound]^dim          [5 sigma]
    """

    def __init__(
        self, name: str, dim: int, popsize: int, sigma: float, seed: int, **options: Any
    ) -> None:
        if name not in FIREWORKS_NAMES:
            raise UserError(f"optimizer.name: {name!r} is not a Fireworks variant")
        check_options(name, options, OPTIMIZERS[name].options)
        super().__init__(name, dim, popsize, sigma, seed, options)
        self._resolve_options()
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self._fireworks: np.ndarray | None = None  # (n, dim), best first; None before gen 0
        self._fire_losses: np.ndarray | None = None  # (n,)
        self._dyn_amplitude = self.init_amplitude  # dynFWA's core / BBFWA's amplitude

    def _resolve_options(self) -> None:
        name, opt, sigma = self.name, self.options, self.sigma

        def num(key: str, default: float, **kw: Any) -> float:
            value = opt.get(key)
            return default if value is None else check_float(f"{name}.{key}", value, **kw)

        self.bound = num("bound", 5.0 * sigma, positive=True)
        self.init_amplitude = num("init_amplitude", _SQRT3 * sigma, positive=True)
        self.amplitude = num("amplitude", 2.0 * sigma, positive=True)
        self.ca = num("ca", 1.2, low=1.0)
        self.cr = num("cr", 0.9, low=0.0, high=1.0, low_open=True)
        self.a = num("a", 0.04, low=0.0, high=1.0, low_open=True, high_open=True)
        self.b = num("b", 0.8, low=0.0, high=1.0, low_open=True)
        if self.a >= self.b:
            raise UserError(f"{name}.a: {self.a} must be below {name}.b ({self.b})")
        self.min_amplitude_start = num("min_amplitude_start", 0.2 * sigma, positive=True)
        self.min_amplitude_end = num("min_amplitude_end", 0.01 * sigma, positive=True)
        if self.min_amplitude_end > self.min_amplitude_start:
            raise UserError(
                f"{name}.min_amplitude_end: {self.min_amplitude_end} is above "
                f"min_amplitude_start {self.min_amplitude_start}"
            )
        max_evals = opt.get("max_evals")
        self.max_evals = (
            100 * self.popsize
            if max_evals is None
            else check_int(f"{name}.max_evals", max_evals, minimum=1)
        )

        if name in ("fwa", "efwa"):
            n_gaussian = opt.get("n_gaussian")
            if n_gaussian is None:
                n_gaussian = int(round(self.popsize * 5 / 55))
            self.n_gaussian = check_int(f"{name}.n_gaussian", n_gaussian, minimum=0)
            if self.n_gaussian >= self.popsize:
                raise UserError(
                    f"{name}.n_gaussian: {self.n_gaussian} leaves no explosion sparks "
                    f"(popsize {self.popsize})"
                )
        else:
            self.n_gaussian = 0
        self.n_sparks = self.popsize - self.n_gaussian  # explosion sparks per generation

        if name == "bbfwa":
            self.n_fireworks = 1
        else:
            n_fw = opt.get("n_fireworks")
            n_fw = min(5, self.n_sparks) if n_fw is None else n_fw
            self.n_fireworks = check_int(f"{name}.n_fireworks", n_fw, minimum=1)
        m, n = self.n_sparks, self.n_fireworks
        if n > m:
            extra = (
                f" (popsize {self.popsize} - n_gaussian {self.n_gaussian})"
                if self.n_gaussian
                else ""
            )
            raise UserError(
                f"{name}.n_fireworks: {n} is more than the {m} explosion sparks per generation{extra}"
            )
        self.min_sparks = max(1, int(round(self.a * m)))
        self.max_sparks = max(int(round(self.b * m)), math.ceil(m / n), self.min_sparks)
        if n * self.min_sparks > m:
            raise UserError(
                f"{name}.n_fireworks: {n} fireworks x at least {self.min_sparks} sparks each "
                f"(a = {self.a}) is more than the {m} explosion sparks per generation"
            )

    # -- ask ----------------------------------------------------------------------------

    def _ask(self) -> np.ndarray:
        if self._fireworks is None:  # generation 0: z = 0 and its neighbourhood
            spread = self._rng.uniform(-1.0, 1.0, (self.popsize - 1, self.dim))
            first = np.vstack([np.zeros((1, self.dim)), self.init_amplitude * spread])
            return self._map(first)
        if self.name == "bbfwa":
            x = self._fireworks[0]
            offsets = self._rng.uniform(-1.0, 1.0, (self.popsize, self.dim))
            return self._map(x + self._dyn_amplitude * offsets)
        counts, amplitudes = self._counts_and_amplitudes()
        sparks = self._explode(counts, amplitudes)
        if self.n_gaussian:
            sparks = np.vstack([sparks, self._gaussian_sparks()])
        return sparks

    def _counts_and_amplitudes(self) -> tuple[np.ndarray, np.ndarray]:
        """FWA's spark counts (summing to n_sparks) and amplitudes per firework."""
        f = _finite_for_rules(self._fire_losses)
        with np.errstate(over="ignore", invalid="ignore"):
            to_max = f.max() - f
            weights = (to_max + _EPS) / (to_max.sum() + _EPS)
            to_min = f - f.min()
            amplitudes = self.amplitude * (to_min + _EPS) / (to_min.sum() + _EPS)
        n = self.n_fireworks
        if not np.isfinite(weights).all() or weights.sum() <= 0:  # overflowing losses
            weights = np.full(n, 1.0 / n)
        if not np.isfinite(amplitudes).all():
            amplitudes = np.full(n, self.amplitude / n)
        targets = self.n_sparks * weights / weights.sum()
        counts = apportion(targets, self.n_sparks, self.min_sparks, self.max_sparks)
        if self.name == "efwa":  # minimal explosion amplitude check (EFWA)
            amplitudes = np.maximum(amplitudes, self._min_amplitude())
        elif self.name == "dynfwa":  # the core firework (index 0, the best) is dynamic
            amplitudes[0] = self._dyn_amplitude
        return counts, amplitudes

    def _min_amplitude(self) -> float:
        """EFWA: A_init - (A_init - A_final)/E * sqrt((2E - t) t), t = evaluations so far."""
        big_e = float(self.max_evals)
        t = min(float(self.evaluations), big_e)
        start, end = self.min_amplitude_start, self.min_amplitude_end
        return start - (start - end) / big_e * math.sqrt((2.0 * big_e - t) * t)

    def _random_dims(self, rows: int) -> np.ndarray:
        """FWA: for each row, z = round(d U(0,1)) distinct dimensions chosen at random."""
        z = np.rint(self.dim * self._rng.random(rows)).astype(np.int64)
        ranks = np.argsort(np.argsort(self._rng.random((rows, self.dim)), axis=1), axis=1)
        return ranks < z[:, None]

    def _explode(self, counts: np.ndarray, amplitudes: np.ndarray) -> np.ndarray:
        owner = np.repeat(np.arange(self.n_fireworks), counts)  # (m,) firework of each spark
        base = self._fireworks[owner]  # (m, d)
        amp = amplitudes[owner]  # (m,)
        m = base.shape[0]
        if self.name == "fwa":  # same displacement h on z random dimensions
            mask = self._random_dims(m)
            h = amp * self._rng.uniform(-1.0, 1.0, m)
            sparks = np.where(mask, base + h[:, None], base)
        else:  # EFWA/dynFWA: each dimension w.p. 1/2, its own displacement
            mask = self._rng.random((m, self.dim)) < 0.5
            offsets = amp[:, None] * self._rng.uniform(-1.0, 1.0, (m, self.dim))
            sparks = np.where(mask, base + offsets, base)
        return self._map(sparks)

    def _gaussian_sparks(self) -> np.ndarray:
        k = self.n_gaussian
        base = self._fireworks[self._rng.integers(0, self.n_fireworks, k)]  # (k, d)
        if self.name == "fwa":  # multiply z random dimensions by g ~ N(1, 1)
            mask = self._random_dims(k)
            g = self._rng.normal(1.0, 1.0, k)
            sparks = np.where(mask, base * g[:, None], base)
        else:  # EFWA: move a random half of the dimensions towards the best firework
            mask = self._rng.random((k, self.dim)) < 0.5
            e = self._rng.normal(0.0, 1.0, k)
            best = self._fireworks[0]
            sparks = np.where(mask, base + (best - base) * e[:, None], base)
        return self._map(sparks)

    def _map(self, x: np.ndarray) -> np.ndarray:
        """Bring out-of-box coordinates back: FWA modular, the others uniform random."""
        bound = self.bound
        out = (x < -bound) | (x > bound)
        if not out.any():
            return x
        x = x.copy()
        if self.name == "fwa":
            x[out] = -bound + np.mod(np.abs(x[out]), 2.0 * bound)
        else:
            x[out] = self._rng.uniform(-bound, bound, int(out.sum()))
        return x

    # -- tell ---------------------------------------------------------------------------

    def _tell(self, losses: np.ndarray) -> None:
        sparks = self._pending
        if self._fireworks is None:  # generation 0: row 0 is z = 0, the rest its sparks
            pool, pool_f = sparks, losses
            parent_f, spark_f = losses[0], losses[1:]
        else:
            pool = np.vstack([self._fireworks, sparks])
            pool_f = np.concatenate([self._fire_losses, losses])
            parent_f, spark_f = self._fire_losses[0], losses
        if self.name in ("dynfwa", "bbfwa"):  # dynamic amplitude of the core firework
            improved = spark_f.min() < parent_f
            self._dyn_amplitude *= self.ca if improved else self.cr
        chosen = self._select(pool, pool_f)
        self._fireworks = pool[chosen].copy()
        self._fire_losses = pool_f[chosen].copy()

    def _select(self, pool: np.ndarray, pool_f: np.ndarray) -> np.ndarray:
        """Indices of the next fireworks, the best first (ties: the earliest, so an
        existing firework is kept over an equal spark)."""
        best = int(np.argmin(pool_f))
        n = self.n_fireworks
        if n == 1:
            return np.array([best])
        rest = np.delete(np.arange(pool.shape[0]), best)
        if self.name == "fwa":  # distance-based: p ~ sum of distances to all others
            dist = np.array([np.linalg.norm(pool - x, axis=1).sum() for x in pool])[rest]
            if np.count_nonzero(dist) >= n - 1 and np.isfinite(dist).all():
                others = self._rng.choice(rest, size=n - 1, replace=False, p=dist / dist.sum())
            else:  # (nearly) all points coincide
                others = self._rng.choice(rest, size=n - 1, replace=False)
        else:  # elitism-random selection (EFWA, dynFWA)
            others = self._rng.choice(rest, size=n - 1, replace=False)
        return np.concatenate([[best], others]).astype(np.int64)

    # -- the rest of the interface -----------------------------------------------------

    @property
    def mean(self) -> np.ndarray:
        """The core (best) firework; z = 0 before the first tell."""
        if self._fireworks is None:
            return np.zeros(self.dim)
        return self._fireworks[0].copy()

    @property
    def fireworks(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(fireworks (n, dim), their losses (n,)), best first; None before the first tell."""
        if self._fireworks is None:
            return None
        return self._fireworks.copy(), self._fire_losses.copy()

    @property
    def dynamic_amplitude(self) -> float:
        """dynFWA's core-firework amplitude / BBFWA's amplitude (unused by fwa/efwa)."""
        return self._dyn_amplitude

    def _state(self) -> dict:
        return {
            **rng_state_dict(self._rng),
            "fireworks": None if self._fireworks is None else self._fireworks.copy(),
            "fire_losses": None if self._fire_losses is None else self._fire_losses.copy(),
            "dynamic_amplitude": self._dyn_amplitude,
        }

    def _load_state(self, state: dict, *, generation: int, pending: np.ndarray | None) -> None:
        where = f"{self.name} optimizer state"
        try:
            rng = rng_from_state(state)
            fireworks, fire_losses = state["fireworks"], state["fire_losses"]
            if (fireworks is None) != (generation == 0) or (fireworks is None) != (
                fire_losses is None
            ):
                raise ValueError("fireworks present/absent does not match the generation")
            if fireworks is not None:
                fireworks = np.array(fireworks, dtype=np.float64).reshape(
                    self.n_fireworks, self.dim
                )
                fire_losses = np.array(fire_losses, dtype=np.float64).reshape(self.n_fireworks)
            dyn = float(state["dynamic_amplitude"])
        except KeyError as exc:
            raise UserError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed ({exc})") from None
        if not (math.isfinite(dyn) and dyn > 0):
            raise UserError(f"{where}: dynamic_amplitude {dyn} must be finite and > 0")
        self._rng = rng
        self._fireworks, self._fire_losses = fireworks, fire_losses
        self._dyn_amplitude = dyn
