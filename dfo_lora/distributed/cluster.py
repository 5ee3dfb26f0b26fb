"""Connecting to Ray, and checking what a cluster can hold, with one-line errors.

`address`:
- `auto`: the cluster named by RAY_ADDRESS (what `ray job submit` sets), else a Ray
  instance already running on this machine, else a new local one;
- `local`: always a new local instance;
- `host:port` (GCS, port 6379 by default) or `ray://host:10001` (Ray client): that
  cluster. Its port is probed first, because `ray.init` keeps retrying an unreachable
  address for minutes.

A local instance that this module starts runs no dashboard; where a dashboard runs it
listens on 127.0.0.1 only (Ray's default `dashboard_host`, which is never widened here).
"""

from __future__ import annotations

import logging
import math
import os
import socket

from dfo_lora.errors import UserError

CONNECT_TIMEOUT_S = 10.0  # TCP probe of an explicit cluster address
DEFAULT_PORTS = {"": 6379, "ray": 10001, "http": 8265, "https": 8265}
START_TIMEOUT_ENV = "DFO_LORA_RAY_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 120.0


def start_timeout_s() -> float:
    """Seconds to wait for resources before giving up (env DFO_LORA_RAY_TIMEOUT_S)."""
    raw = os.environ.get(START_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_START_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{START_TIMEOUT_ENV}: {raw!r} is not a positive number of seconds")
    return value


def host_port(address: str) -> tuple[str, int]:
    """(host, port) of `host:port`, `ray://host[:port]` or `http://host[:port]`."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    rest = rest.split("/", 1)[0]
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, str(DEFAULT_PORTS.get(scheme, 6379))
    if not host or not port.isdigit() or scheme not in DEFAULT_PORTS:
        raise UserError(f"address: {address!r} is not auto, local, host:port or ray://host:port")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    host, port = host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UserError(
            f"address: cannot reach a Ray cluster at {address} ({reason}); "
            "is `ray start --head` running there and the port open?"
        ) from None


class RaySession:
    """`with RaySession(address):` connects (or starts Ray); shuts down only what it started.

    When Ray is already initialised in this process (tests, a caller's own `ray.init`)
    that instance is used as it is.
    """

    def __init__(self, address: str = "auto", num_cpus: int | None = None):
        self.address = address
        self.num_cpus = num_cpus
        self.started = False

    def __enter__(self) -> RaySession:
        import ray

        if ray.is_initialized():
            return self
        common = dict(logging_level=logging.WARNING, include_dashboard=False)
        address = self.address
        if address == "auto" and os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
        if address == "local":
            ray.init(num_cpus=self.num_cpus, **common)
        elif address == "auto":
            try:
                ray.init(address="auto", **common)
            except ConnectionError:  # nothing running here: start a local instance
                ray.init(num_cpus=self.num_cpus, **common)
        else:
            check_reachable(address)
            try:
                ray.init(address=address, **common)
            except Exception as exc:  # noqa: BLE001 - Ray raises many kinds; report one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise UserError(f"address: cannot connect to Ray at {address}: {first}") from None
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self.started:
            ray.shutdown()


def server_bundle(gpus_per_server: float, cpus_per_server: float) -> dict[str, float]:
    bundle = {"CPU": float(cpus_per_server)}
    if gpus_per_server > 0:
        bundle["GPU"] = float(gpus_per_server)
    return bundle


def capacity(gpus_per_server: float, cpus_per_server: float) -> int:
    """How many server actors of this size the cluster holds at once (node by node)."""
    import ray

    bundle = server_bundle(gpus_per_server, cpus_per_server)
    total = 0
    for node in ray.nodes():
        if not node.get("Alive", False):
            continue
        have = node.get("Resources", {})
        total += min(math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
    return total


def check_capacity(servers: int, gpus_per_server: float, cpus_per_server: float) -> None:
    """UserError when the cluster can never hold `servers` actors of this size."""
    import ray

    total = ray.cluster_resources()
    for key, per, option in (
        ("GPU", gpus_per_server, "gpus_per_server"),
        ("CPU", cpus_per_server, "cpus_per_server"),
    ):
        need, have = servers * per, total.get(key, 0.0)
        if need > have + 1e-9:
            raise UserError(
                f"{option}: {servers} server(s) x {per:g} {key} = {need:g} {key}s, but the Ray "
                f"cluster has {have:g} {key}s"
            )
    fits = capacity(gpus_per_server, cpus_per_server)
    if fits < servers:
        raise UserError(
            f"servers: {servers} server(s) of {server_bundle(gpus_per_server, cpus_per_server)} "
            f"do not fit on the cluster's nodes (at most {fits} fit, node by node)"
        )
