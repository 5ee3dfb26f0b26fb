"""Speed of BBT's and BBTv2's scoring with the prompt once per candidate, timed at the same moments.

    OMP_NUM_THREADS=1 python experiments/prompt_speed.py --tasks sst2,mr,trec,rte,agnews \
        --out experiments/paper/prompt_speed.jsonl

Builds two servers of the paper table's prompt space (experiments/paper/table-smollm2.yaml:
50 prompt tokens, d = 500) on the same backbone and data, one with the prompt in front of
every example (`ServerOptions(shared_prefix=False)`) and one that runs it once per
candidate (the default), and lets each in turn score the same population at the same
layers (0: BBT's only layer; with `--deep`, BBTv2's space at the given layers), `--repeats`
times in turn, so a change in the machine's load falls on both alike; each path's fastest
time counts. One JSON line per task and layer: each path's seconds and candidate
evaluations per second, their ratio, and the largest
difference between the two paths' losses beside the spread of the population's losses
(the paths agree up to rounding); with `--fp32-truth`, each path's largest distance from
the losses of an fp32 server with the prompt in front (the rounding each path adds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dfo_lora.backbone import load_backbone
from dfo_lora.search.run import hardware
from dfo_lora.server.factory import ServerSpec, build_server, load_data
from dfo_lora.server.server import ServerOptions
from dfo_lora.spaces.prompt.config import DeepPromptConfig, PromptConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2")
    parser.add_argument("--deep", action="store_true", help="BBTv2's space (every layer)")
    parser.add_argument("--layers", default="0", help="comma-separated layers to score")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--fp32-truth", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    backbone = load_backbone("smollm2-135m", args.dtype, "auto", False)
    kind = DeepPromptConfig if args.deep else PromptConfig
    space = kind(length=50, intrinsic_dim=500)
    rng = np.random.default_rng(0)
    for task in args.tasks.split(","):
        spec = ServerSpec(task=task, dtype=args.dtype, test_limit=10, space=space)
        data = load_data(spec)
        servers = {
            shared: build_server(
                ServerSpec(
                    task=task,
                    dtype=args.dtype,
                    test_limit=10,
                    space=space,
                    options=ServerOptions(shared_prefix=shared),
                ),
                backbone,
                data,
            )
            for shared in (False, True)
        }
        truth = None
        if args.fp32_truth:
            truth = build_server(
                ServerSpec(
                    task=task,
                    dtype="fp32",
                    test_limit=10,
                    space=space,
                    options=ServerOptions(shared_prefix=False),
                ),
                data=data,
            )
        for layer in (int(x) for x in args.layers.split(",")):
            z = rng.normal(size=(args.popsize, space.intrinsic_dim))
            seconds, losses = {False: float("inf"), True: float("inf")}, {}
            for _ in range(args.repeats):
                for shared, server in servers.items():
                    start = time.perf_counter()
                    losses[shared] = server.score(layer, z)["loss"]
                    seconds[shared] = min(seconds[shared], time.perf_counter() - start)
            record = {
                "task": task,
                "space": space.name,
                "layer": layer,
                "popsize": args.popsize,
                "repeats": args.repeats,
                "train_examples": servers[True].split_sizes["train"],
                "in_front_s": round(seconds[False], 3),
                "once_per_candidate_s": round(seconds[True], 3),
                "in_front_evals_per_s": round(args.popsize / seconds[False], 3),
                "once_per_candidate_evals_per_s": round(args.popsize / seconds[True], 3),
                "speedup": round(seconds[False] / seconds[True], 3),
                "max_loss_difference": float(np.abs(losses[True] - losses[False]).max()),
                "loss_spread": float(np.ptp(losses[False])),
                **_distance_from(truth, layer, z, losses),
                "dtype": str(backbone.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(),
                **hardware(),
            }
            print(json.dumps(record), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _distance_from(truth, layer: int, z: np.ndarray, losses: dict) -> dict:
    """Each path's largest distance from the fp32 server's losses (none without one)."""
    if truth is None:
        return {}
    want = truth.score(layer, z)["loss"]
    return {
        "in_front_max_from_fp32": float(np.abs(losses[False] - want).max()),
        "once_per_candidate_max_from_fp32": float(np.abs(losses[True] - want).max()),
    }


if __name__ == "__main__":
    main()
