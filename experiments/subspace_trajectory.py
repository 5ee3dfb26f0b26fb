"""The space's ceiling along its path: `subspace-gradient` with test scored at every dev check.

    OMP_NUM_THREADS=1 python experiments/subspace_trajectory.py OUT.jsonl --task sst2 \
        --seed 42 --intrinsic-dim 8 --lr 0.003 [--steps 100 --eval-every 10 --test-limit 1000]

Runs the `subspace-gradient` baseline (AdamW on the recommended space's z, calibrated CE,
full batch; experiments/configs/recommended.yaml gives the space) and, for this diagnosis
only, also scores test at each dev check, so the best test state along the path and the
test accuracy at the train loss the search reaches can be read off (as
experiments/trajectory.py does for the search). One JSON line per check: step, train loss
of the last step, dev and test metric and loss, ||z||. A real run never looks at test
before its end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dfo_lora.baselines import get_method, subspace_gradient
from dfo_lora.baselines.run import prepare_context
from dfo_lora.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", default="experiments/configs/recommended.yaml")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--intrinsic-dim", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--test-limit", type=int, default=1000)
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    overrides = {
        "task": args.task,
        "seed": args.seed,
        "intrinsic_dim": args.intrinsic_dim,
        "test_limit": args.test_limit,
        "dtype": args.dtype,
    }
    config = load_config(args.config, overrides)
    options = get_method("subspace-gradient").resolve(
        {
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "calibrate": True,
            "select": "final",
        }
    )
    run_dir = Path("runs/subspace-trajectory") / args.out.stem  # the baseline's own folder
    ctx = prepare_context("subspace-gradient", config, options, run_dir, progress=False)
    ctx.score_prompt()
    args.out.write_text("")
    train = {"loss": None}
    log_step, log_dev = ctx.log_step, ctx.log_dev

    def on_step(record: dict) -> None:
        train["loss"] = record["loss_min"]
        train["z_norm"] = record["z_norm"]
        log_step(record)

    def on_dev(record: dict) -> None:
        test = ctx.evaluate("test", calibrate=True)
        row = {
            "task": args.task,
            "seed": args.seed,
            "intrinsic_dim": args.intrinsic_dim,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "dtype": args.dtype,
            "step": record["step"],
            "train_loss": train["loss"],
            "z_norm": train.get("z_norm", 0.0),
            "dev": record["dev"],
            "test": test,
        }
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{record['step']:4d} train {train['loss'] or 0:.3f} dev "
            f"{record['dev']['accuracy']:.3f}/{record['dev']['loss']:.3f} "
            f"test {test['accuracy']:.3f}/{test['loss']:.3f}",
            flush=True,
        )
        log_dev(record)

    ctx.log_step, ctx.log_dev = on_step, on_dev
    results = subspace_gradient.run(ctx)
    print(json.dumps({"calibrated": ctx.calibrated_zero_shot["test"], "final": results["tuned"]}))


if __name__ == "__main__":
    main()
