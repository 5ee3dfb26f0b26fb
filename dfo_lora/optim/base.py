"""The ask/tell interface shared by every optimizer, and the one factory that builds them.

An optimizer searches one layer's subspace vector z (length `dim`). Each generation it
hands out `popsize` candidates with `ask()`, gets their losses back with `tell()`, and
updates its state. It never sees the model: the search loop scores the candidates.

Contract (all optimizers):

- `ask()` returns a fresh (popsize, dim) float64 array. Until `tell()` is called, `ask()`
  is idempotent: it returns the same candidates again (a retried or resumed generation
  scores exactly what was asked, nothing is sampled twice).
- `tell(candidates, losses)` takes exactly the rows of the pending `ask()` and one loss
  per row. NaN, +inf and -inf losses count as the worst loss (+inf) and never reach the
  optimizer's state.
- `best` is the best-ever candidate and its loss (`xbest`, what the layer-wise loop
  commits); `(zeros, inf)` before any finite loss was told.
- `mean` is the distribution centre (CMA-ES) or the core firework (Fireworks family).
- `state_dict()` holds only JSON values (str/int/float/bool/None, lists, dicts) and numpy
  arrays; `load_state_dict()` continues bit for bit like the optimizer that saved it.
- Randomness comes only from the optimizer's own seeded generator; the global numpy
  random state is left as it was found.

Bad configuration raises `UserError` naming the field (`fwa.n_fireworks: ...`); misuse of
the API by calling code (tell without ask, wrong shapes) raises `ValueError`/`RuntimeError`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.optim.registry import (  # noqa: F401 - the names are re-exported here
    CMA_NAMES,
    FIREWORKS_NAMES,
    OPTIMIZER_NAMES,
    optimizer_entry,
)

STATE_VERSION = 1  # bump when the layout of state_dict() changes


# ---------------------------------------------------------------------------------------
# Small validators: each raises UserError with a one-line message naming the field.


def check_int(field_name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{field_name}: {value!r} is not an integer")
    value = int(value)
    if minimum is not None and value < minimum:
        raise UserError(f"{field_name}: {value} must be at least {minimum}")
    return value


def check_float(
    field_name: str,
    value: Any,
    *,
    positive: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{field_name}: {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise UserError(f"{field_name}: {value} must be finite")
    if positive and value <= 0:
        raise UserError(f"{field_name}: {value} must be > 0")
    if low is not None and (value < low or (low_open and value == low)):
        raise UserError(f"{field_name}: {value} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise UserError(f"{field_name}: {value} must be {'<' if high_open else '<='} {high}")
    return value


def check_seed(field_name: str, value: Any) -> int:
    seed = check_int(field_name, value, minimum=0)
    if seed >= 2**32:
        raise UserError(f"{field_name}: {seed} must be below 2**32")
    return seed


def check_options(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """UserError naming the first option key that `name` does not take."""
    for key in options:
        if key not in allowed:
            raise UserError(
                f"{name}.{key}: unknown option for optimizer '{name}'{did_you_mean(key, allowed)}"
                f" (options: {', '.join(allowed) or 'none'})"
            )


def json_normal(field_name: str, value: Any) -> Any:
    """`value` as JSON would give it back (tuples -> lists); UserError if not JSON-safe."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            raise UserError(f"{field_name}: {value} must be finite")
        return float(value)
    if isinstance(value, (list, tuple)):
        return [json_normal(field_name, v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{field_name}: key {k!r} is not a string")
            out[k] = json_normal(f"{field_name}.{k}", v)
        return out
    raise UserError(f"{field_name}: {value!r} is not a JSON value (number, string, list, dict)")


def rng_state_dict(rng: np.random.Generator) -> dict:
    """A PCG64 generator's state as JSON values (128-bit integers as decimal strings, exact
    in any JSON reader), for an optimizer's `state_dict()`."""
    bg = rng.bit_generator.state
    if bg["bit_generator"] != "PCG64":
        raise ValueError(f"bit generator {bg['bit_generator']!r} is not PCG64")
    return {
        "rng_bit_generator": bg["bit_generator"],
        "rng_state": str(bg["state"]["state"]),
        "rng_inc": str(bg["state"]["inc"]),
        "rng_has_uint32": int(bg["has_uint32"]),
        "rng_uinteger": int(bg["uinteger"]),
    }


def rng_from_state(state: dict) -> np.random.Generator:
    """The generator `rng_state_dict` saved; KeyError/ValueError/TypeError when malformed."""
    if state["rng_bit_generator"] != "PCG64":
        raise ValueError(f"bit generator {state['rng_bit_generator']!r} is not PCG64")
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": int(state["rng_state"]), "inc": int(state["rng_inc"])},
        "has_uint32": int(state["rng_has_uint32"]),
        "uinteger": int(state["rng_uinteger"]),
    }
    return rng


def sanitize_losses(losses: np.ndarray) -> np.ndarray:
    """NaN/+inf/-inf -> +inf (the worst loss), as a new float64 array."""
    losses = np.asarray(losses, dtype=np.float64)
    return np.where(np.isfinite(losses), losses, np.inf)


# ---------------------------------------------------------------------------------------


class Optimizer(ABC):
    """An ask/tell black-box minimizer over R^dim with a bit-exact `state_dict()`.

    Subclasses implement `_ask()` (sample a generation), `_tell(losses)` (update from the
    sanitized losses of the pending candidates), `mean`, and `_state()` / `_load_state()`
    for their own fields. This base class owns the pending-ask bookkeeping, the best-ever
    tracking, the generation/evaluation counters and the common part of the state.
    """

    name: str  # its name in registry.OPTIMIZERS: "cma", "cma_diag", "fwa", "efwa", ...
    # How far a loaded state's replay landed from the saved one (relative); None when it
    # was restored bit for bit (always, except CMA-ES replayed on another CPU kind)
    replay_drift: float | None = None

    def __init__(
        self, name: str, dim: int, popsize: int, sigma: float, seed: int, options: dict
    ) -> None:
        self.name = name
        self.dim = check_int(f"{name}.dim", dim, minimum=1)
        self.popsize = check_int(f"{name}.popsize", popsize, minimum=2)
        self.sigma = check_float(f"{name}.sigma", sigma, positive=True)
        self.seed = check_seed(f"{name}.seed", seed)
        # as given, in JSON-normal form (tuples -> lists) so a saved state compares equal
        self.options = {k: json_normal(f"{name}.{k}", v) for k, v in options.items()}
        self.generation = 0  # number of completed tell()s
        self.evaluations = 0  # number of candidates told
        self._pending: np.ndarray | None = None  # (popsize, dim) candidates awaiting tell()
        self._best_x = np.zeros(self.dim)
        self._best_f = math.inf

    # -- public interface ---------------------------------------------------------------

    def ask(self) -> np.ndarray:
        """(popsize, dim) float64 candidates; the same ones again until `tell()`."""
        if self._pending is None:
            candidates = np.ascontiguousarray(self._ask(), dtype=np.float64)
            assert candidates.shape == (self.popsize, self.dim), candidates.shape
            self._pending = candidates
        return self._pending.copy()

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        """Report the losses of the pending candidates (same rows, same order)."""
        if self._pending is None:
            raise RuntimeError(f"{self.name}: tell() called without a pending ask()")
        candidates = np.asarray(candidates, dtype=np.float64)
        if candidates.shape != self._pending.shape or not np.array_equal(candidates, self._pending):
            raise ValueError(
                f"{self.name}: tell() needs exactly the {self.popsize} x {self.dim} candidates "
                f"of the last ask(), got an array of shape {candidates.shape} that differs"
            )
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if losses.shape != (self.popsize,):
            raise ValueError(
                f"{self.name}: tell() needs {self.popsize} losses, got {losses.shape[0]}"
            )
        losses = sanitize_losses(losses)
        self._update_best(self._pending, losses)
        self._tell(losses)
        self._pending = None
        self.generation += 1
        self.evaluations += self.popsize

    @property
    def best(self) -> tuple[np.ndarray, float]:
        """(xbest, fbest): the best-ever candidate and its loss; (zeros, inf) before any."""
        return self._best_x.copy(), self._best_f

    @property
    @abstractmethod
    def mean(self) -> np.ndarray:
        """The distribution centre / core firework (what a 'commit mean' rule installs)."""

    def _identity(self) -> dict:
        """The configuration a saved state must match to be loaded into this optimizer."""
        return {
            "name": self.name,
            "version": STATE_VERSION,
            "dim": self.dim,
            "popsize": self.popsize,
            "sigma": self.sigma,
            "seed": self.seed,
            "options": self.options,
        }

    def state_dict(self) -> dict:
        """JSON values and numpy arrays only (no pickle); see `load_state_dict`."""
        state = {
            **self._identity(),
            "options": dict(self.options),
            "generation": self.generation,
            "evaluations": self.evaluations,
            "best_x": self._best_x.copy(),
            "best_loss": None if math.isinf(self._best_f) else self._best_f,
            "pending": None if self._pending is None else self._pending.copy(),
        }
        state.update(self._state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by an optimizer built with the same name/dim/popsize/
        sigma/seed/options; afterwards this one continues exactly like the saved one.
        UserError when the state does not belong to this configuration or is corrupt."""
        where = f"{self.name} optimizer state"
        try:
            for key, value in self._identity().items():
                if state[key] != value:
                    raise UserError(
                        f"{where}: {key} is {state[key]!r} in the saved state but {value!r} here"
                    )
            generation = int(state["generation"])
            evaluations = int(state["evaluations"])
            best_x = np.array(state["best_x"], dtype=np.float64).reshape(self.dim)
            best_f = math.inf if state["best_loss"] is None else float(state["best_loss"])
            pending = state["pending"]
            if pending is not None:
                pending = np.ascontiguousarray(pending, dtype=np.float64).reshape(
                    self.popsize, self.dim
                )
        except KeyError as exc:
            raise UserError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed ({exc})") from None
        if evaluations != generation * self.popsize:
            raise UserError(f"{where}: evaluations {evaluations} != generation x popsize")
        # Subclass first: it validates everything before anything here is changed.
        self._load_state(state, generation=generation, pending=pending)
        self.generation = generation
        self.evaluations = evaluations
        self._best_x = best_x
        self._best_f = best_f
        self._pending = pending

    # -- for subclasses -----------------------------------------------------------------

    @abstractmethod
    def _ask(self) -> np.ndarray:
        """Sample one generation: (popsize, dim)."""

    @abstractmethod
    def _tell(self, losses: np.ndarray) -> None:
        """Update from the losses (finite or +inf) of `self._pending`."""

    @abstractmethod
    def _state(self) -> dict:
        """The subclass's own fields for `state_dict()`."""

    @abstractmethod
    def _load_state(self, state: dict, *, generation: int, pending: np.ndarray | None) -> None:
        """Validate and install the subclass's fields; raise UserError before changing
        anything when the state is unusable."""

    def _update_best(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        i = int(np.argmin(losses))  # first of equal minima, like pycma
        if losses[i] < self._best_f:
            self._best_f = float(losses[i])
            self._best_x = candidates[i].copy()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, popsize={self.popsize}, "
            f"sigma={self.sigma}, seed={self.seed}, generation={self.generation})"
        )


# ---------------------------------------------------------------------------------------


@dataclass
class OptimizerConfig:
    """Which optimizer a layer gets, as it appears in a run's configuration."""

    name: str = "cma"  # a name in registry.OPTIMIZERS (cma = C-LoRA, the paper's)
    popsize: int = 20  # candidates per generation (paper: 20)
    sigma: float = 1.0  # initial step size; the Fireworks family derives its amplitudes from it
    seed: int = 0  # each layer's optimizer should get its own (e.g. seed + layer)
    options: dict[str, Any] = field(
        default_factory=dict
    )  # per-optimizer extras, see make_optimizer

    def validate(self, dim: int = 1) -> None:
        """UserError naming the first bad field (builds a throw-away optimizer)."""
        self.build(dim)

    def build(self, dim: int, seed: int | None = None) -> Optimizer:
        """The optimizer for a `dim`-dimensional subspace (seed overrides `self.seed`)."""
        return make_optimizer(
            self.name,
            dim,
            self.popsize,
            self.sigma,
            self.seed if seed is None else seed,
            **self.options,
        )


def make_optimizer(
    name: str, dim: int, popsize: int, sigma: float, seed: int, **options: Any
) -> Optimizer:
    """Build an optimizer by its name in `registry.OPTIMIZERS`.

    name: "cma" (full covariance CMA-ES, pycma), "cma_diag" (separable CMA-ES,
    `CMA_diagonal=True`), "fwa" (Tan & Zhu 2010), "efwa" (Zheng, Janecek & Tan 2013),
    "dynfwa" (Zheng, Janecek, Li & Tan 2014; the Fireworks default) or "bbfwa" (Li & Tan 2018).
    All start from z = 0 (the unmodified model) with initial scale `sigma`. The options
    each name takes are listed in the registry and documented in `cma_es.CMAES` and
    `fireworks.Fireworks`; an unknown option key raises UserError naming it.
    """
    cls = optimizer_entry(name).load()
    return cls(name, dim, popsize, sigma, seed, **options)


def optimizer_from_state(state: dict) -> Optimizer:
    """Rebuild an optimizer from its `state_dict()` alone (config is stored in it)."""
    try:
        opt = make_optimizer(
            state["name"],
            state["dim"],
            state["popsize"],
            state["sigma"],
            state["seed"],
            **state["options"],
        )
    except KeyError as exc:
        raise UserError(f"optimizer state: missing field {exc.args[0]!r}") from None
    opt.load_state_dict(state)
    return opt
