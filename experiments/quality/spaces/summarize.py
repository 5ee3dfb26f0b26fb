"""The spaces record (issue 10): which search space wins per task, as the quality table.

    python experiments/quality/spaces/summarize.py [RUN_FOLDERS...]

Reads every finished run under the spaces' sweep folders (default: runs/spaces-*, the
outputs of this folder's YAML files) and tabulates each space under both selection rules
beside LoRA's runs of the quality benchmark (same budget, seeds and machine):
- `SPACE/dev-selected`: the state the run reported (`select: metric`, as the sweeps ran);
- `SPACE/last`: its last searched state (`select: final`, the recommended rule), scored by
  `experiments/quality/replay_final.py`. Runs not yet replayed are replayed here (a few
  minutes each) and their rows appended to experiments/quality/replays.jsonl;
- `lora/dev-selected` and `lora/last` are the quality benchmark's `cma/dev-selected` and
  `cma/recommended` rows (LoRA with A fixed, experiments/configs/recommended.yaml), and
  `calibrated` and `gradient-lora` its floor and ceiling.

SPACE is the run's `space`, with `-pca` when `adapter_down: pca` (series, parallel) or
`a_factor: pca` (hydra), and ` a=ALPHA` when alpha
is not the recommended 0.01. Writes results.jsonl and table.md next to this file (the
quality summarizer's format: mean ± std over seeds, and test minus the calibrated zero
state of the same runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
QUALITY = HERE.parent
REPLAYS = QUALITY / "replays.jsonl"
FROM_QUALITY = {  # quality benchmark method -> its name here
    "calibrated": "calibrated",
    "gradient-lora": "gradient-lora",
    "cma/dev-selected": "lora/dev-selected",
    "cma/recommended": "lora/last",
}


def replay_final():
    """experiments/quality/replay_final.py as a module (it also loads the summarizer)."""
    spec = importlib.util.spec_from_file_location(
        "quality_replay_final", QUALITY / "replay_final.py"
    )
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def space_of(run: Path) -> str:
    config = yaml.safe_load((run / "config.yaml").read_text())
    name = config.get("space", "lora")
    fixed = config.get("a_factor") if name == "hydra" else config.get("adapter_down")
    if fixed == "pca":
        name += "-pca"
    if float(config.get("alpha", 0.01)) != 0.01:
        name += f" a={config['alpha']:g}"
    return name


# Columns of the per-seed table, first those of the recommended search's forms.
COLUMN_ORDER = ("lora", "series-pca", "parallel-pca", "hydra-pca", "hydra", "series", "parallel")


def per_seed_table(rows: list[dict]) -> str:
    """Each (task, seed) on its own line: the last state's test minus the run's calibrated
    zero state, in points, per space (the best of a line in bold)."""
    cells: dict[tuple[str, int], dict[str, float]] = {}
    for row in rows:
        if row["method"].endswith("/last") and row.get("calibrated_test") is not None:
            delta = 100 * (row["test"] - row["calibrated_test"])
            cells.setdefault((row["task"], row["seed"]), {})[row["method"][: -len("/last")]] = delta
    spaces = {space for line in cells.values() for space in line}
    rank = {name: i for i, name in enumerate(COLUMN_ORDER)}
    columns = sorted(spaces, key=lambda name: (rank.get(name, len(rank)), name))
    tasks = list(dict.fromkeys(row["task"] for row in rows))  # the quality table's order
    lines = [
        "| task, seed | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for task, seed in sorted(cells, key=lambda key: (tasks.index(key[0]), key[1] != 42, key[1])):
        line = cells[task, seed]
        best = max(line.values())
        shown = [
            ""
            if c not in line
            else (f"**{line[c]:+.1f}**" if line[c] == best else f"{line[c]:+.1f}")
            for c in columns
        ]
        lines.append(f"| {task}, {seed} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--replays", type=Path, default=REPLAYS, help="replay_final rows")
    parser.add_argument("--quality-results", type=Path, default=QUALITY / "results.jsonl")
    parser.add_argument("--out", type=Path, default=HERE, help="for results.jsonl, table.md")
    args = parser.parse_args(argv)
    replay = replay_final()
    summarize = replay.summarizer()
    folders = args.folders or sorted(Path("runs").glob("spaces-*"))
    runs = list(replay.tuning_runs([str(f) for f in folders]))

    replays = {}
    if args.replays.is_file():
        for line in args.replays.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                replays[row["run"]] = row
    rows = []
    for run in runs:
        if str(run) not in replays:
            print(f"replaying {run}", file=sys.stderr, flush=True)
            try:
                replays[str(run)] = row = replay.replay(run)
            except replay.ReplayMismatch as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            with args.replays.open("a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        space = space_of(run)
        selected = summarize.read_run(run)
        selected["method"] = f"{space}/dev-selected"
        last = dict(selected, method=f"{space}/last")
        last.update(test=replays[str(run)]["final_test"], dev=replays[str(run)]["final_dev"])
        rows += [selected, last]
    for row in summarize.load_rows(args.quality_results):
        if row["method"] in FROM_QUALITY and row["k"] == 16:
            rows.append(dict(row, method=FROM_QUALITY[row["method"]]))
    machines = {row["machine"] for row in rows if "/" in row["method"]}
    rows = [row for row in rows if row["machine"] in machines]  # the spaces' machine only
    rows = summarize.merge([], rows)
    summarize.save_rows(args.out / "results.jsonl", rows)
    text = summarize.markdown(rows)
    text += (
        "\nEach seed on its own: test of the last state minus the calibrated zero state of "
        "the same run (points; best of a line in bold):\n\n" + per_seed_table(rows)
    )
    summarize.write_atomic(args.out / "table.md", text.encode())
    print(text)
    print(
        f"{len(runs)} space runs; {args.out / 'results.jsonl'}: {len(rows)} rows", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
