"""CMA-ES (C-LoRA's optimizer) on the real pycma, behind the ask/tell interface.

`CMAES("cma", ...)` is exactly the reference code's
`cma.CMAEvolutionStrategy(np.zeros(dim), sigma, {"popsize": popsize, "seed": seed})`
(plus verbosity/logging switched off): for a seed > 0 it asks the very same candidates
(tested). `CMAES("cma_diag", ...)` adds `CMA_diagonal=True` (separable CMA-ES, O(dim)
per sample instead of O(dim^2), no eigendecomposition).

Randomness. pycma samples from the GLOBAL legacy `np.random` state (its `randn` option
defaults to `np.random.randn`, and the `seed` option calls `np.random.seed`). Every
pycma call made here (construction, ask, tell) runs inside `_own_rng`, which saves the
global state, installs this optimizer's own MT19937 state, and restores the global one
afterwards, keeping the advanced own state. pycma's `seed` option is set to NaN so that
it never seeds the global generator itself (pycma treats seed 0 as "seed from the
clock"); the own state starts as `np.random.RandomState(seed)`, which is what
`np.random.seed(seed)` would give. Not thread-safe with respect to other threads that
use `np.random` at the same moment (Ray actors are processes, so that is fine).

What was checked in pycma 4.5 (evolution_strategy.py, sampler.py, utilities/utils.py):
- All sampling goes through `opts['randn']`; the only other `np.random` uses are in
  features that are off by default (TPA step-size adaptation, integer variables,
  restarts in `fmin`), and construction and `tell` draw nothing with default options.
- `tell` does not need the array objects returned by `ask`: it finds each solution's
  genotype in `sent_solutions`, a dict keyed by `hash(x.tobytes())`, i.e. by content.
  A solution it does not know is "repaired" (its step length may be clipped) and treated
  as injected, which would change the update. `Optimizer.tell` therefore insists on the
  exact rows of the last ask, and this class passes pycma its own arrays.
- Time: `ask` starts an `ElapsedWCTime` timer, used only for display and the `timeout`
  stop criterion (`stop()`, never called here). With `verbose=-9, verb_disp=0,
  verb_log=0` nothing is printed and no `outcmaes/` files are written.
- pycma dislikes inf/NaN f-values; non-finite losses are told as a finite value worse
  than every finite loss of the generation (CMA-ES uses only the ranking).

State without pickle: replay. pycma's state is a large object graph (sampler, paths,
archives, recorded histories) with no supported serialisation except pickle. But pycma
is deterministic given its random numbers and the f-values it is told. So `state_dict()`
stores the configuration, the own RNG state, the history of told losses (one row per
generation, non-finite kept as +inf), whether an ask is pending, a SHA-256 chain over
every asked population, a SHA-256 of the ES's mean/sigma/paths/covariance and a small
probe of those numbers (mean, sigma, paths, the covariance's diagonal and column sums;
cma_diag's variances `sigma_vec.scaling` as `es_scaling`).
`load_state_dict()` builds a fresh ES from the seed and replays `ask()` + `tell(losses)`
for each stored generation: the asks regenerate the same candidates because the RNG is
replayed too. When the hashes and the RNG state match, the optimizer continues bit for
bit (tested over 30 further generations).

Another CPU. OpenBLAS picks its kernels per CPU, so a replay on another CPU kind rounds
differently: measured on two kept checkpoints saved on an Intel AMX machine and replayed
on an AMD EPYC, the best candidate came back 2.4e-8 off (of 8.1) after 58 generations
and at most 9e-16 off after 1 or 2; the hashes differ, the RNG state does not (the
number of draws never depends on rounding). Such a replay is accepted when the RNG state matches exactly and
the replayed probe is within `REPLAY_TOLERANCE` (relative to the probe's largest value,
at least 1) of the saved one; the search then continues from the replayed state, which
equals the saved one up to rounding, and `replay_drift` says how far it was (the run
prints it). A changed loss (one swapped rank moves the mean by about sigma), a changed
pending ask, another pycma, or a state from before the probe that does not replay bit for
bit is refused, and nothing is changed on the optimizer. The tolerance is one scale for
all parts (the probe's largest magnitude, at least 1), so on the same CPU a change of
the state smaller than 1e-6 of that would pass too; the hashes still tell it apart, and
`replay_drift` is then reported as for another CPU. After such a load the optimizer keeps
this CPU's candidate chain, so a later resume here is bit for bit again.

Cost: replay is O(generations) pycma updates, the same arithmetic as the original run
minus the loss evaluations. Measured at dim 500, popsize 20 on the 2-core machine:
~15 ms per generation for full CMA (1.5 s to load a 100-generation state), ~3 ms for
cma_diag. The paper's budget (8000 evaluations, popsize 20, 24 layers) gives each
layer's optimizer ~17 generations, so resuming all layers replays in ~6 s. The stored
history is generations x popsize floats, the probes about 5 x dim floats (4 x dim for
cma_diag).

BLAS threads, measured here: full CMA-ES at dim 300 gave bitwise different candidates
with OPENBLAS_NUM_THREADS=1 than with 2 (LAPACK eigh and matrix products round
differently), and at dim 500 it ran ~25x slower with 2 threads on the busy 2-core
machine. So every pycma call runs with numpy's OpenBLAS pinned to one thread (`_blas`):
runs and replays no longer depend on OMP_NUM_THREADS/OPENBLAS_NUM_THREADS (Ray sets
OMP_NUM_THREADS=1 in its workers). Bit for bit they still depend on the numpy/pycma
versions and the CPU kind (OpenBLAS picks kernels per CPU); the state records them, and
a replay that is not bit for bit is held to `REPLAY_TOLERANCE` as above. Where numpy uses
another BLAS the thread count is not pinned (recorded as `blas_pinned: false`); a
different count then rounds like another CPU.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.optim import _blas
from dfo_lora.optim.base import Optimizer, check_float, check_options
from dfo_lora.optim.registry import CMA_NAMES, OPTIMIZERS

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns at import when matplotlib is missing
    import cma

# pycma options this class sets itself (or that would break determinism/state replay)
_RESERVED_PYCMA = {
    "popsize": "the popsize argument",
    "seed": "the seed argument",
    "randn": "the optimizer's own generator",
    "CMA_diagonal": "name 'cma_diag'",
    "bounds": "the bound option",
    "verbose": None,
    "verb_disp": None,
    "verb_log": None,
    "verb_plot": None,
    "verb_time": None,
    "verb_append": None,
    "verb_filenameprefix": None,
    "verb_log_expensive": None,
}

_QUIET = {"verbose": -9, "verb_disp": 0, "verb_log": 0, "verb_plot": 0, "verb_time": False}

_SUBSTITUTE_CAP = 1e300  # told instead of non-finite losses when nothing is finite

# How far (relative) a replay on another CPU may land from the saved state: rounding
# measured 3e-9 after 58 generations; one swapped rank moves the mean by about sigma.
REPLAY_TOLERANCE = 1e-6


def finite_worst(losses: np.ndarray) -> np.ndarray:
    """Replace +inf (sanitized non-finite) losses by a finite value worse than every
    finite one, so pycma ranks them last without meeting inf/NaN."""
    finite = np.isfinite(losses)
    if finite.all():
        return losses
    if finite.any():
        worst = float(losses[finite].max())
        spread = worst - float(losses[finite].min())
        substitute = min(worst + max(1.0, abs(worst), spread), _SUBSTITUTE_CAP)
        if not substitute > worst:  # worst is already at the cap
            substitute = float(np.nextafter(worst, np.inf))
    else:
        substitute = _SUBSTITUTE_CAP
    return np.where(finite, losses, substitute)


def _threads_env() -> dict[str, Any]:
    """What decides the BLAS arithmetic: pycma's eigendecompositions and matrix products
    round differently with 1 or 2 OpenBLAS threads (measured). pycma calls run pinned to
    one thread where `_blas` finds numpy's OpenBLAS (`blas_pinned`); elsewhere the
    environment's thread count matters."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    return {
        "blas_pinned": _blas.pinned(),
        "cpu_count": os.cpu_count(),
        **{k: os.environ.get(k) for k in keys},
    }


