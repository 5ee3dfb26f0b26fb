"""Driver for `ray job submit`: a sweep (or one tuning run) on a Ray cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python experiments/ray_job.py experiments/configs/sweep_example.yaml \\
        --out /shared/runs/sweep-example

The driver runs on the cluster's head node; `ray job submit` sets RAY_ADDRESS, which
`address: auto` picks up. Results go to `--out` (a path on the head node, best a shared
file system): one folder per run and `sweep.jsonl`. Submitting the same job again skips
finished runs and resumes interrupted ones from their checkpoints.

    python experiments/ray_job.py --tune experiments/configs/recommended.yaml --out DIR

runs one `dfo-lora tune` on the Ray backend (`--servers N` replicas) instead; submitted
again, it resumes from the run's checkpoint.
Exit codes: 0 all runs finished, 1 some failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a dfo-lora sweep as a Ray job.")
    parser.add_argument("sweep", nargs="?", help="sweep YAML (see configs/sweep_example.yaml)")
    parser.add_argument("--out", required=True, help="where results go (on the head node)")
    parser.add_argument("--concurrency", type=int, help="runs at a time (0: as the cluster fits)")
    parser.add_argument("--tune", metavar="CONFIG", help="one tuning run from this config")
    parser.add_argument("--servers", type=int, default=1, help="with --tune: server actors")
    parser.add_argument("--gpus-per-server", type=float, default=0.0, help="with --tune")
    parser.add_argument("--cpus-per-server", type=float, default=1.0, help="with --tune")
    args = parser.parse_args(argv)
    if bool(args.sweep) == bool(args.tune):
        parser.error("give a sweep file or --tune CONFIG (one of them)")

    from dfo_lora.errors import UserError

    try:
        if args.tune:
            from dfo_lora.cli import summary
            from dfo_lora.config import load_config
            from dfo_lora.distributed import run_tune
            from dfo_lora.search.run import CHECKPOINT

            overrides = {
                "backend": "ray",
                "servers": args.servers,
                "gpus_per_server": args.gpus_per_server,
                "cpus_per_server": args.cpus_per_server,
            }
            config = load_config(args.tune, overrides)
            resume = (Path(args.out) / CHECKPOINT).is_file()  # a resubmitted job continues
            results = run_tune(config, args.out, resume=resume, overwrite=True, progress=False)
            print(summary(results, args.out), flush=True)
            return 0
        from dfo_lora.sweep import run_sweep

        done = run_sweep(args.sweep, out=args.out, concurrency=args.concurrency)
        print(
            f"sweep: {done['done']} done, {done['skipped']} skipped, {done['failed']} failed; "
            f"{done['jsonl']}",
            flush=True,
        )
        return 1 if done["failed"] else 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
