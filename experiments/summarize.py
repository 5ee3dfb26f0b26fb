"""Summarise finished runs as a Markdown table: mean ± std over seeds per setting.

    python experiments/summarize.py runs/            # every */results.json below runs/

A setting is (model, task, k, optimizer, targets, layers, sigma, alpha, calibrate, budget);
seeds are pooled. A second table compares optimizers of otherwise equal settings on the
seeds they all ran. Also shown: in how many runs the best dev state was the zero state
(tuned = zero-shot), the lowest train loss any candidate reached (how far the optimizer got
on its own objective), evaluations per second of search and the peak memory.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml


def setting_of(config: dict) -> tuple:
    return (
        Path(str(config["model"])).name,
        Path(str(config["task"])).stem,
        config["k"],
        config["optimizer"] if config["optimizer"] != "fwa" else config["fwa_variant"],
        ",".join(config["targets"] or ["q", "k"]),
        config.get("layers", "all"),
        config["sigma"],
        config["alpha"],
        "yes" if config.get("calibrate") else "no",
        config["budget"],
    )


def collect(root: Path) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for results_path in sorted(root.rglob("results.json")):
        config = yaml.safe_load((results_path.parent / "config.yaml").read_text())
        results = json.loads(results_path.read_text())
        results["best_train_loss"] = best_train_loss(results_path.parent / "log.jsonl")
        groups[setting_of(config)].append({"seed": config["seed"], **results})
    return groups


def best_train_loss(log: Path) -> float:
    """Lowest train loss any candidate reached: how far the optimizer got on its objective."""
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    losses = [x["loss_min"] for x in lines if x.get("kind") == "generation" and x["loss_min"]]
    return min(losses, default=float("nan"))


def mean_std(values: list[float]) -> str:
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f} ± {arr.std():.1f}" if len(arr) > 1 else f"{arr.mean():.1f}"


def table(groups: dict[tuple, list[dict]]) -> str:
    head = (
        "| model | task | k | optimizer | targets | layers | sigma | alpha | calibrate | budget "
        "| seeds | zero-shot test | tuned test | tuned − zero-shot | dev kept z = 0 "
        "| best train loss | wall time (s) | evals/s | peak mem (GB) |\n" + "|---" * 19 + "|"
    )
    rows = [head]
    for setting, runs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        metric = runs[0]["metric"]
        zero = [r["zero_shot"]["test"][metric] for r in runs]
        tuned = [r["tuned"]["test"][metric] for r in runs]
        gain = [t - z for t, z in zip(tuned, zero, strict=True)]
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        wall = np.mean([r["wall_time_s"] for r in runs])
        rate = np.mean([r["evaluations"] / r["wall_time_s"] for r in runs])
        memory = max(r.get("peak_mem_bytes", 0) for r in runs) / 1e9
        cells = [
            *map(str, setting),
            seeds,
            mean_std(zero),
            mean_std(tuned),
            mean_std(gain),
            f"{sum(r['best_dev_evals'] == 0 for r in runs)}/{len(runs)}",
            f"{np.mean([r['best_train_loss'] for r in runs]):.3f}",
            f"{wall:.0f}",
            f"{rate:.2f}",
            f"{memory:.2f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


OPTIMIZER_COLUMN = 3  # index of the optimizer in setting_of()


def paired_table(groups: dict[tuple, list[dict]]) -> str:
    """Optimizers of otherwise equal settings on the seeds they all ran: tuned test and its
    difference from the first optimizer (cma when present), seed by seed."""
    families: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(dict)
    for setting, runs in groups.items():
        rest = setting[:OPTIMIZER_COLUMN] + setting[OPTIMIZER_COLUMN + 1 :]
        families[rest][setting[OPTIMIZER_COLUMN]] = {r["seed"]: r for r in runs}
    rows = [
        "| task | optimizer | common seeds | tuned test | − first optimizer | best train loss "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rest, by_optimizer in sorted(families.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if len(by_optimizer) < 2:
            continue
        names = sorted(by_optimizer, key=lambda n: (n != "cma", n))
        seeds = sorted(set.intersection(*(set(by_optimizer[n]) for n in names)))
        if not seeds:
            continue
        metric = by_optimizer[names[0]][seeds[0]]["metric"]
        first = [by_optimizer[names[0]][s]["tuned"]["test"][metric] for s in seeds]
        for name in names:
            runs = [by_optimizer[name][s] for s in seeds]
            tuned = [r["tuned"]["test"][metric] for r in runs]
            diff = [t - f for t, f in zip(tuned, first, strict=True)]
            cells = [
                str(rest[1]),
                name,
                ",".join(map(str, seeds)),
                mean_std(tuned),
                mean_std(diff),
                f"{np.mean([r['best_train_loss'] for r in runs]):.3f}",
                f"{np.mean([r['wall_time_s'] for r in runs]):.0f}",
            ]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    found = collect(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
    print(table(found))
    paired = paired_table(found)
    if paired.count("\n") > 1:
        print("\nOptimizers compared on common seeds:\n")
        print(paired)
