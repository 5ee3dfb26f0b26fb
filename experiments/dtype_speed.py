"""Speed of the recommended search's scoring in each dtype, timed at the same moments.

    OMP_NUM_THREADS=2 python experiments/dtype_speed.py --dtypes bf16,bf16-mixed,fp32 \
        --out experiments/quality/ceiling/dtype_speed.jsonl

Builds the recommended search's server (experiments/configs/recommended.yaml) once per
dtype on the same data and runs one round over every layer: at each layer each server in
turn scores the same population (z ~ sigma N(0, I)), so a change in the machine's load
falls on every dtype alike and the ratios hold on a shared machine. Reports each dtype's
candidate evaluations per second and its time relative to the first dtype; one JSON line
per dtype (with the CPU flags and thread count).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dfo_lora.config import load_config
from dfo_lora.search.run import hardware
from dfo_lora.server.factory import build_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/recommended.yaml")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtypes", default="bf16,bf16-mixed,fp32")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dtypes = args.dtypes.split(",")
    servers = {}
    for dtype in dtypes:
        overrides = {"task": args.task, "seed": args.seed, "dtype": dtype, "test_limit": 1}
        config = load_config(args.config, overrides)
        servers[dtype] = build_server(config.server_spec())
    first = servers[dtypes[0]]
    rng = np.random.default_rng(args.seed)
    seconds = dict.fromkeys(dtypes, 0.0)
    evals = 0
    for _ in range(args.rounds):
        for layer in range(first.num_layers):
            z = config.sigma * rng.standard_normal((config.popsize, first.dim))
            for dtype in dtypes:
                started = time.perf_counter()
                servers[dtype].score(layer, z)
                seconds[dtype] += time.perf_counter() - started
            evals += len(z)
    rows = []
    for dtype in dtypes:
        rows.append(
            {
                "task": args.task,
                "dtype": dtype,
                "precision": servers[dtype].info()["dtype"],
                "evaluations": evals,
                "seconds": seconds[dtype],
                "evals_per_s": evals / seconds[dtype],
                "time_vs_first": seconds[dtype] / seconds[dtypes[0]],
                "threads": torch.get_num_threads(),
                "cpu_flags": hardware()["cpu_flags"],
            }
        )
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| dtype | evals/s | time vs " + dtypes[0] + " |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['evals_per_s']:.2f} | {r['time_vs_first']:.2f} |")


if __name__ == "__main__":
    main()
