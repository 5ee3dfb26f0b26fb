"""The search's step rule with exact gradients: is the rule or the gradient estimate short?

    OMP_NUM_THREADS=1 python experiments/step_oracle.py OUT.jsonl --task trec --seed 42 \
        [--rule layerwise --lr 0.4 --rounds 3 --order bottom_up --normalize layer]

The recommended search (esgrad) visits the 30 layers in turn, estimates the layer's
gradient in its d = 8 z from 10 antithetic pairs and takes one step of length lr = 0.4;
1,800 evaluations are three rounds. Exact gradients in the same space (AdamW, lr 0.01,
100 joint steps; `subspace_trajectory.py`) reach 4-6 points more on trec. This script
replays the search's rule with the exact gradient of the layer's z (autograd through the
same maps, full batch, calibrated CE, fp32) in place of the estimate, so:

- if it reaches what AdamW reaches, the estimate (noise, rounding, curvature at sigma)
  is what the search lacks;
- if it stops where the search stops, the rule is, and its variants here say which part.

Rules: `layerwise` (block-coordinate, one step per visit, a fresh gradient each visit)
or `joint` (every layer steps at once from one gradient), or `adam` (torch's AdamW
with weight decay 0 on the whole z, lr per coordinate: the reference path of
`subspace_trajectory.py`, here with each layer's ||z|| logged). `--normalize`: `layer` (each
layer's step has length lr, esgrad's rule), `global` (the whole step has length
lr * sqrt(layers), so the layers move lr on average), `none` (plain gradient times lr),
and two per-coordinate directions, each scaled to length lr per layer so that only the
direction within a layer differs from esgrad's: `sign` (the sign of each coordinate's
gradient) and `adam` (Adam's m / (sqrt(v) + 1e-12) with betas 0.9 / 0.999 and bias
correction, moments kept per layer across its visits; its first visit is `sign`).
Test is scored after each round (layerwise) or every `--eval-every` steps (joint); one
JSON line per check with train CE, dev and test (for this diagnosis only) and ||z||.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dfo_lora.baselines import get_method
from dfo_lora.baselines.common import train_loss
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.subspace_gradient import install
from dfo_lora.config import load_config
from dfo_lora.optim.esgrad import adam_direction


def gradient(server, z: torch.Tensor) -> tuple[np.ndarray, float]:
    """The calibrated train CE at z (L, d) and its gradient, exact, full batch."""
    zt = z.clone().requires_grad_(True)
    install(server, zt)
    loss, _ = train_loss(server, "ce", True)
    loss.backward()
    return zt.grad.detach().numpy().astype(np.float64), float(loss.detach())


def layer_gradient(server, z: torch.Tensor, layer: int) -> tuple[np.ndarray, float]:
    """The loss at z and its gradient in `layer`'s row only (d,). The other rows are
    installed without autograd, so the backward pass stops at `layer` instead of running
    down to layer 0 for gradients a layer-wise visit does not use."""
    row = z[layer : layer + 1].clone().requires_grad_(True)
    install(server, z)
    server.install_weights(layer, server.space.weights(layer, row, server.backbone.dtype))
    loss, _ = train_loss(server, "ce", True)
    loss.backward()
    return row.grad[0].detach().numpy().astype(np.float64), float(loss.detach())


class Moments:
    """Adam's moments of each layer's gradient over its visits (esgrad's `adam_direction`)."""

    def __init__(self, shape: tuple[int, int]):
        self.moments = np.zeros((2, *shape))
        self.visits = np.zeros(shape[0], dtype=int)

    def direction(self, rows: np.ndarray, g: np.ndarray) -> np.ndarray:
        """m_hat / sqrt(v_hat) of `rows` after adding their gradients `g`."""
        self.visits[rows] += 1
        steps = self.visits[rows][:, None]
        self.moments[:, rows], direction = adam_direction(self.moments[:, rows], steps, g)
        return direction


def step(g: np.ndarray, lr: float, normalize: str) -> np.ndarray:
    """The move of the rows of g (one layer, or all) under the rule."""
    if normalize == "sign":
        g = np.sign(g)
    if normalize == "none":
        return lr * g
    if normalize == "global":
        norm = float(np.linalg.norm(g))
        return g * (lr * np.sqrt(g.shape[0]) / norm) if norm > 0 else 0 * g
    norms = np.linalg.norm(g, axis=-1, keepdims=True)
    return np.where(norms > 0, lr * g / np.maximum(norms, 1e-300), 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="experiments/configs/recommended.yaml")
    parser.add_argument("--task", default="trec")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rule", choices=("layerwise", "joint", "adam"), default="layerwise")
    parser.add_argument(
        "--normalize", choices=("layer", "global", "none", "sign", "adam"), default="layer"
    )
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--rounds", type=int, default=3, help="layerwise rounds or joint steps")
    parser.add_argument("--order", choices=("bottom_up", "top_down", "random"), default="bottom_up")
    parser.add_argument("--eval-every", type=int, default=1, help="rounds (or joint steps)")
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    overrides = {"task": args.task, "seed": args.seed, "test_limit": args.test_limit}
    config = load_config(args.config, {**overrides, "dtype": args.dtype})
    options = get_method("subspace-gradient").resolve({"calibrate": True, "select": "final"})
    run_dir = Path("runs/step-oracle") / args.out.stem
    ctx = prepare_context("subspace-gradient", config, options, run_dir, progress=False)
    server = ctx.server
    z = np.zeros((server.num_layers, server.dim))
    rng = np.random.default_rng([args.seed, 0x0AC1E])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("")
    started = time.perf_counter()

    def check(count: int, loss: float | None) -> None:
        server.set_state(z.copy())
        dev = ctx.evaluate("dev", calibrate=True)
        test = ctx.evaluate("test", calibrate=True)
        row = {
            **{k: v for k, v in vars(args).items() if k not in ("out", "config")},
            "count": count,
            "gradients": count * (server.num_layers if args.rule == "layerwise" else 1),
            "train_loss": loss,
            "z_norm": float(np.linalg.norm(z)),
            "layer_norms": np.linalg.norm(z, axis=1).round(3).tolist(),
            "dev": dev,
            "test": test,
            "time_s": time.perf_counter() - started,
        }
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{count:4d} train {loss or 0:.3f} test {test['accuracy']:.3f}/{test['loss']:.3f}"
            f" |z| {row['z_norm']:.2f}",
            flush=True,
        )

    check(0, None)
    layers = list(range(server.num_layers))
    moments = Moments(z.shape)

    def move(rows: np.ndarray, g: np.ndarray) -> np.ndarray:
        if args.normalize == "adam":
            return step(moments.direction(rows, g), args.lr, "layer")
        return step(g, args.lr, args.normalize)

    if args.rule == "adam":
        adam = torch.zeros(z.shape, dtype=torch.float32, requires_grad=True)
        adam_opt = torch.optim.AdamW([adam], lr=args.lr, weight_decay=0.0)
    for count in range(1, args.rounds + 1):
        if args.rule == "adam":
            g, loss = gradient(server, adam.detach())
            adam.grad = torch.tensor(g, dtype=torch.float32)
            adam_opt.step()
            z = adam.detach().double().numpy().copy()
        elif args.rule == "joint":
            g, loss = gradient(server, torch.tensor(z, dtype=torch.float32))
            z -= move(np.arange(server.num_layers), g)
        else:
            order = {"bottom_up": layers, "top_down": layers[::-1]}.get(args.order)
            for layer in order if order is not None else rng.permutation(layers):
                g, loss = layer_gradient(server, torch.tensor(z, dtype=torch.float32), layer)
                z[layer] -= move(np.array([layer]), g[None])[0]
        if count % args.eval_every == 0 or count == args.rounds:
            check(count, loss)


if __name__ == "__main__":
    main()
