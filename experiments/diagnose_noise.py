"""Does a candidate that helps on the 32 train examples help on more data? (issue 3)

    python experiments/diagnose_noise.py --task mr --layer 26 --alphas 0.05,0.2

For each alpha: draw `--candidates` z ~ N(0, sigma^2 I) for one layer (CMA-ES's first
generation), score them on the k = 16 train set (32 examples) and on a k = 256 sample of
the same pool (512 examples; it may contain some of the 32), both with the calibrated CE
of `experiments/configs/fewshot.yaml`, and report how the two loss changes (vs z = 0) agree.
Both servers use the k = 16 server's projections, so a z means the same adapter in both.
"""

from __future__ import annotations

import argparse

import numpy as np

from dfo_lora.config import load_config
from dfo_lora.server.factory import build_server


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/configs/fewshot.yaml")
    parser.add_argument("--task", default="mr")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--layer", type=int, default=26)
    parser.add_argument("--alphas", default="0.05,0.2")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--big-k", type=int, default=256)
    args = parser.parse_args()

    print(
        "| alpha | layer | Pearson r | Spearman rho | mean Δ (32) | mean Δ (512) "
        "| best-on-32: Δ (32) | best-on-32: Δ (512) | share improving 512 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for alpha in map(float, args.alphas.split(",")):
        common = {"task": args.task, "seed": args.seed, "alpha": alpha, "test_limit": 1}
        small = build_server(load_config(args.config, {**common, "k": 16}).server_spec())
        big = build_server(load_config(args.config, {**common, "k": args.big_k}).server_spec())
        big.space = small.space  # the same z -> the same adapter in both servers
        sigma = load_config(args.config, common).sigma
        rng = np.random.default_rng(args.seed)
        z = np.vstack(
            [np.zeros(small.dim), sigma * rng.standard_normal((args.candidates, small.dim))]
        )
        loss_small = small.score(args.layer, z)["loss"]
        loss_big = big.score(args.layer, z)["loss"]
        d_small, d_big = loss_small[1:] - loss_small[0], loss_big[1:] - loss_big[0]
        best = int(np.argmin(d_small))
        print(
            f"| {alpha} | {args.layer} | {pearson(d_small, d_big):.2f} "
            f"| {spearman(d_small, d_big):.2f} | {d_small.mean():+.3f} | {d_big.mean():+.3f} "
            f"| {d_small[best]:+.3f} | {d_big[best]:+.3f} | {np.mean(d_big < 0):.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
