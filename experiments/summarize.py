"""Summarise finished runs as a Markdown table: mean ± std over seeds per setting.

    python experiments/summarize.py runs/            # every */results.json below runs/

A setting is (model, task, k, optimizer, targets, layers, sigma, alpha, calibrate, budget);
seeds are pooled. Also shown: in how many runs the best dev state was the zero state
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
        ",".join(config["targets"]),
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


if __name__ == "__main__":
    print(table(collect(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))))
