"""One generation's cost in-process and on 1..N Ray server actors (BENCHMARKS.md, Ray backend).

    python -m dfo_lora.distributed.bench --model smollm2-135m --popsize 10 --layer 20 \\
        --generations 2 --servers 1 2 --cpus-per-server 1

For each setting, the same populations are scored at one layer (after one warm-up
generation): in-process with `--cpus-per-server` torch threads, then on N actors with
`--cpus-per-server` CPUs (and threads) each. Reported per generation: wall time through
the proxy; the slowest share's `score` timed inside its actor in the same call; their
difference, the backend's overhead (round trips, object transfer, scatter and gather);
a bare actor round trip, and one carrying the population (P x d float64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def _seconds(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def _round_trip_s(handle, payload, repeats: int = 20) -> float:
    import ray

    return statistics.median(
        _seconds(lambda: ray.get(handle.ping.remote(payload))) for _ in range(repeats)
    )


def run_bench(
    model: str,
    task: str = "sst2",
    popsize: int = 20,
    layer: int = 0,
    generations: int = 3,
    servers: tuple[int, ...] = (1, 2),
    cpus_per_server: float = 1.0,
    max_tokens: int = 1,
    intrinsic_dim: int = 500,
    seed: int = 42,
) -> dict:
    import torch

    from dfo_lora.config import TuneConfig
    from dfo_lora.distributed.cluster import RaySession
    from dfo_lora.distributed.servers import RemoteServer, ServerGroup, plan_shares
    from dfo_lora.server.factory import build_server

    config = TuneConfig(
        model=model,
        task=task,
        popsize=popsize,
        seed=seed,
        max_tokens=max_tokens,
        intrinsic_dim=intrinsic_dim,
        test_limit=1,
    ).validate()
    spec = config.server_spec()
    rng = np.random.default_rng(seed)
    pops = [rng.standard_normal((popsize, intrinsic_dim)) for _ in range(generations + 1)]
    rows = []

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, round(cpus_per_server)))
    try:
        server = build_server(spec)
        info = server.info()
        server.score(layer, pops[0])  # warm-up
        local = [_seconds(server.score, layer, z) for z in pops[1:]]
    finally:
        torch.set_num_threads(threads)
    del server
    rows.append(
        {
            "setting": f"in-process, {cpus_per_server:g} thread(s)",
            "servers": 0,
            "generation_s": statistics.median(local),
        }
    )

    with RaySession("local", num_cpus=max(1, round(max(servers) * cpus_per_server))):
        for n in servers:
            group = ServerGroup.start(spec, servers=n, cpus_per_server=cpus_per_server)
            try:
                proxy = RemoteServer(group)
                proxy.score(layer, pops[0])  # warm-up (also syncs the state)
                shares = plan_shares(popsize, proxy.unit, n)
                handles = [r.handle for r in group.replicas]
                wall, compute, cpu = [], [], []
                for z in pops[1:]:
                    cpu_started = time.process_time()
                    wall.append(_seconds(proxy.score, layer, z))
                    cpu.append(time.process_time() - cpu_started)  # the driver's own CPU
                    compute.append(proxy.last_compute_s)  # the slowest share, in its actor
                bare = _round_trip_s(handles[0], None)
                loaded = _round_trip_s(handles[0], pops[0])
            finally:
                group.shutdown()
            gen, comp = statistics.median(wall), statistics.median(compute)
            rows.append(
                {
                    "setting": f"{n} actor(s) x {cpus_per_server:g} CPU",
                    "servers": n,
                    "shares": len(shares),
                    "generation_s": gen,
                    "slowest_share_compute_s": comp,
                    "overhead_s": gen - comp,
                    "driver_cpu_s": statistics.median(cpu),
                    "round_trip_s": bare,
                    "round_trip_with_population_s": loaded,
                }
            )
        optimizer = _optimizer_costs(popsize, intrinsic_dim, seed, max(5, generations))
    for row in rows:
        row["evals_per_s"] = popsize / row["generation_s"]
    return {
        "model": info["model"],
        "task": task,
        "layer": layer,
        "num_layers": info["num_layers"],
        "popsize": popsize,
        "dim": intrinsic_dim,
        "max_tokens": max_tokens,
        "train_examples": info["split_sizes"]["train"],
        "dtype": info["dtype"],
        "generations": generations,
        "rows": rows,
        "optimizer": optimizer,
    }


def _optimizer_costs(popsize: int, dim: int, seed: int, generations: int) -> dict:
    """Seconds per ask + tell of one CMA-ES layer optimizer, in-process and in the pool
    actor (losses made up; the remote cost adds two round trips and Z going both ways)."""
    from dfo_lora.distributed.optimizers import RemoteOptimizers
    from dfo_lora.optim import make_optimizer

    def step(opt) -> float:
        started = time.perf_counter()
        z = opt.ask()
        opt.tell(z, np.sum(z * z, axis=1))
        return time.perf_counter() - started

    local = make_optimizer("cma", dim, popsize, 1.0, seed)
    pool = RemoteOptimizers()
    try:
        remote = pool.make("cma", dim, popsize, 1.0, seed)
        step(local), step(remote)  # warm-up
        times = [(step(local), step(remote)) for _ in range(generations)]
    finally:
        pool.close()
    return {
        "in_process_s": statistics.median(t[0] for t in times),
        "actor_s": statistics.median(t[1] for t in times),
    }


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']} on {result['task']} ({result['train_examples']} train examples, "
        f"{result['dtype']}), popsize {result['popsize']}, d {result['dim']}, layer "
        f"{result['layer']} of {result['num_layers']}, max_tokens {result['max_tokens']}; "
        f"median of {result['generations']} generations",
        "",
        "| setting | shares | s / generation | evaluations/s | slowest share in actor (s) "
        "| overhead / generation (ms) | driver CPU / generation (ms) | round trip (ms) "
        "| round trip with population (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["servers"] == 0:
            lines.append(
                f"| {r['setting']} | - | {r['generation_s']:.3f} | {r['evals_per_s']:.1f} "
                "| - | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {r['setting']} | {r['shares']} | {r['generation_s']:.3f} | "
            f"{r['evals_per_s']:.1f} | {r['slowest_share_compute_s']:.3f} | "
            f"{1000 * r['overhead_s']:.1f} | {1000 * r['driver_cpu_s']:.1f} | "
            f"{1000 * r['round_trip_s']:.2f} | "
            f"{1000 * r['round_trip_with_population_s']:.2f} |"
        )
    opt = result["optimizer"]
    lines += [
        "",
        f"CMA-ES ask + tell per generation (d {result['dim']}, popsize {result['popsize']}): "
        f"in-process {1000 * opt['in_process_s']:.1f} ms, in the optimizer actor "
        f"{1000 * opt['actor_s']:.1f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--layer", type=int, default=0, help="layer scored (0 = full depth)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-server", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--intrinsic-dim", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run_bench(
        args.model,
        args.task,
        args.popsize,
        args.layer,
        args.generations,
        tuple(args.servers),
        args.cpus_per_server,
        args.max_tokens,
        args.intrinsic_dim,
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
