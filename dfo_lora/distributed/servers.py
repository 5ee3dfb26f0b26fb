"""Evaluation servers as Ray actors, and a driver-side proxy with the server's own API.

    group = ServerGroup.start(spec, servers=2, gpus_per_server=1)   # model replicas
    server = RemoteServer(group)   # score/commit/set_state/get_state/evaluate/info
    LayerwiseSearch(server, ...)   # the same loop as in-process

Scatter. `score(layer, Z)` cuts the population into contiguous shares, one per healthy
server, and gathers the losses in candidate order. Shares are cut only at boundaries
where the in-process server would cut its own stacked chunks (in every length bucket),
so each candidate is computed in exactly the same batch as in-process: the numbers are
bitwise those of the local backend on the same machine and thread count (BLAS picks
different kernels, hence roundings, for different batch shapes). When the whole
population is one chunk it goes to one server: lower `max_tokens` to spread it.

State. The committed z (L, d) lives on the proxy; each actor also remembers which
state it holds as a token (run id, version). `commit`/`set_state` are broadcast and
applied only by actors that hold the previous version; `score`/`evaluate` carry the
token, and an actor that holds another state (restarted, missed a broadcast, or serving
another run of a sweep) answers `None` and is re-sent the full state with the retry.

Faults. An actor that dies mid-generation (Ray restarts it, up to MAX_RESTARTS times)
has its share re-scored on another healthy server, or on itself once it is back; a
share's losses are taken from exactly one successful call, so no evaluation is lost or
counted twice, and the retry computes the same chunks, so the numbers do not change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dfo_lora.errors import UserError

if TYPE_CHECKING:
    from dfo_lora.config import TuneConfig
    from dfo_lora.server.factory import ServerSpec

log = logging.getLogger(__name__)

MAX_RESTARTS = 3  # restarts of one server actor before it counts as dead
MAX_ATTEMPTS = 8  # calls for one share before the run gives up
PING_INTERVAL_S = 0.5  # between pings of a restarting actor


def actor_spec(config: TuneConfig) -> ServerSpec:
    """The run's ServerSpec with local paths made absolute as this process sees them:
    actors run in other working directories, and Ray does not hand the driver's
    environment ($DFO_LORA_DATA) to them. On a cluster the paths must exist on every node
    (a shared file system), or name a hub model / dataset."""
    from dfo_lora.backbone.loading import PRESETS
    from dfo_lora.tasks.loaders import default_data_dir

    spec = config.server_spec()
    changes = {}
    if spec.model not in PRESETS and Path(spec.model).expanduser().exists():
        changes["model"] = str(Path(spec.model).expanduser().resolve())
    if spec.task.endswith((".yaml", ".yml")) and Path(spec.task).is_file():
        changes["task"] = str(Path(spec.task).resolve())
    if spec.data_dir is not None and Path(spec.data_dir).is_dir():
        changes["data_dir"] = str(Path(spec.data_dir).resolve())
    if spec.data_dir is None:
        try:
            changes["data_dir"] = str(default_data_dir().resolve())
        except UserError:
            pass  # none here: the actors look for themselves (and report it)
    return dataclasses.replace(spec, **changes)


def chunk_candidates(server) -> list[int]:
    """Candidates per stacked chunk in each train bucket, as `EvaluationServer.score`
    cuts them (keep in step with it; tests/test_distributed.py checks the exactness)."""
    return [max(1, server.chunk_tokens // (b.size * b.length)) for b in server.buckets["train"]]


def plan_shares(num: int, unit: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) shares of `num` candidates, cut at multiples of `unit`,
    as even as whole units allow, at most `parts` of them."""
    unit = max(1, min(unit, num))
    units = math.ceil(num / unit)
    parts = max(1, min(parts, units))
    base, extra = divmod(units, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = min(num, start + (base + (i < extra)) * unit)
        bounds.append((start, stop))
        start = stop
    return bounds


# ---------------------------------------------------------------------------------------
# The actor


class ServerActor:
    """One model replica: builds its EvaluationServer from a ServerSpec on its own device."""

    def __init__(self, spec, threads: int = 0, score_delay_s: float = 0.0):
        import torch

        from dfo_lora.server.factory import build_server

        if threads > 0:
            torch.set_num_threads(threads)
        self.score_delay_s = score_delay_s  # fault-injection tests: keep a call in flight
        self.token = None  # (run id, version) of the state this replica holds
        self.error = None
        try:
            self.server = build_server(spec)
        except UserError as exc:  # reported by info(), so the driver fails in one line
            self.server, self.error = None, str(exc)

    def info(self) -> dict:
        import os
        import socket

        if self.error is not None:
            return {"error": self.error}
        import torch

        return {
            **self.server.info(),
            "chunk_candidates": chunk_candidates(self.server),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": torch.get_num_threads(),
        }

    def ping(self, payload=None) -> bool:
        """Liveness; with a payload it also measures the object transfer (bench)."""
        return True

    # Arrays from Ray's object store are read-only (torch warns on them): pass copies.
    def _sync(self, token, state) -> bool:
        if state is not None:
            self.server.set_state(np.array(state))
            self.token = token
        return self.token == token

    def score(self, layer: int, candidates: np.ndarray, token, state=None):
        if not self._sync(token, state):
            return None
        if self.score_delay_s:
            time.sleep(self.score_delay_s)
        started = time.perf_counter()
        out = self.server.score(layer, np.array(candidates, dtype=np.float64))
        return {**out, "compute_s": time.perf_counter() - started}

    def evaluate(self, split: str, token, state=None):
        if not self._sync(token, state):
            return None
        return self.server.evaluate(split)

    def evaluate_calibrated(self, split: str, calibrate: bool, token, state=None):
        """`evaluate` with the calibration set for this call (EvaluationServer.evaluate)."""
        if not self._sync(token, state):
            return None
        return self.server.evaluate(split, calibrate=calibrate)

    def commit(self, layer: int, z: np.ndarray, before, after) -> bool:
        if self.token != before:
            return False
        self.server.commit(layer, np.array(z))
        self.token = after
        return True

    def set_state(self, z: np.ndarray, before, after) -> bool:
        if self.token != before:
            return False
        self.server.set_state(np.array(z))
        self.token = after
        return True

    def peak_memory(self) -> int:
        return self.server.peak_memory()

    def state_factors(self, z: np.ndarray) -> dict:
        return self.server.state_factors(np.array(z))


# ---------------------------------------------------------------------------------------
# A group of replicas of one spec


@dataclass
class Replica:
    handle: object
    load: int = 0  # calls in flight
    suspect: bool = False  # a call failed: restarting, usable again once a ping answers
    ping: object = None  # ObjectRef of the pending ping while suspect
    next_ping: float = 0.0  # monotonic time of the next ping while suspect
    dead: bool = False  # Ray gave up on it (restarts used up)


@dataclass
class GroupStats:
    failed_calls: int = 0  # calls lost to a dead or restarting actor (their shares re-scored)
    resyncs: int = 0  # calls answered "other state" and retried with the full state
    calls: int = 0


class ServerGroup:
    """`servers` actors holding replicas of one ServerSpec, placed together.

    Thread-safe: the runs of a sweep share a group, each through its own RemoteServer.
    """

    def __init__(self, spec, replicas: list[Replica], placement, info: dict, timeout_s: float):
        self.spec = spec
        self.replicas = replicas
        self.placement = placement
        self.info = info
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self.stats = GroupStats()

    @classmethod
    def start(
        cls,
        spec,
        servers: int = 1,
        gpus_per_server: float = 0.0,
        cpus_per_server: float = 1.0,
        timeout_s: float | None = None,
        score_delay_s: float = 0.0,
    ) -> ServerGroup:
        """Reserve the resources (or fail with the reason after `timeout_s`), then build
        the replicas (each loads the model on its own device) and wait for them."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from dfo_lora.distributed.cluster import check_capacity, server_bundle, start_timeout_s

        timeout_s = start_timeout_s() if timeout_s is None else timeout_s
        check_capacity(servers, gpus_per_server, cpus_per_server)
        bundle = server_bundle(gpus_per_server, cpus_per_server)
        placement = placement_group([dict(bundle) for _ in range(servers)], strategy="SPREAD")
        try:
            ray.get(placement.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(placement)
            free = {k: ray.available_resources().get(k, 0.0) for k in bundle}
            raise UserError(
                f"servers: {servers} server(s) of {bundle} could not be placed within "
                f"{timeout_s:g} s; the cluster has {free} free (held by other jobs, or no node "
                f"is large enough); set {_env()} to wait longer"
            ) from None
        remote_cls = ray.remote(ServerActor)
        threads = max(1, round(cpus_per_server))
        replicas = []
        for index in range(servers):
            handle = remote_cls.options(
                num_cpus=cpus_per_server,
                num_gpus=gpus_per_server,
                max_restarts=MAX_RESTARTS,
                max_task_retries=0,  # the proxy re-scores lost shares itself
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement, placement_group_bundle_index=index
                ),
            ).remote(spec, threads, score_delay_s)
            replicas.append(Replica(handle))
        try:
            infos = ray.get([r.handle.info.remote() for r in replicas])
        except ray.exceptions.RayActorError as exc:
            _shutdown(replicas, placement)
            raise UserError(f"server actor failed to start: {_first_line(exc)}") from None
        errors = [i["error"] for i in infos if "error" in i]
        if errors:
            _shutdown(replicas, placement)
            raise UserError(errors[0])
        return cls(spec, replicas, placement, infos[0], timeout_s)

    @property
    def size(self) -> int:
        return len(self.replicas)

    def shutdown(self) -> None:
        _shutdown(self.replicas, self.placement)

    # -------------------------------------------------------------- health and load
    def _refresh(self) -> None:
        """Ping suspect replicas; one that answers is healthy again (caller holds the lock).
        A restarting actor fails calls at once (ActorUnavailableError), so ping it again
        a little later; ActorDiedError means Ray gave up on it."""
        import ray

        now = time.monotonic()
        for r in self.replicas:
            if not r.suspect or r.dead:
                continue
            if r.ping is None:
                if now >= r.next_ping:
                    r.ping = r.handle.ping.remote()
                continue
            ready, _ = ray.wait([r.ping], timeout=0)
            if not ready:
                continue
            try:
                ray.get(r.ping)
                r.suspect = False
            except ray.exceptions.ActorDiedError:
                r.dead = True
            except ray.exceptions.RayActorError:
                r.next_ping = now + PING_INTERVAL_S
            r.ping = None

    def _failed(self, r: Replica, exc: Exception) -> None:
        import ray

        if isinstance(exc, ray.exceptions.ActorDiedError):
            r.dead = True
        r.suspect, r.ping, r.next_ping = True, None, 0.0

    def _ok(self) -> list[int]:
        return [i for i, r in enumerate(self.replicas) if not r.dead and not r.suspect]

    def healthy(self) -> list[int]:
        with self.lock:
            self._refresh()
            return self._ok()

    def mark_failed(self, index: int, exc: Exception) -> None:
        with self.lock:
            self.stats.failed_calls += 1
            self._failed(self.replicas[index], exc)

    def acquire(self, avoid: int | None = None) -> int:
        """The least-loaded healthy replica (not `avoid` if another is healthy); waits for a
        restarting one when none is healthy."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        while True:
            with self.lock:
                self._refresh()
                ok = self._ok()
                if len(ok) > 1 and avoid in ok:
                    ok.remove(avoid)
                if ok:
                    best = min(ok, key=lambda i: self.replicas[i].load)
                    self.replicas[best].load += 1
                    self.stats.calls += 1
                    return best
                pings = [r.ping for r in self.replicas if r.ping is not None and not r.dead]
                alive = any(not r.dead for r in self.replicas)
            if not alive:
                raise RuntimeError(
                    f"all {self.size} server actors died (each restarted up to {MAX_RESTARTS} "
                    "times); the last checkpoint is intact: fix the cluster and --resume"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no server actor came back within {self.timeout_s:g} s; "
                    "the last checkpoint is intact: --resume later"
                )
            if pings:
                ray.wait(pings, num_returns=1, timeout=PING_INTERVAL_S)
            else:
                time.sleep(PING_INTERVAL_S / 4)

    def release(self, index: int) -> None:
        with self.lock:
            self.replicas[index].load -= 1

    def live_handles(self) -> list[tuple[int, object]]:
        with self.lock:
            return [(i, r.handle) for i, r in enumerate(self.replicas) if not r.dead]


def _shutdown(replicas: list[Replica], placement) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for r in replicas:
        try:
            ray.kill(r.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    try:
        remove_placement_group(placement)
    except Exception:  # noqa: BLE001
        pass


def _env() -> str:
    from dfo_lora.distributed.cluster import START_TIMEOUT_ENV

    return START_TIMEOUT_ENV


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):  # the cause is usually the last line of a Ray traceback
        if "Error" in line:
            return line.strip()
    return lines[0] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------
# The proxy


class RemoteServer:
    """The EvaluationServer API over a ServerGroup, for one run."""

    def __init__(self, group: ServerGroup):
        self.group = group
        self._info = dict(group.info)
        self.num_layers = self._info["num_layers"]
        self.dim = self._info["dim"]
        self.z = np.zeros((self.num_layers, self.dim))  # the committed state
        self.run_id = uuid.uuid4().hex
        self.version = 0
        self.unit = (
            math.lcm(*self._info["chunk_candidates"]) if self._info["chunk_candidates"] else 1
        )
        self.on_submit = None  # hook(score call number, replica per share): fault injection
        self.score_calls = 0
        self.last_compute_s = 0.0
        self._warned = False

    @property
    def token(self) -> tuple[str, int]:
        return (self.run_id, self.version)

    # ------------------------------------------------------------------ facts
    def info(self) -> dict:
        info = {k: v for k, v in self._info.items() if k not in ("host", "pid", "chunk_candidates")}
        info["backend"] = {"name": "ray", "servers": self.group.size}
        return info

    def peak_memory(self) -> int:
        import ray

        peaks = []
        for _, handle in self.group.live_handles():
            try:
                peaks.append(ray.get(handle.peak_memory.remote()))
            except ray.exceptions.RayActorError:
                pass
        return max(peaks, default=0)

    # ------------------------------------------------------------------ state
    def get_state(self) -> np.ndarray:
        return self.z.copy()

    def state_factors(self, z: np.ndarray) -> dict:
        """Export factors of a state (the same space on every replica: ask one)."""
        import ray

        for _, handle in self.group.live_handles():
            return ray.get(handle.state_factors.remote(np.array(z, dtype=np.float64)))
        raise RuntimeError("no live server replica")

    def commit(self, layer: int, z: np.ndarray) -> None:
        z = np.array(z, dtype=np.float64).reshape(self.dim)
        if np.array_equal(z, self.z[layer]):
            return
        before = self.token
        self.z[layer] = z
        self.version += 1
        self._broadcast("commit", layer, z, before, self.token)

    def set_state(self, z: np.ndarray) -> None:
        z = np.array(z, dtype=np.float64)
        if z.shape != self.z.shape:
            raise UserError(f"state: expected z of shape {self.z.shape}, got {z.shape}")
        before = self.token
        self.z = z
        self.version += 1
        self._broadcast("set_state", z, before, self.token)

    def _broadcast(self, method: str, *args) -> None:
        import ray

        calls = [(i, getattr(h, method).remote(*args)) for i, h in self.group.live_handles()]
        for index, ref in calls:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # it is resynced when next used
                self.group.mark_failed(index, exc)

    # ------------------------------------------------------------------ scoring
    def score(self, layer: int, candidates: np.ndarray) -> dict[str, np.ndarray]:
        """Losses and accuracies of each candidate, gathered in candidate order."""
        cand = np.ascontiguousarray(candidates, dtype=np.float64)
        if cand.ndim != 2 or cand.shape[1] != self.dim:
            raise UserError(f"candidates: expected shape (P, {self.dim}), got {cand.shape}")
        shares = plan_shares(len(cand), self.unit, len(self.group.healthy()) or 1)
        if self.unit >= len(cand) and self.group.size > 1 and not self._warned:
            self._warned = True
            log.warning(
                "a population of %d is one chunk of the server (max_tokens %s), so each "
                "generation runs on one server; lower max_tokens to spread it over %d",
                len(cand),
                self.group.spec.options.max_tokens or "auto",
                self.group.size,
            )
        self.score_calls += 1
        hook = self.on_submit and (lambda replicas: self.on_submit(self.score_calls, replicas))
        parts = self._gather([("score", (layer, cand[a:b])) for a, b in shares], hook=hook)
        self.last_compute_s = max(p["compute_s"] for p in parts)  # slowest share, in its actor
        return {key: np.concatenate([p[key] for p in parts]) for key in ("loss", "accuracy")}

    def evaluate(self, split: str, calibrate: bool | None = None) -> dict:
        if calibrate is not None:
            return self._gather([("evaluate_calibrated", (split, calibrate))])[0]
        return self._gather([("evaluate", (split,))])[0]

    def _gather(self, jobs: list[tuple[str, tuple]], hook=None) -> list:
        """Run each (method, args) on some replica; retry lost or out-of-state calls."""
        import ray

        results: list = [None] * len(jobs)
        attempts = [0] * len(jobs)
        pending: dict = {}

        def submit(job: int, with_state: bool, avoid: int | None = None) -> None:
            attempts[job] += 1
            if attempts[job] > MAX_ATTEMPTS:
                raise RuntimeError(
                    f"server call {jobs[job][0]} failed {MAX_ATTEMPTS} times; "
                    "the last checkpoint is intact: --resume"
                )
            index = self.group.acquire(avoid=avoid)
            method, args = jobs[job]
            handle = self.group.replicas[index].handle
            state = self.z if with_state else None
            pending[getattr(handle, method).remote(*args, self.token, state)] = (job, index)

        for job in range(len(jobs)):
            submit(job, with_state=False)
        if hook is not None:
            hook([index for _, index in pending.values()])
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, index = pending.pop(ready[0])
            self.group.release(index)
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self.group.mark_failed(index, exc)
                submit(job, with_state=True, avoid=index)
                continue
            if out is None:  # the replica holds another state: re-send ours with the call
                with self.group.lock:
                    self.group.stats.resyncs += 1
                submit(job, with_state=True)
                continue
            results[job] = out
        return results
