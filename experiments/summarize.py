"""Summarise finished runs as a Markdown table: mean ± std over seeds per setting.

    python experiments/summarize.py runs/            # every */results.json below runs/

A setting is (model, task, optimizer, targets, sigma, alpha, budget); seeds are pooled.
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
        config["optimizer"],
        ",".join(config["targets"]),
        config["sigma"],
        config["alpha"],
        config["budget"],
    )


def collect(root: Path) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for results_path in sorted(root.rglob("results.json")):
        config = yaml.safe_load((results_path.parent / "config.yaml").read_text())
        results = json.loads(results_path.read_text())
        groups[setting_of(config)].append({"seed": config["seed"], **results})
    return groups


def mean_std(values: list[float]) -> str:
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.1f} ± {arr.std():.1f}" if len(arr) > 1 else f"{arr.mean():.1f}"


def table(groups: dict[tuple, list[dict]]) -> str:
    head = (
        "| model | task | optimizer | targets | sigma | alpha | budget | seeds "
        "| zero-shot test | tuned test | tuned − zero-shot | wall time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for setting, runs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        metric = runs[0]["metric"]
        zero = [r["zero_shot"]["test"][metric] for r in runs]
        tuned = [r["tuned"]["test"][metric] for r in runs]
        gain = [t - z for t, z in zip(tuned, zero, strict=True)]
        seeds = ",".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
        wall = np.mean([r["wall_time_s"] for r in runs])
        cells = [
            *map(str, setting),
            seeds,
            mean_std(zero),
            mean_std(tuned),
            mean_std(gain),
            f"{wall:.0f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(collect(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))))
