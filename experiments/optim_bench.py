"""Optimizers on benchmark functions: best value after equal evaluations.

Every optimizer of `dfo_lora.optim` (CMA-ES full and diagonal, FWA, EFWA, dynFWA, BBFWA)
minimises shifted sphere / ellipsoid / Rastrigin / Rosenbrock (optimum ~ U[-2, 2]^d,
value 0; see dfo_lora/optim/testfunctions.py) from z = 0 with the same popsize, sigma
and number of evaluations, over several seeds. Prints a Markdown table of the best value
reached (mean ± std over seeds) and, with --out, writes it to a file; --jsonl keeps one
line per run.

    .venv/bin/python experiments/optim_bench.py --budget 5000 --seeds 5 --workers 2

EFWA is given its budget (`max_evals` = --budget) for its minimal-amplitude schedule;
every other option is the optimizer's default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfo_lora.optim import OPTIMIZER_NAMES, make_optimizer  # noqa: E402
from dfo_lora.optim.testfunctions import FUNCTIONS, make_problem  # noqa: E402

PROBLEM_SEED = 1  # where the optimum lies; the optimizers' seeds vary


def run_one(job: dict) -> dict:
    """One optimizer on one function for `budget` evaluations."""
    name, function, dim, seed = job["name"], job["function"], job["dim"], job["seed"]
    budget, popsize, sigma = job["budget"], job["popsize"], job["sigma"]
    objective = make_problem(function, dim, seed=PROBLEM_SEED)
    options = {"max_evals": budget} if name == "efwa" else {}
    opt = make_optimizer(name, dim, popsize, sigma, seed, **options)
    start = time.perf_counter()
    for _ in range(budget // popsize):
        z = opt.ask()
        opt.tell(z, objective(z))
    seconds = time.perf_counter() - start
    return {
        **job,
        "evaluations": opt.evaluations,
        "best": opt.best[1],
        "f_at_zero": float(objective(np.zeros(dim))[0]),
        "seconds": seconds,
    }


def fmt(x: float) -> str:
    return f"{x:.3g}" if 1e-2 <= abs(x) < 1e4 else f"{x:.2e}"


def table(results: list[dict], names: list[str], functions: list[str], dims: list[int]) -> str:
    lines = [
        "| function | d | f(0) | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for function in functions:
        for dim in dims:
            cells, means = [], []
            f0 = None
            for name in names:
                rows = [
                    r
                    for r in results
                    if r["name"] == name and r["function"] == function and r["dim"] == dim
                ]
                best = np.array([r["best"] for r in rows])
                f0 = rows[0]["f_at_zero"]
                means.append(best.mean())
                cells.append(f"{fmt(best.mean())} ± {fmt(best.std())}")
            winner = int(np.argmin(means))
            cells[winner] = f"**{cells[winner]}**"
            lines.append(f"| {function} | {dim} | {fmt(f0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(results: list[dict], names: list[str], dims: list[int]) -> str:
    lines = [
        "| d | " + " | ".join(names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for dim in dims:
        cells = []
        for name in names:
            secs = [r["seconds"] for r in results if r["name"] == name and r["dim"] == dim]
            cells.append(f"{np.mean(secs):.2f}")
        lines.append(f"| {dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZER_NAMES))
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS))
    parser.add_argument("--dims", nargs="+", type=int, default=[10, 100, 500])
    parser.add_argument("--budget", type=int, default=5000, help="evaluations per run")
    parser.add_argument("--seeds", type=int, default=5, help="optimizer seeds 0..N-1")
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=1, help="processes")
    parser.add_argument("--out", type=Path, help="write the Markdown here too")
    parser.add_argument("--jsonl", type=Path, help="one JSON line per run")
    args = parser.parse_args(argv)

    jobs = [
        {
            "name": name,
            "function": function,
            "dim": dim,
            "seed": seed,
            "budget": args.budget,
            "popsize": args.popsize,
            "sigma": args.sigma,
        }
        for dim in sorted(args.dims, reverse=True)  # slowest first
        for function in args.functions
        for name in args.optimizers
        for seed in range(args.seeds)
    ]
    start = time.perf_counter()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(run_one, jobs))
    else:
        results = [run_one(job) for job in jobs]
    wall = time.perf_counter() - start

    dims = sorted(args.dims)
    command = "python experiments/optim_bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = "\n\n".join(
        [
            f"Best value after {args.budget} evaluations (popsize {args.popsize}, sigma "
            f"{args.sigma}, start z = 0, optimum ~ U[-2, 2]^d with value 0), mean ± std over "
            f"{args.seeds} seeds; bold = lowest mean in the row. f(0) = the start value.",
            table(results, args.optimizers, args.functions, dims),
            "Seconds per run (optimizer + objective, averaged over functions and seeds):",
            timing_table(results, args.optimizers, dims),
            f"`{command}` — {len(jobs)} runs in {wall:.0f} s wall, {args.workers} worker(s), "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"numpy {np.__version__}.",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.jsonl:
        with args.jsonl.open("w") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