def _numeric_parts(es: cma.CMAEvolutionStrategy) -> list:
    """The ES's numeric state after the last tell (mean, step size, paths, covariance):
    the loss history's last row only shows here, not in any asked population."""
    parts = [es.mean, [es.sigma], getattr(es, "pc", None), getattr(es.adapt_sigma, "ps", None)]
    parts.append(getattr(es.sm, "C", None))
    return [np.asarray(p, dtype=np.float64) for p in parts if p is not None]


def _fingerprint(es: cma.CMAEvolutionStrategy) -> str:
    """SHA-256 of `_numeric_parts`: equal only for a bit-identical state."""
    h = hashlib.sha256()
    for part in _numeric_parts(es):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


def _probe(es: cma.CMAEvolutionStrategy) -> np.ndarray:
    """`_numeric_parts` in a few dim-sized vectors (a full covariance would be dim^2 floats
    per layer in every checkpoint): compared with a tolerance when the hashes differ."""
    rows = []
    for part in _numeric_parts(es):
        if part.ndim == 2:  # the full covariance: its diagonal and column sums
            rows += [np.diagonal(part), part.sum(axis=0)]
        else:
            rows.append(part.reshape(-1))
    return np.concatenate(rows)


def _scaling(es: cma.CMAEvolutionStrategy) -> np.ndarray:
    """cma_diag's variances (`sigma_vec.scaling`), which `_numeric_parts` misses: a second
    probe, kept apart so that states saved before it (without `es_scaling`) still load."""
    scaling = getattr(getattr(es, "sigma_vec", None), "scaling", 1.0)
    return np.atleast_1d(np.asarray(scaling, dtype=np.float64))


