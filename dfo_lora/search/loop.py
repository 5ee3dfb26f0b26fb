"""The layer-wise search (divide and conquer over layers; ARCHITECTURE.md "The method").

One optimizer per layer keeps its own state across rounds. A round visits every searched
layer (`layers`: all by default; the others stay at z = 0), bottom-up by default; a visit
runs `generations_per_visit` generations (ask popsize candidates for that layer, score them
with every other layer at its commit, tell the losses), then commits the layer's best-ever
candidate (or the optimizer's mean). Rounds = budget // (searched layers * evaluations per
visit).

`elitist` (off in the paper) also scores the layer's current z with the visit's first
generation and commits the visit's best candidate only if it beats it, so train loss never
rises at a commit: with the paper's rule every visit commits some candidate, even when all
of them are worse than what the layer had (BENCHMARKS.md: this undid a good zero-shot
state on mr with k = 64).

Dev is scored every `eval_every` evaluations (at the next layer boundary) and at the
start (the zero state, i.e. zero-shot); the state with the best dev metric (ties: lower
dev loss, then earlier) is kept, and test is scored once at the end with it. Because the
zero state competes, the tuned state is never worse than zero-shot on dev.

`run` goes round by round; `_visit` runs one layer's visit (from a checkpointed position:
generations, commit, dev check, checkpoint) and `_generation` one ask / score / tell.
The loop only talks to the server through score/commit/set_state/get_state/evaluate/
info, so the same loop drives an in-process server or Ray actors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.optim import make_optimizer, optimizer_from_state
from dfo_lora.search.callbacks import Callback
from dfo_lora.search.policy import (
    AVERAGING,
    WITHOUT_DEV,
    evals_per_visit,
    layer_order,
    optimizer_index,
    optimizer_kinds,
    options_for,
    parse_layers,
    rounds_for,
)

if TYPE_CHECKING:
    from dfo_lora.config import TuneConfig
    from dfo_lora.server.protocol import SearchServer

CHECKPOINT_VERSION = 1


@dataclass
class Position:
    """Where the search stands: the next generation to run."""

    round: int = 0
    visit: int = 0  # index into the round's layer order
    generation: int = 0  # within the visit
    evals: int = 0


def _better(metrics: dict, best: dict | None, metric: str, select: str = "metric") -> bool:
    """Whether a dev result replaces the kept one (`select`: see TuneConfig)."""
    if best is None or select in WITHOUT_DEV:
        return True
    if select == "loss":
        return metrics["loss"] < best["loss"]
    if metrics[metric] != best[metric]:
        return metrics[metric] > best[metric]
    return metrics["loss"] < best["loss"]


def shaped(losses: np.ndarray, candidates: np.ndarray, z_penalty: float) -> np.ndarray:
    """What the optimizer is told: the train losses plus `z_penalty` * mean(z^2) per
    candidate (0 by default; not logged). Non-finite losses pass through as they are:
    every optimizer's `tell` counts NaN and +-inf as the worst loss (optim/base.py), and
    esgrad drops the pairs that hold one."""
    return losses + z_penalty * np.mean(np.square(candidates), axis=1)


def _fresh_visit() -> dict:
    """Elitist bookkeeping for the visit in progress (checkpointed with the position)."""
    return {"current_loss": float("inf"), "loss": float("inf"), "z": None}


class InProcessOptimizers:
    """Builds the per-layer optimizers in this process."""

    make = staticmethod(make_optimizer)
    from_state = staticmethod(optimizer_from_state)


class LayerwiseSearch:
    """Runs one C-LoRA / F-LoRA / hybrid search against an evaluation server."""

    def __init__(
        self,
        server: SearchServer,
        config: TuneConfig,
        metric: str,
        callbacks: list[Callback] | None = None,
        checkpoint=None,
        optimizers=None,
    ):
        self.server = server
        self.config = config
        self.metric = metric
        self.callbacks = callbacks or []
        self.checkpoint = checkpoint  # callable(state: dict) -> None, or None
        # where optimizers live: `make(kind, dim, popsize, sigma, seed)` and `from_state(s)`
        # (default in-process; the Ray backend passes actor proxies with the same interface)
        self.factory = optimizers or InProcessOptimizers()
        info = server.info()
        self.num_layers = info["num_layers"]
        self.dim = info["dim"]
        self.layers = parse_layers(config.layers, self.num_layers)
        self.slot = {layer: i for i, layer in enumerate(self.layers)}
        self.rounds = rounds_for(config, len(self.layers))
        self.total_evals = self.rounds * len(self.layers) * evals_per_visit(config)
        self.kinds = optimizer_kinds(config)
        self.optimizers = [
            [
                self.factory.make(
                    kind,
                    self.dim,
                    config.popsize,
                    config.sigma,
                    self._seed(layer, i),
                    **options_for(config, kind),
                )
                for i, kind in enumerate(self.kinds)
            ]
            for layer in self.layers
        ]
        self.position = Position()
        self.visit = _fresh_visit()
        self.zero_shot: dict = {}
        self.best_dev: dict | None = None
        self.best_dev_z: np.ndarray | None = None
        self.best_dev_evals = 0
        self.next_dev = 0
        self.elapsed_before = 0.0
        self.log_lines = 0
        self.round_states: list[np.ndarray] = []  # select average: the start, each round's end

    def _seed(self, layer: int, which: int) -> int:
        return self.config.seed * 100_003 + layer * 7 + which

    def optimizer_for(self, layer: int, round_index: int):
        return self.optimizers[self.slot[layer]][optimizer_index(self.config, layer, round_index)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        pos = self.position
        return {
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "position": {
                "round": pos.round,
                "visit": pos.visit,
                "generation": pos.generation,
                "evals": pos.evals,
            },
            "z": self.server.get_state(),
            "visit": self.visit,
            "optimizers": [[opt.state_dict() for opt in per] for per in self.optimizers],
            "zero_shot": self.zero_shot,
            "best_dev": self.best_dev,
            "best_dev_z": self.best_dev_z,
            "best_dev_evals": self.best_dev_evals,
            "next_dev": self.next_dev,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self._started),
            "log_lines": self.log_lines,
            "round_states": list(self.round_states),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise UserError(
                f"checkpoint: version {state.get('version')} is not {CHECKPOINT_VERSION}"
            )
        self.position = Position(**state["position"])
        self.optimizers = [[self.factory.from_state(s) for s in per] for per in state["optimizers"]]
        self.server.set_state(np.asarray(state["z"]))
        self.visit = state.get("visit") or _fresh_visit()
        self.zero_shot = state["zero_shot"]
        self.best_dev = state["best_dev"]
        self.best_dev_z = np.asarray(state["best_dev_z"])
        self.best_dev_evals = state["best_dev_evals"]
        self.next_dev = state["next_dev"]
        self.elapsed_before = state["elapsed_s"]
        self.log_lines = state["log_lines"]
        self.round_states = [np.asarray(z) for z in state.get("round_states", [])]

    # ------------------------------------------------------------------ run
    def _emit(self, hook: str, record: dict) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(record)
        if hook in ("on_generation", "on_dev"):
            self.log_lines += 1

    def _dev_check(self, dev: dict | None = None) -> None:
        evals = self.position.evals
        if evals < self.next_dev:
            return
        dev = dev or self.server.evaluate("dev")
        if _better(dev, self.best_dev, self.metric, self.config.select):
            self.best_dev, self.best_dev_z, self.best_dev_evals = (
                dev,
                self.server.get_state(),
                evals,
            )
        while self.next_dev <= evals:
            self.next_dev += self.config.eval_every
        self._emit("on_dev", {"evals": evals, "dev": dev, "best_dev": self.best_dev})

    def run(self) -> dict:
        """Search to the end of the budget; returns the results dict (results.json)."""
        self._started = time.perf_counter()
        config, pos = self.config, self.position
        if pos.evals == 0 and not self.zero_shot:
            self.zero_shot = {
                "dev": self.server.evaluate("dev"),
                "test": self.server.evaluate("test"),
            }
            self._dev_check(dev=self.zero_shot["dev"])
        for cb in self.callbacks:
            cb.on_start(self.total_evals, pos.evals)
        self._last_checkpoint = time.perf_counter()
        averaging = config.select in AVERAGING  # only then are the round ends kept
        if averaging and not self.round_states:
            self.round_states.append(self.server.get_state())
        while pos.round < self.rounds:
            order = layer_order(config, self.layers, pos.round)
            while pos.visit < len(order):
                self._visit(order[pos.visit])
            pos.round += 1
            pos.visit = 0
            # A resume from the round's last checkpoint (visit == len(order)) comes back
            # here and appends the same state, so no checkpoint of its own is needed.
            if averaging:
                self.round_states.append(self.server.get_state())
        return self._finish()

    def averaged_state(self) -> np.ndarray:
        """`select: average(_if_fit)`: the mean of the last `average_last` round-end states (0: all,
        the start state included)."""
        last = self.config.average_last
        states = self.round_states[-last:] if last else self.round_states
        return np.mean(states, axis=0)

    def _visit(self, layer: int) -> None:
        """The rest of one layer's visit: its generations from `position`, then the commit,
        the dev check and a checkpoint."""
        config, pos = self.config, self.position
        basis = self.subspace(layer, pos.round)
        if basis is not None and pos.generation == 0:  # a fresh optimizer per visit
            self._renew_optimizer(layer, pos.round)
        opt = self.optimizer_for(layer, pos.round)
        anchor = self.server.get_state()[layer] if basis is not None else None
        while pos.generation < config.generations_per_visit:
            self._generation(layer, opt, anchor, basis)
            if (
                pos.generation < config.generations_per_visit
                and self.checkpoint
                and time.perf_counter() - self._last_checkpoint >= config.checkpoint_every_s
            ):
                self._save_checkpoint()
        self._commit(layer, opt, anchor, basis)
        pos.visit += 1
        pos.generation = 0
        self.visit = _fresh_visit()
        self._dev_check()
        if self.checkpoint:
            self._save_checkpoint()

    def _save_checkpoint(self) -> None:
        self.checkpoint(self.state_dict())
        self._last_checkpoint = time.perf_counter()

    def _generation(self, layer: int, opt, anchor, basis) -> None:
        """One ask / score / tell of `layer`'s optimizer, and its log line."""
        config, pos = self.config, self.position
        asked = opt.ask()
        candidates = asked if basis is None else anchor + asked @ basis.T
        batch = candidates
        if config.elitist and pos.generation == 0:  # the layer's current z, last
            batch = np.vstack([candidates, self.server.get_state()[layer][None]])
        scored = self.server.score(layer, batch)
        losses = np.asarray(scored["loss"], dtype=np.float64)
        if len(batch) > len(candidates):
            self.visit["current_loss"] = float(losses[-1])
        losses = losses[: len(candidates)]
        opt.tell(asked, shaped(losses, candidates, config.z_penalty))
        self._track_visit_best(candidates, losses)
        pos.evals += len(batch)
        pos.generation += 1
        finite = losses[np.isfinite(losses)]
        record = {
            "evals": pos.evals,
            "round": pos.round,
            "layer": layer,
            "popsize": len(candidates),
            "loss_min": float(finite.min()) if finite.size else None,
            "loss_mean": float(finite.mean()) if finite.size else None,
            "nonfinite": int(losses.size - finite.size),
            "train_acc_max": float(np.max(scored["accuracy"][: len(candidates)])),
            "best_loss": float(opt.best[1]),
            "time_s": self.elapsed_before + time.perf_counter() - self._started,
        }
        if config.elitist:
            record["current_loss"] = self.visit["current_loss"]
        self._emit("on_generation", record)

    def _track_visit_best(self, candidates: np.ndarray, losses: np.ndarray) -> None:
        if not self.config.elitist:
            return
        finite = np.where(np.isfinite(losses), losses, np.inf)
        i = int(np.argmin(finite))
        if finite[i] < self.visit["loss"]:
            self.visit["loss"], self.visit["z"] = float(finite[i]), np.array(candidates[i])

    def subspace(self, layer: int, round_index: int) -> np.ndarray | None:
        """The visit's search directions (d, subspace_dim), or None (the whole z).

        N(0, 1/k) entries, seeded by (seed, layer, round): the space's map times them is
        distributed as a fresh k-dim map of the space, so each visit searches k new
        directions around the layer's z while z keeps what earlier visits found."""
        k = self.config.subspace_dim
        if k is None:
            return None
        rng = np.random.default_rng([self.config.seed, layer, round_index, 0x5B5])
        return rng.standard_normal((self.dim, k)) / np.sqrt(k)

    def _renew_optimizer(self, layer: int, round_index: int) -> None:
        """subspace_dim: the visit's optimizer starts afresh at u = 0 (the layer's z) with
        the initial step, since the directions it learnt belong to the last basis."""
        which = optimizer_index(self.config, layer, round_index)
        kind = self.kinds[which]
        self.optimizers[self.slot[layer]][which] = self.factory.make(
            kind,
            self.config.subspace_dim,
            self.config.popsize,
            self.config.sigma,
            self._seed(layer, which) + 1_000_003 * (round_index + 1),
            **options_for(self.config, kind),
        )

    def _commit(self, layer: int, opt, anchor=None, basis=None) -> None:
        """Paper: the best-ever candidate (or the mean). Elitist: this visit's best candidate,
        only if its train loss is below that of the layer's current z in the same context.
        With a subspace (`basis`), the optimizer's point u is the z `anchor + basis @ u`."""
        config = self.config
        if config.elitist:
            if self.visit["z"] is not None and self.visit["loss"] < self.visit["current_loss"]:
                self.server.commit(layer, self.visit["z"])
            return
        z = opt.best[0] if config.commit == "best" else opt.mean
        if basis is not None:
            z = anchor + basis @ np.asarray(z)
        if np.all(np.isfinite(z)) and (config.commit == "mean" or np.isfinite(opt.best[1])):
            self.server.commit(layer, z)

    def _finish(self) -> dict:
        final_z = self.server.get_state()
        kept, extra = None, {}  # a state chosen without dev: the last one, or the path's mean
        if self.config.select == "final":
            kept = final_z
        elif self.config.select == "average":
            kept = self.averaged_state()
        elif self.config.select == "average_if_fit":
            train = self.server.evaluate("train")  # one forward of the train split
            fitted = train[self.metric] >= 1.0 - 1e-9  # every example right
            kept = self.averaged_state() if fitted else final_z
            extra = {"train_fit": train, "averaged": bool(fitted)}
        if kept is not None and not np.array_equal(kept, self.best_dev_z):
            self.server.set_state(kept)
            self.best_dev, self.best_dev_z = self.server.evaluate("dev"), kept
            self.best_dev_evals = self.position.evals
        self.server.set_state(self.best_dev_z)
        test = self.server.evaluate("test")
        if self.config.select in AVERAGING and not np.array_equal(kept, final_z):
            # what averaging bought, read after the choice (never part of it)
            self.server.set_state(final_z)
            extra["last_state"] = {"test": self.server.evaluate("test")}
        self.server.set_state(final_z)
        results = {
            "tuned": {"dev": self.best_dev, "test": test},
            "zero_shot": self.zero_shot,
            "best_dev_evals": self.best_dev_evals,
            "select": self.config.select,
            **extra,
            "evaluations": self.position.evals,
            "rounds": self.rounds,
            "wall_time_s": self.elapsed_before + time.perf_counter() - self._started,
            "metric": self.metric,
        }
        for cb in self.callbacks:
            cb.on_end(results)
        return results
