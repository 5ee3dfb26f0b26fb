"""Replay the `final` selection rule on finished quality-benchmark runs, without new search.

    python experiments/quality/replay_final.py runs/quality [MORE_FOLDERS...] --out FILE.jsonl \
        [--results experiments/quality/results.jsonl --method cma/recommended+final]

A run's `results.json` reports its dev-selected state (`select: metric`, the default). Its
checkpoint also holds the last searched state (`z` of checkpoint/state.safetensors): this
scores that state on dev and test in the run's own server (same config, data, dtype and
calibration as `tune`), so the two rules can be compared on the same searches. One JSON
row per run is appended to FILE (resumable: runs already in FILE are skipped):
task, seed, test/dev of the selected state (from results.json), of the final state, and
of the calibrated zero state. The selected state is scored again as a check: a replay
whose selected state does not give results.json's test metric and loss exactly is refused
(no row written, one line, exit 2). bf16 rounding on the CPU depends on the torch thread
count, so replay with the run's threads (the sweeps: OMP_NUM_THREADS=1).

The selection rule does not steer the search (dev checks only decide which state is kept),
so the final state's scores are exactly what `tune --select final` reports for the same
search. With `--results`, each replayed run also becomes a row of the benchmark's results
file (summarize.py's row of the run, with the final state's test and dev and the method
name `--method`), so the next `summarize.py` tabulates the rule beside the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

from dfo_lora.search.tuned import load_tuned
from dfo_lora.server.factory import build_server

HERE = Path(__file__).resolve().parent


def summarizer():
    """experiments/quality/summarize.py as a module (its row format and results file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_summarize", HERE / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_rows(replays: list[dict], method: str) -> list[dict]:
    """summarize.py's row of each replayed run, with the final state's test and dev."""
    summarize = summarizer()
    rows = []
    for replay in replays:
        row = summarize.read_run(Path(replay["run"]))
        row.update(method=method, test=replay["final_test"], dev=replay["final_dev"])
        rows.append(row)
    return rows


def tuning_runs(folders: list[str]):
    """Every finished tuning run (results.json with a checkpoint) below the folders."""
    for folder in folders:
        for results in sorted(Path(folder).rglob("results.json")):
            run = results.parent
            if (run / "checkpoint" / "state.safetensors").is_file():
                yield run


class ReplayMismatch(Exception):
    """The replayed selected state does not score what the run reported."""


def replay(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    final_z = load_file(str(run / "checkpoint" / "state.safetensors"))["z"]
    selected_z, config = load_tuned(run)
    server = build_server(config.server_spec())
    server.set_state(selected_z)  # replayed: must equal results.json's tuned.test
    replayed = server.evaluate("test")
    metric = results.get("metric", "accuracy")
    reported = results["tuned"]["test"]
    if (replayed[metric], replayed["loss"]) != (reported[metric], reported["loss"]):
        raise ReplayMismatch(
            f"{run}: the selected state replays at test {metric} {replayed[metric]:.4f}, "
            f"loss {replayed['loss']:.6f}, where results.json says {reported[metric]:.4f}, "
            f"{reported['loss']:.6f} (not replayed: use the run's torch threads, "
            f"OMP_NUM_THREADS=1 for the sweeps, and the code it ran with)"
        )
    server.set_state(final_z)
    final = {split: server.evaluate(split) for split in ("dev", "test")}
    return {
        "run": str(run),
        "task": config.task,
        "seed": config.seed,
        "metric": metric,
        "selected_test": results["tuned"]["test"][metric],
        "selected_dev": results["tuned"]["dev"][metric],
        "best_dev_evals": results["best_dev_evals"],
        "selected_test_replayed": replayed[metric],
        "final_test": final["test"][metric],
        "final_dev": final["dev"][metric],
        "calibrated_test": results["calibrated_zero_shot"]["test"][metric],
        "evaluations": results["evaluations"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", type=Path, help="merge rows into this results.jsonl")
    parser.add_argument("--method", default="cma/recommended+final")
    args = parser.parse_args(argv)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["run"] for line in out.read_text().splitlines() if line}
    for run in tuning_runs(args.folders):
        if str(run) in done:
            continue
        try:
            row = replay(run)
        except ReplayMismatch as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        with out.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        print(json.dumps(row, sort_keys=True), flush=True)
    if args.results:
        summarize = summarizer()
        replays = [json.loads(line) for line in out.read_text().splitlines() if line]
        rows = summarize.merge(
            summarize.load_rows(args.results), results_rows(replays, args.method)
        )
        summarize.save_rows(args.results, rows)
        print(f"{args.results}: {len(replays)} replayed rows merged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