def _drift(replayed: np.ndarray, saved: np.ndarray) -> float:
    """Largest difference relative to the saved values' largest magnitude (at least 1), one
    scale for all parts; inf when the shapes differ or a value is not finite."""
    if replayed.shape != saved.shape:
        return math.inf
    drift = float(
        np.abs(replayed - saved).max(initial=0.0) / max(1.0, np.abs(saved).max(initial=0.0))
    )
    return drift if math.isfinite(drift) else math.inf


def _chain(prev: str, candidates: np.ndarray) -> str:
    """Next link of the SHA-256 chain over all asked populations."""
    return hashlib.sha256(bytes.fromhex(prev) + candidates.tobytes()).hexdigest()


_CHAIN_START = hashlib.sha256(b"dfo_lora.optim.cma_es").hexdigest()


class CMAES(Optimizer):
    """CMA-ES (pycma) with an exact, pickle-free `state_dict()`.

    Options:
      bound: float | None = None
          Box [-bound, bound]^dim via pycma's `bounds` (BoundTransform). None (default,
          the paper's) searches all of R^dim.
      pycma_options: dict = {}
          Extra pycma options (JSON values), e.g. {"CMA_active": False}. Keys are checked
          against `cma.CMAOptions()`; those this class sets itself are refused.
    """

    def __init__(
        self, name: str, dim: int, popsize: int, sigma: float, seed: int, **options: Any
    ) -> None:
        if name not in CMA_NAMES:
            raise UserError(f"optimizer.name: {name!r} is not a CMA-ES variant")
        check_options(name, options, OPTIMIZERS[name].options)
        super().__init__(name, dim, popsize, sigma, seed, options)
        bound = self.options.get("bound")
        if bound is not None:
            bound = check_float(f"{name}.bound", bound, positive=True)
        extra = self.options.get("pycma_options") or {}
        if not isinstance(extra, dict):
            raise UserError(f"{name}.pycma_options: {extra!r} is not a mapping")
        known = cma.CMAOptions()
        for key in extra:
            if key in _RESERVED_PYCMA:
                use = _RESERVED_PYCMA[key]
                raise UserError(
                    f"{name}.pycma_options.{key}: set by dfo_lora"
                    + (f"; use {use} instead" if use else "")
                )
            if key not in known:
                raise UserError(f"{name}.pycma_options.{key}: not a pycma option")

        self._pycma_opts: dict[str, Any] = {
            **extra,
            "popsize": self.popsize,
            "seed": np.nan,  # never let pycma seed the global generator; we own the state
            **_QUIET,
        }
        if name == "cma_diag":
            self._pycma_opts["CMA_diagonal"] = True
        if bound is not None:
            self._pycma_opts["bounds"] = [-bound, bound]

        rng_state = np.random.RandomState(self.seed).get_state()  # == np.random.seed(seed)
        try:
            self._es, self._rng_state = self._build_es(rng_state)
        except (ValueError, TypeError, KeyError) as exc:  # a bad pycma option value
            raise UserError(f"{name}.pycma_options: rejected by pycma ({exc})") from None
        self._asked: list[np.ndarray] = []  # pycma's own arrays of the pending ask
        self._history: list[np.ndarray] = []  # told (sanitized) losses, one row per generation
        self._chain = _CHAIN_START

    # -- pycma calls under the own RNG ------------------------------------------------

    @staticmethod
    def _own_rng(rng_state: tuple, fn: Callable[[], Any]) -> tuple[Any, tuple]:
        """Run fn() with `rng_state` as the global np.random state and numpy's BLAS on one
        thread; return fn's result and the advanced state. The caller's global state (and
        BLAS thread count) is restored in every case."""
        outer = np.random.get_state()
        try:
            np.random.set_state(rng_state)
            with _blas.single_thread():
                result = fn()
            return result, np.random.get_state()
        finally:
            np.random.set_state(outer)

    def _build_es(self, rng_state: tuple) -> tuple[cma.CMAEvolutionStrategy, tuple]:
        opts = dict(self._pycma_opts)
        return self._own_rng(
            rng_state, lambda: cma.CMAEvolutionStrategy(np.zeros(self.dim), self.sigma, opts)
        )

    @staticmethod
    def _es_ask(es: cma.CMAEvolutionStrategy, rng_state: tuple) -> tuple[list, tuple]:
        return CMAES._own_rng(rng_state, es.ask)

    @staticmethod
    def _es_tell(
        es: cma.CMAEvolutionStrategy, rng_state: tuple, asked: list, losses: np.ndarray
    ) -> tuple:
        told = finite_worst(losses).tolist()
        _, rng_state = CMAES._own_rng(rng_state, lambda: es.tell(asked, told))
        return rng_state

    # -- Optimizer ----------------------------------------------------------------------

    def _ask(self) -> np.ndarray:
        self._asked, self._rng_state = self._es_ask(self._es, self._rng_state)
        candidates = np.array(self._asked, dtype=np.float64)  # (popsize, dim)
        self._chain = _chain(self._chain, candidates)
        return candidates

    def _tell(self, losses: np.ndarray) -> None:
        self._rng_state = self._es_tell(self._es, self._rng_state, self._asked, losses)
        self._history.append(losses.copy())
        self._asked = []

    @property
    def mean(self) -> np.ndarray:
        """pycma's distribution mean, as a phenotype (inside the box when bounded)."""
        es = self._es
        return np.array(
            es.gp.pheno(es.mean, copy=True, into_bounds=es.boundary_handler.repair),
            dtype=np.float64,
        )

    @property
    def es(self) -> cma.CMAEvolutionStrategy:
        """The underlying pycma object, for inspection only (`es.sigma`, `es.result`...).
        Calling its ask/tell directly bypasses the own-RNG wrapper and the state."""
        return self._es

    def _state(self) -> dict:
        _, keys, pos, has_gauss, cached = self._rng_state
        return {
            "pycma_version": cma.__version__,
            "numpy_version": np.__version__,
            "threads": _threads_env(),
            "loss_history": (
                np.stack(self._history)
                if self._history
                else np.zeros((0, self.popsize), dtype=np.float64)
            ),
            "candidates_sha256": self._chain,
            "es_sha256": _fingerprint(self._es),
            "es_probe": _probe(self._es),
            "es_scaling": _scaling(self._es),
            "rng_mt19937_keys": np.asarray(keys, dtype=np.uint32).copy(),
            "rng_pos": int(pos),
            "rng_has_gauss": int(has_gauss),
            "rng_cached_gaussian": float(cached),
        }

    def _load_state(self, state: dict, *, generation: int, pending: np.ndarray | None) -> None:
        where = f"{self.name} optimizer state"
        try:
            history = np.asarray(state["loss_history"], dtype=np.float64)
            if history.size == 0:
                history = history.reshape(0, self.popsize)
            saved_chain = str(state["candidates_sha256"])
            saved_fingerprint = str(state["es_sha256"])
            saved_probe = state.get("es_probe")  # absent in states older than the probe
            if saved_probe is not None:
                saved_probe = np.asarray(saved_probe, dtype=np.float64).reshape(-1)
            saved_rng = (
                np.asarray(state["rng_mt19937_keys"]).astype(np.uint32),
                int(state["rng_pos"]),
                int(state["rng_has_gauss"]),
                float(state["rng_cached_gaussian"]),
            )
            saved_version = str(state["pycma_version"])
            saved_numpy = str(state.get("numpy_version"))
            saved_threads = state.get("threads")
        except KeyError as exc:
            raise UserError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed ({exc})") from None
        if history.shape != (generation, self.popsize):
            raise UserError(
                f"{where}: loss_history has shape {history.shape}, expected "
                f"({generation}, {self.popsize})"
            )

        # Replay into local variables; install only once everything checks out.
        es, rng_state = self._build_es(np.random.RandomState(self.seed).get_state())
        chain = _CHAIN_START
        asked: list[np.ndarray] = []
        for losses in history:
            asked, rng_state = self._es_ask(es, rng_state)
            chain = _chain(chain, np.array(asked, dtype=np.float64))
            rng_state = self._es_tell(es, rng_state, asked, losses)
            asked = []
        drift = 0.0
        exact = True
        if pending is not None:
            asked, rng_state = self._es_ask(es, rng_state)
            replayed = np.array(asked, dtype=np.float64)
            chain = _chain(chain, replayed)
            exact = np.array_equal(replayed, pending)
            drift = _drift(replayed, pending)
        exact = exact and chain == saved_chain and _fingerprint(es) == saved_fingerprint
        if not exact:  # another CPU's rounding is accepted, anything more is not
            if saved_probe is not None:
                drift = max(drift, _drift(_probe(es), saved_probe))
            if state.get("es_scaling") is not None:
                saved_scaling = np.asarray(state["es_scaling"], dtype=np.float64).reshape(-1)
                drift = max(drift, _drift(_scaling(es), saved_scaling))
        same_rng = (
            np.array_equal(rng_state[1], saved_rng[0])
            and rng_state[2] == saved_rng[1]
            and rng_state[3] == saved_rng[2]
            and rng_state[4] == saved_rng[3]
        )
        if not same_rng:
            why = "its random number state differs"
        elif exact:
            why = None
        elif saved_probe is None:
            why = "not bit for bit, and the state predates the probe that measures how far"
        elif saved_version != cma.__version__:
            why = f"not bit for bit, and it was saved with pycma {saved_version}"
        elif not drift <= REPLAY_TOLERANCE:
            why = f"it lands {drift:.2g} (relative) from the saved state, beyond rounding"
        else:
            why = None
        if why is not None:
            raise UserError(
                f"{where}: replaying {generation} generations does not reproduce the saved "
                f"candidates: {why} (saved with numpy {saved_numpy}, threads "
                f"{saved_threads}; now pycma {cma.__version__}, numpy {np.__version__}, "
                f"threads {_threads_env()}); the loss history differs or the checkpoint is "
                "corrupt"
            )
        # this CPU's chain, so that a later resume here is bit for bit again
        self._es, self._rng_state, self._chain = es, rng_state, chain
        self._asked = asked
        self._history = [row.copy() for row in history]
        self.replay_drift = None if exact else drift
