"""Is what the search ranks in bf16 the candidates' loss, or rounding? (issue 21 §2, Precision)

    OMP_NUM_THREADS=1 python experiments/precision.py --task sst2 --seed 42 --layers 0,15,29 \
        --steps 0.2,0.02 --dtypes bf16,bf16-mixed --out experiments/quality/ceiling/precision.jsonl

Builds the recommended search's server (experiments/configs/recommended.yaml) once in fp32
and once per other dtype (`--dtypes`: bf16, bf16-mixed, fp16) on the same data, draws the
population CMA-ES draws first at a layer (20 candidates z ~ s N(0, I), the other layers at
z = 0) and scores it in each. Per layer, step s and dtype it reports the spread of the
population's train losses in fp32 and in the dtype, the rounding error of one candidate
(loss minus fp32 loss: its std over the population) and how well the dtype's ranking
agrees with fp32's (Spearman rho, and whether both pick the same best candidate: what
`commit best` keeps). One JSON line per (layer, s, dtype). With `--state RUN`, the same
around a finished run's tuned state (its task and seed): the rounding where a search ends,
not only at its start.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dfo_lora.config import load_config
from dfo_lora.search.tuned import load_tuned
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
    parser.add_argument("--dtypes", default="bf16", help="compared with fp32, comma-separated")
    parser.add_argument(
        "--state",
        type=Path,
        help="a finished run's folder: measure around its tuned state (the population at "
        "a layer is its z plus s N(0, I), the other layers at theirs) on its task and seed",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    state = None
    if args.state is not None:
        state, run_config = load_tuned(args.state)
        args.task, args.seed = run_config.task, run_config.seed

    layers = [int(x) for x in args.layers.split(",")]
    steps = [float(x) for x in args.steps.split(",")]
    losses: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    reference = None
    dtypes = args.dtypes.split(",")
    for dtype in ("fp32", *dtypes):
        overrides = {"task": args.task, "seed": args.seed, "dtype": dtype, "test_limit": 1}
        server = build_server(load_config(args.config, overrides).server_spec())
        # One space for both: the fixed A comes from moments measured in the server's
        # dtype, and an eigenvector can come out with the other sign in bf16, which
        # reverses a delta linear in z; the fp32 server's space makes z the same adapter.
        if reference is None:
            reference = server.space
        server.space = reference
        center = np.zeros((server.num_layers, server.dim)) if state is None else state
        server.set_state(center)
        rng = np.random.default_rng(args.seed)  # the same candidates in both dtypes
        started = time.perf_counter()
        for layer in layers:
            for step in steps:
                z = center[layer] + step * rng.standard_normal((args.popsize, server.dim))
                losses[f"{dtype}/{layer}/{step}"] = server.score(layer, z)["loss"]
        seconds[dtype] = time.perf_counter() - started
        del server
    del reference
    rows = []
    for layer in layers:
        for step in steps:
            for dtype in dtypes:
                f32, low = losses[f"fp32/{layer}/{step}"], losses[f"{dtype}/{layer}/{step}"]
                rows.append(
                    {
                        "space": "shared fp32 space",
                        "state": str(args.state) if state is not None else "zero",
                        "task": args.task,
                        "seed": args.seed,
                        "dtype": dtype,
                        "layer": layer,
                        "step": step,
                        "spread_fp32": float(np.std(f32)),
                        "spread": float(np.std(low)),
                        "rounding_std": float(np.std(low - f32)),
                        "rounding_bias": float(np.mean(low - f32)),
                        "spearman": spearman(f32, low),
                        "same_best": bool(np.argmin(f32) == np.argmin(low)),
                        "fp32_rank_of_best": int(np.argsort(np.argsort(f32))[np.argmin(low)]),
                        "score_seconds": seconds,
                    }
                )
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("| layer | s | dtype | spread fp32 | spread | rounding std | Spearman | same best |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['step']} | {r['dtype']} | {r['spread_fp32']:.5f} "
            f"| {r['spread']:.5f} | {r['rounding_std']:.5f} | {r['spearman']:.2f} "
            f"| {r['same_best']} |"
        )
    print(f"score time: {seconds}")


if __name__ == "__main__":
    main()
