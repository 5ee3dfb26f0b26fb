"""The per-layer optimizers of a run inside one Ray actor, behind local-looking proxies.

    optimizers = RemoteOptimizers()                  # starts an OptimizerPool actor
    LayerwiseSearch(server, config, ..., optimizers=optimizers)

The loop builds its optimizers through `make(kind, dim, popsize, sigma, seed, **options)` and
`from_state(state)`; here both return a `RemoteOptimizer` whose ask/tell/best/mean/
state_dict/replay_drift run in the pool actor. The state lives in the actor and outlives the driver
only through the run's checkpoints (the actor is not restarted: if it dies the run stops,
and `--resume` continues from the last checkpoint). One round trip per ask and per tell;
`best` comes back with the tell.
"""

from __future__ import annotations

import numpy as np

from dfo_lora.optim import make_optimizer, optimizer_from_state


class OptimizerPool:
    """Ray actor: optimizers by key (one per layer and kind)."""

    def __init__(self):
        self.optimizers = {}

    def make(self, key: int, kind: str, dim: int, popsize: int, sigma: float, seed: int, options):
        self.optimizers[key] = make_optimizer(kind, dim, popsize, sigma, seed, **options)

    def from_state(self, key: int, state: dict) -> None:
        self.optimizers[key] = optimizer_from_state(state)

    def ask(self, key: int) -> np.ndarray:
        return self.optimizers[key].ask()

    def tell(self, key: int, candidates: np.ndarray, losses: np.ndarray):
        opt = self.optimizers[key]
        opt.tell(candidates, losses)
        return opt.best

    def best(self, key: int):
        return self.optimizers[key].best

    def mean(self, key: int) -> np.ndarray:
        return self.optimizers[key].mean

    def state_dict(self, key: int) -> dict:
        return self.optimizers[key].state_dict()

    def replay_drift(self, key: int) -> float | None:
        return self.optimizers[key].replay_drift


class RemoteOptimizer:
    """One optimizer in the pool, with the local optimizer's interface."""

    def __init__(self, actor, key: int, created):
        self.actor = actor
        self.key = key
        self._created = created  # ObjectRef of make/from_state: its error surfaces on first use
        self._best = None

    def _get(self, ref):
        import ray

        if self._created is not None:
            ray.get(self._created)
            self._created = None
        return ray.get(ref)

    def ask(self) -> np.ndarray:
        return np.array(self._get(self.actor.ask.remote(self.key)))

    def tell(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        self._best = self._get(self.actor.tell.remote(self.key, candidates, losses))

    @property
    def best(self) -> tuple[np.ndarray, float]:
        if self._best is None:
            self._best = self._get(self.actor.best.remote(self.key))
        return np.array(self._best[0]), self._best[1]

    @property
    def mean(self) -> np.ndarray:
        return np.array(self._get(self.actor.mean.remote(self.key)))

    def state_dict(self) -> dict:
        return self._get(self.actor.state_dict.remote(self.key))

    @property
    def replay_drift(self) -> float | None:
        return self._get(self.actor.replay_drift.remote(self.key))


class RemoteOptimizers:
    """The factory the search loop takes (`optimizers=`), backed by one OptimizerPool."""

    def __init__(self):
        import ray

        # No CPU reserved: the optimizers run between the servers' forwards.
        self.actor = ray.remote(OptimizerPool).options(num_cpus=0, max_restarts=0).remote()
        self._next = 0

    def _key(self) -> int:
        self._next += 1
        return self._next - 1

    def make(
        self, kind: str, dim: int, popsize: int, sigma: float, seed: int, **options
    ) -> RemoteOptimizer:
        key = self._key()
        created = self.actor.make.remote(key, kind, dim, popsize, sigma, seed, options)
        return RemoteOptimizer(self.actor, key, created)

    def from_state(self, state: dict) -> RemoteOptimizer:
        key = self._key()
        return RemoteOptimizer(self.actor, key, self.actor.from_state.remote(key, state))

    def close(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)
