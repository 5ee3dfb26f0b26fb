"""Is what CMA-ES ranks in bf16 the candidates' loss, or rounding? (issue 21 §2, Precision)

    OMP_NUM_THREADS=1 python experiments/precision.py --task sst2 --seed 42 --layers 0,15,29 \
        --steps 0.2,0.02 --out experiments/quality/ceiling/precision.jsonl

Builds the recommended search's server (experiments/configs/recommended.yaml) once per
dtype (bf16, fp32) on the same data, draws the population CMA-ES draws first at a layer
(20 candidates z ~ s N(0, I), the other layers at z = 0) and scores it in both. Per layer
and step s it reports the spread of the population's train losses in each dtype, the
rounding error of one candidate (bf16 loss minus fp32 loss: its std over the population)
and how well the bf16 ranking agrees with the fp32 one (Spearman rho, and whether both
pick the same best candidate: what `commit best` keeps). One JSON line per (layer, s).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dfo_lora.config import load_config
from dfo_lora.server.factory import build_server


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = [np.argsort(np.argsort(x)) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/recommended.yaml")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--steps", default="0.2,0.02")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    layers = [int(x) for x in args.layers.split(",")]
    steps = [float(x) for x in args.steps.split(",")]
    losses: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    reference = None
    for dtype in ("fp32", "bf16"):
        overrides = {"task": args.task, "seed": args.seed, "dtype": dtype, "test_limit": 1}
        server = build_server(load_config(args.config, overrides).server_spec())
        # One space for both: the fixed A comes from moments measured in the server's
        # dtype, and an eigenvector can come out with the other sign in bf16, which
        # reverses a delta linear in z; the fp32 server's space makes z the same adapter.
        if reference is None:
            reference = server.space
        server.space = reference
        rng = np.random.default_rng(args.seed)  # the same candidates in both dtypes
        started = time.perf_counter()
        for layer in layers:
            for step in steps:
                z = step * rng.standard_normal((args.popsize, server.dim))
                losses[f"{dtype}/{layer}/{step}"] = server.score(layer, z)["loss"]
        seconds[dtype] = time.perf_counter() - started
        del server
    del reference
    rows = []
    for layer in layers:
        for step in steps:
            f32, b16 = losses[f"fp32/{layer}/{step}"], losses[f"bf16/{layer}/{step}"]
            rows.append(
                {
                    "space": "shared fp32 space",
                    "task": args.task,
                    "seed": args.seed,
                    "layer": layer,
                    "step": step,
                    "spread_fp32": float(np.std(f32)),
                    "spread_bf16": float(np.std(b16)),
                    "rounding_std": float(np.std(b16 - f32)),
                    "rounding_bias": float(np.mean(b16 - f32)),
                    "spearman": spearman(f32, b16),
                    "same_best": bool(np.argmin(f32) == np.argmin(b16)),
                    "fp32_rank_of_bf16_best": int(np.argsort(np.argsort(f32))[np.argmin(b16)]),
                    "score_seconds": seconds,
                }
            )
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| layer | s | spread fp32 | spread bf16 | rounding std | Spearman | same best |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['step']} | {r['spread_fp32']:.5f} | {r['spread_bf16']:.5f} "
            f"| {r['rounding_std']:.5f} | {r['spearman']:.2f} | {r['same_best']} |"
        )
    print(f"score time: {seconds}")


if __name__ == "__main__":
    main()
