"""When does the mean of the search's path beat its last state? A table from the traces.

    python experiments/quality/averaging_rule.py [TRACE.jsonl ...] [--evals 1800]
    python experiments/quality/averaging_rule.py --runs runs/lever-esgrad-fitavg

With `--runs`, reads a sweep of `select: average_if_fit` runs instead (their results.json
hold the train fit, whether the run averaged and, if it did, the last state's test) and
prints per cell the calibrated zero state, the last state, the rule's state and gradient
LoRA, with the per-task means.

Reads the path-averaging traces (`experiments/trajectory.py --average-last 3,99`, default:
experiments/quality/trajectories/amx/*-esgrad-avg-*.jsonl), and at `--evals` scores the
committed state's *train* split (calibrated accuracy and loss; one 32-example forward,
what a run can see), cached in `fit.jsonl` beside the traces. Prints per cell: the
calibrated zero state (the trace's start), the committed state's test, the mean of the
path (start included) and of the last three round ends, the train fit, and gradient
LoRA's test of the same cell (experiments/quality/results.jsonl), so a rule that chooses
between the committed state and the mean from the train fit alone can be read off.
"""

import argparse
import functools
import json
import re
from pathlib import Path

import numpy as np

TRACES = Path("experiments/quality/trajectories/amx")
RESULTS = Path("experiments/quality/results.jsonl")
CONFIG = "experiments/configs/recommended.yaml"
NAME = re.compile(r"(?P<task>[a-z0-9]+)-esgrad-avg-s(?P<seed>\d+)-")


@functools.cache
def ceilings() -> dict[tuple[str, int], float]:
    """Gradient LoRA's test per (task, seed), read once from results.jsonl."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    return {(r["task"], r["seed"]): r["test"] for r in rows if r["method"] == "gradient-lora"}


def ceiling(task: str, seed: int) -> float | None:
    return ceilings().get((task, seed))


def train_fit(cache: Path, key: str, task: str, seed: int, z: np.ndarray) -> dict:
    """The committed state's calibrated train accuracy and loss, cached by `key`."""
    rows = [json.loads(x) for x in cache.read_text().splitlines()] if cache.is_file() else []
    for r in rows:
        if r["key"] == key:
            return r["train"]
    from dfo_lora.config import load_config
    from dfo_lora.server.factory import build_server

    config = load_config(CONFIG, {"task": task, "seed": seed, "test_limit": 1000})
    server = build_server(config.server_spec())
    server.set_state(z)
    train = server.evaluate("train")
    with cache.open("a") as f:
        f.write(json.dumps({"key": key, "train": train}) + "\n")
    return train


def runs_table(folder: Path) -> None:
    """The rule against the last state, per cell of a sweep of average_if_fit runs."""
    cells = []
    for path in sorted(folder.glob("*/results.json")):
        r = json.loads(path.read_text())
        task = re.search(r"task=([a-z0-9]+)", path.parent.name)[1]
        seed = int(re.search(r"seed=(\d+)", path.parent.name)[1])
        rule = r["tuned"]["test"]["accuracy"]
        last = r["last_state"]["test"]["accuracy"] if r.get("averaged") else rule
        ceil = ceiling(task, seed)
        cells.append((task, seed, r["zero_shot"]["test"]["accuracy"], last, rule, r, ceil))
    print(
        "| task | seed | calibrated zero state | last state | average_if_fit | train acc "
        "| averaged | gradient LoRA |\n|---|---|---|---|---|---|---|---|"
    )
    for task, seed, zero, last, rule, r, ceil in cells:
        fit = r["train_fit"]["accuracy"]
        print(
            f"| {task} | {seed} | {100 * zero:.1f} | {100 * last:.1f} | {100 * rule:.1f} "
            f"| {100 * fit:.1f} | {'yes' if r['averaged'] else 'no'} "
            f"| {'' if ceil is None else f'{100 * ceil:.1f}'} |"
        )
    for task in dict.fromkeys(c[0] for c in cells):
        mine = [c for c in cells if c[0] == task]
        means = [np.mean([c[i] for c in mine]) * 100 for i in (2, 3, 4)]
        ceils = [c[6] for c in mine if c[6] is not None]
        ceil = f"{100 * np.mean(ceils):.1f}" if len(ceils) == len(mine) else "—"
        print(
            f"| {task} mean ({len(mine)}) | | "
            + " | ".join(f"{m:.1f}" for m in means)
            + f" | | | {ceil} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="*", type=Path)
    parser.add_argument("--evals", type=int, default=1800)
    parser.add_argument("--runs", type=Path, help="a sweep folder of average_if_fit runs")
    args = parser.parse_args()
    if args.runs:
        runs_table(args.runs)
        return
    traces = args.traces or sorted(TRACES.glob("*-esgrad-avg-*.jsonl"))
    print(
        "| task | seed | zero | committed | mean of path | last 3 | train acc | train CE "
        "| gradient LoRA |\n|---|---|---|---|---|---|---|---|---|"
    )
    for path in traces:
        m = NAME.match(path.name)
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        at = [r for r in rows if r["evals"] == args.evals]
        if not m or not at:
            continue
        task, seed, row = m["task"], int(m["seed"]), at[0]
        key = f"{path.name}@{args.evals}"
        fit = train_fit(path.parent / "fit.jsonl", key, task, seed, np.asarray(row["z"]))
        avg = row["average"]
        cells = [
            rows[0]["test"]["accuracy"],
            row["test"]["accuracy"],
            avg[max(avg, key=int)]["test"]["accuracy"],  # K past the checks: all
            avg["3"]["test"]["accuracy"],
            fit["accuracy"],
        ]
        ceil = ceiling(task, seed)
        print(
            f"| {task} | {seed} | "
            + " | ".join(f"{100 * c:.1f}" for c in cells)
            + f" | {fit['loss']:.3f} | {'' if ceil is None else f'{100 * ceil:.1f}'} |"
        )


if __name__ == "__main__":
    main()
