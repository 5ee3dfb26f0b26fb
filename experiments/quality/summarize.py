"""The quality benchmark's reader: sweep folders -> results.jsonl, a Markdown table, a plot.

    python experiments/quality/summarize.py runs/quality [MORE_FOLDERS...] [--label LABEL]

Each FOLDER is a sweep output (`dfo-lora sweep`: one run folder per run plus
sweep.jsonl) or a run folder; every `results.json` below it is one run (`dfo-lora tune`
or `dfo-lora baseline`). Runs without results.json (failed, unfinished) are skipped and
counted. Then:

(a) one row per run is merged into `--results` (default experiments/quality/results.jsonl):
    method, task, seed, model, k, metric, test, dev, zero_shot_test, calibrated_test
    (the calibrated zero state of the same run), wall time, peak memory, evaluations, and
    the machine (CPU model and flags amx_bf16 / avx512_bf16 / avx512f / avx2, GPU, device,
    dtype). A row replaces the row with the same (machine, model, k, task, method, seed),
    so summarizing the same folders again changes nothing;
(b) a Markdown table (`--table`, default experiments/quality/table.md; also printed) of
    ALL rows of the results file: test metric in %, mean ± std over seeds (population
    std, as experiments/summarize.py) per task and method, the number of seeds, and the
    average over tasks (of the per-task means; only for a method that has every task of
    the table). A second table gives test minus the calibrated zero state of the same
    runs, a third wall time and peak memory;
(c) a PNG (`--plot`, default experiments/quality/plot.png): per task, each method's
    seeds as dots and their mean ± std as an error bar, one colour per method.

Machines are never mixed: rows are grouped by machine (device or GPU, CPU flags, dtype),
model and k, and each group gets its own headed tables and its own plot (`plot-<group>.png`
when there is more than one group). `--machine TEXT` keeps only groups whose machine
description contains TEXT. A run resumed on another machine (results.json's `machines`
holds more than one) counts under the machine that finished it; its cell is marked ‡ and a
line under the table names every machine it ran on (row field `ran_on`).

Method names (the rule):
    method = BASE, or BASE/LABEL
    BASE  = `method` of results.json (baselines: zero-shot, calibrated, icl,
            gradient-lora, mezo-lora, c-lora, f-lora) or of baseline.yaml; else the
            run's `optimizer` from config.yaml (cma = C-LoRA, fwa = F-LoRA, hybrid, ...),
            with a non-default `fwa_variant` of fwa/hybrid in brackets: `fwa(bbfwa)`.
    LABEL = a `label` key of results.json or config.yaml when present; else, for a
            tuning run (not a baseline), `--label` when given; else the run's sweep grid
            values other than model, task, seed and method (from sweep.jsonl), such as
            `alpha=0.02,targets=q+k+v+o`; else none.
    A sweep with named rows (`rows:` and a grid `row` axis) names each run by its row
    alone (`adapter`, `bitfit`, `c-lora`, ...), as the paper's table does.
So a sweep of one setting gives `cma`, `fwa`, `gradient-lora`, ...; summarize a second
sweep of another search setting with `--label NAME` to tell its rows apart.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from dfo_lora.errors import UserError

HERE = Path(__file__).resolve().parent
DEFAULT_FWA_VARIANT = "dynfwa"
NOT_LABELS = {"model", "task", "seed", "method", "optimizer"}  # grid keys that are not labels
# display order; unknown names follow in alphabetical order
TASK_ORDER = (
    "sst2",
    "yelp_polarity",
    "agnews",
    "dbpedia",
    "mrpc",
    "snli",
    "rte",
    "mr",
    "trec",
    "sst5",
)
# The DFO-LoRA paper's rows keep its order: gradient methods, then derivative-free prompts,
# then the forward-only LoRA rows (experiments/paper/table.yaml names them so).
FIRST_METHODS = ("zero-shot", "calibrated", "icl", "adapter", "lora", "bitfit", "p-tuning-v2")
FIRST_METHODS += ("bbt", "bbtv2")
LAST_METHODS = ("mezo-lora", "c-lora", "f-lora", "gradient-lora")
KEY = ("machine", "model", "k", "task", "method", "seed")


# ------------------------------------------------------------------------------ reading
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML ({exc})") from None
    return data if isinstance(data, dict) else {}


def machine_of(results: dict) -> dict:
    """Where the run ran: from results.json's `versions` (CPU, flags, GPU) and `server`."""
    versions, server = results.get("versions") or {}, results.get("server") or {}
    return {
        "device": str(server.get("device", "cpu")),
        "dtype": str(server.get("dtype", "unknown")),
        "cpu": versions.get("cpu"),
        "cpu_flags": versions.get("cpu_flags"),  # None: recorded before flags were
        "gpu": versions.get("gpu"),
    }


def describe_where(machine: dict) -> str:
    """The GPU, or the CPU by its flags."""
    if machine.get("gpu") and str(machine.get("device", "")).startswith("cuda"):
        return f"GPU {machine['gpu']}"
    if machine.get("cpu_flags") is None:
        return "CPU (flags not recorded)"
    return f"CPU {'+'.join(machine['cpu_flags']) or 'no avx2'}"


def describe_machine(machine: dict) -> str:
    """One line that tells machines apart: GPU or CPU flags, and dtype."""
    return f"{describe_where(machine)}, {machine['dtype']}"


def ran_on(results: dict, device: str) -> list[str] | None:
    """Where a run resumed on another machine ran, in order (results.json's `machines`);
    None for a run on one machine. Its row stays with the machine that finished it."""
    machines = results.get("machines")
    if not isinstance(machines, list) or len(machines) < 2:
        return None
    return [
        "a machine not recorded (a checkpoint older than the record)"
        if not isinstance(m, dict) or not any(m.values())
        else f"{m.get('cpu') or '?'} ({describe_where({**m, 'device': device})})"
        for m in machines
    ]


def method_of(results: dict, config: dict, run_dir: Path, label: str | None, grid: dict) -> str:
    """The documented naming rule (module docstring)."""
    baseline = results.get("method") or read_yaml(run_dir / "baseline.yaml").get("method")
    if baseline:
        base = str(baseline)
    else:
        base = str(config.get("optimizer", "?"))
        variant = config.get("fwa_variant", DEFAULT_FWA_VARIANT)
        if base in ("fwa", "hybrid") and variant != DEFAULT_FWA_VARIANT:
            base = f"{base}({variant})"
    if "row" in grid:  # a sweep's named row (sweep files' `rows:`) is the method's name
        return str(grid["row"])
    explicit = results.get("label") or config.get("label")
    if explicit:
        return f"{base}/{explicit}"
    if label and not baseline:
        return f"{base}/{label}"
    extra = {k: v for k, v in grid.items() if k not in NOT_LABELS}
    if extra:
        return base + "/" + ",".join(f"{k}={_text(v)}" for k, v in sorted(extra.items()))
    return base


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def read_run(run_dir: Path, label: str | None = None, grid: dict | None = None) -> dict:
    """One results.jsonl row from a finished run folder."""
    results = read_json(run_dir / "results.json")
    config = read_yaml(run_dir / "config.yaml")
    try:
        metric = results["metric"]
        tuned, zero = results["tuned"], results["zero_shot"]
        calibrated = results.get("calibrated_zero_shot") or {}
        if not calibrated and config.get("calibrate"):
            calibrated = zero  # a calibrated run's zero state is the calibrated zero state
        machine = machine_of(results)
        row = {
            "method": method_of(results, config, run_dir, label, grid or {}),
            "task": Path(str(config.get("task", "?"))).stem,
            "seed": int(config.get("seed", -1)),
            "model": Path(str(config.get("model", "?"))).name,
            "k": int(config.get("k", 16)),
            "metric": metric,
            "test": float(tuned["test"][metric]),
            "dev": float(tuned["dev"][metric]),
            "zero_shot_test": float(zero["test"][metric]),
            "calibrated_test": float(calibrated["test"][metric]) if calibrated else None,
            "calibrated_dev": float(calibrated["dev"][metric]) if calibrated else None,
            "test_limit": config.get("test_limit"),
            "evaluations": results.get("evaluations"),
            "wall_time_s": results.get("wall_time_s"),
            "peak_mem_bytes": results.get("peak_mem_bytes"),
            **machine,
            "machine": describe_machine(machine),
            "ran_on": ran_on(results, machine["device"]),
            "run": str(run_dir),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{run_dir / 'results.json'}: missing or bad field ({exc})") from None
    return row


def collect(folders: list[Path], label: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows of every finished run under the folders, and notes on what was skipped."""
    rows, notes = [], []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
        grids: dict[Path, dict] = {}
        jsonl = folder / "sweep.jsonl"
        if jsonl.is_file():
            for number, line in enumerate(jsonl.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    grids[(folder / record["dir"]).resolve()] = dict(record.get("params") or {})
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{jsonl} line {number}: not a sweep.jsonl record") from None
                if record.get("status") == "failed":
                    notes.append(f"{folder}: {record['dir']} failed: {record.get('error', '?')}")
        found = sorted(p.parent for p in folder.rglob("results.json"))
        for run_dir in found:
            rows.append(read_run(run_dir, label, grids.get(run_dir.resolve())))
        done = {p.resolve() for p in found}
        unfinished = sum(1 for d in grids if d not in done)
        if unfinished:
            notes.append(f"{folder}: {unfinished} run(s) of sweep.jsonl have no results.json")
        if not found:
            notes.append(f"{folder}: no results.json found")
    return rows, notes


# ------------------------------------------------------------------------------ results.jsonl
def key_of(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key_of(row)
        except (ValueError, KeyError, TypeError):
            raise UserError(
                f"{path} line {number}: not a results row (JSON with {', '.join(KEY)})"
            ) from None
        rows.append(row)
    return rows


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """New rows replace old rows with the same key; sorted, so the file is stable."""
    merged = {key_of(r): r for r in old}
    merged.update({key_of(r): r for r in new})
    return sorted(merged.values(), key=lambda r: tuple(map(str, key_of(r))))


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_rows(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    write_atomic(path, text.encode())


# ------------------------------------------------------------------------------ table
def groups_of(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by (machine, model, k): the only rows that may share a table."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["machine"], row["model"], row["k"])].append(row)
    return dict(sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))))


def order(names, first=(), last=()) -> list:
    names = set(names)
    middle = sorted(n for n in names if n not in first and n not in last)
    return [n for n in first if n in names] + middle + [n for n in last if n in names]


def method_order(names) -> list[str]:
    return order(names, FIRST_METHODS, LAST_METHODS)


def task_order(names) -> list[str]:
    return order(names, TASK_ORDER)


def cells(rows: list[dict], value) -> dict[tuple[str, str], list[float]]:
    """(method, task) -> values in %, one per seed (rows without a value are left out)."""
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: r["seed"]):
        v = value(row)
        if v is not None:
            out[(row["method"], row["task"])].append(100.0 * v)
    return out


def mean_std(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    if len(arr) == 1:
        return f"{arr[0]:.1f} (1)"
    return f"{arr.mean():.1f} ± {arr.std():.1f} ({len(arr)})"


def grid_table(
    rows: list[dict], value, reference: list[dict] | None = None, footnotes: bool = True
) -> str:
    """Methods x tasks; `reference` rows (published figures) follow, marked, on the same
    tasks, never averaged into ours. A cell with a run resumed across machines is marked ‡,
    and (`footnotes`) a line under the table names its machines."""
    by_cell = cells(rows, value)
    tasks = task_order({t for _, t in by_cell})
    methods = method_order({m for m, _ in by_cell})
    moved = sorted(
        (r["method"], r["task"], r["seed"], r["ran_on"])
        for r in rows
        if r.get("ran_on") and value(r) is not None
    )
    marked = {(method, task) for method, task, _, _ in moved}
    lines = [
        "| method | " + " | ".join(tasks) + " | average |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for method in methods:
        row = [method]
        means = []
        for task in tasks:
            values = by_cell.get((method, task))
            mark = " ‡" if (method, task) in marked else ""
            row.append(mean_std(values) + mark if values else "—")
            if values:
                means.append(float(np.mean(values)))
        row.append(f"{np.mean(means):.1f}" if len(means) == len(tasks) else "—")
        lines.append("| " + " | ".join(row) + " |")
    published: dict[str, dict[str, float]] = defaultdict(dict)
    for ref in reference or []:
        published[ref["method"]][ref["task"]] = 100.0 * ref["test"]
    for method, figures in published.items():
        row = [f"{method} (reference)"] + [
            f"{figures[t]:.1f}" if t in figures else "—" for t in tasks
        ]
        all_there = all(t in figures for t in tasks)
        row.append(f"{np.mean([figures[t] for t in tasks]):.1f}" if all_there else "—")
        lines.append("| " + " | ".join(row) + " |")
    if moved and footnotes:
        lines.append("")
        lines += [
            f"‡ {method} on {task}, seed {seed}: resumed, ran on " + ", then ".join(where) + "."
            for method, task, seed, where in moved
        ]
    return "\n".join(lines)


def load_reference(path: Path | None) -> list[dict]:
    """Published figures, one JSON object per line: method, task, test (a fraction), source."""
    if path is None:
        return []
    if not path.is_file():
        raise UserError(f"{path}: no such reference file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(
                {"method": str(row["method"]), "task": str(row["task"]), "test": float(row["test"])}
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: line {number}: not a reference row ({exc})") from None
    return rows


def cost_table(rows: list[dict]) -> str:
    lines = ["| method | runs | wall time (s), mean | peak memory (GB), max |", "|---|---|---|---|"]
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for method in method_order(by_method):
        runs = by_method[method]
        wall = [r["wall_time_s"] for r in runs if r.get("wall_time_s") is not None]
        mem = [r["peak_mem_bytes"] for r in runs if r.get("peak_mem_bytes")]
        lines.append(
            f"| {method} | {len(runs)} | {np.mean(wall):.0f} | {max(mem) / 1e9:.2f} |"
            if wall and mem
            else f"| {method} | {len(runs)} | — | — |"
        )
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower()


def plot_paths(groups: dict, plot: Path) -> dict[tuple, Path]:
    if len(groups) == 1:
        return {next(iter(groups)): plot}
    return {
        g: plot.with_name(f"{plot.stem}-{slug('-'.join(map(str, g)))}{plot.suffix}") for g in groups
    }


def markdown(
    rows: list[dict], plots: dict[tuple, Path] | None = None, reference: list[dict] | None = None
) -> str:
    groups = groups_of(rows)
    parts = []
    for group, members in groups.items():
        machine, model, k = group
        metrics = sorted({r["metric"] for r in members})
        cpus = sorted({r["cpu"] for r in members if r.get("cpu")})
        parts.append(
            f"### {model}, k = {k}; machine: {machine}\n\n"
            + (f"CPU: {', '.join(cpus)}. " if cpus else "")
            + f"Test {' / '.join(metrics)} in %: mean ± std over seeds (number of seeds); "
            "average = mean over the tasks of the per-task means.\n\n"
            + grid_table(members, lambda r: r["test"], reference)
        )
        if any(r.get("calibrated_test") is not None for r in members):
            parts.append(
                "Test minus the calibrated zero state of the same run (points):\n\n"
                + grid_table(
                    members,
                    lambda r: (
                        None
                        if r.get("calibrated_test") is None
                        else r["test"] - r["calibrated_test"]
                    ),
                    footnotes=False,
                )
            )
        parts.append(cost_table(members))
        if plots and group in plots:
            parts.append(f"![{model}, {machine}]({plots[group].name})")
    if len(groups) > 1:
        parts.insert(0, f"{len(groups)} machine/model groups; their rows are never mixed.")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ plot
def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per (machine, model, k) group: per task, dots per seed, mean ± std."""
    from matplotlib.figure import Figure  # Agg through Figure: no display, no pyplot state

    written = []
    groups = groups_of(rows)
    for group, path in plot_paths(groups, out).items():
        members = groups[group]
        by_cell = cells(members, lambda r: r["test"])
        tasks = task_order({t for _, t in by_cell})
        methods = method_order({m for m, _ in by_cell})
        fig = Figure(figsize=(max(6.0, 1.4 * len(tasks) + 3), 4.5), layout="constrained")
        ax = fig.subplots()
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            colour = f"C{i % 10}"
            offset = (i - (len(methods) - 1) / 2) * width
            xs, means, stds = [], [], []
            for j, task in enumerate(tasks):
                values = by_cell.get((method, task))
                if not values:
                    continue
                x = j + offset
                ax.scatter([x] * len(values), values, color=colour, s=10, alpha=0.5)
                xs.append(x)
                means.append(float(np.mean(values)))
                stds.append(float(np.std(values)))
            ax.errorbar(xs, means, yerr=stds, fmt="o", color=colour, capsize=3, ms=5, label=method)
        ax.set_xticks(range(len(tasks)), tasks)
        metrics = " / ".join(sorted({r["metric"] for r in members}))
        ax.set_ylabel(f"test {metrics} (%)")
        machine, model, k = group
        ax.set_title(f"{model}, k = {k} — {machine}", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        fig.legend(fontsize="small", ncols=min(4, len(methods)), loc="outside lower center")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------ main
def summarize(
    folders: list[Path],
    results: Path,
    table: Path,
    plot_file: Path,
    label: str | None = None,
    machine: str | None = None,
    reference: Path | None = None,
) -> dict:
    published = load_reference(reference)
    new, notes = collect(folders, label)
    rows = merge(load_rows(results), new)
    save_rows(results, rows)
    shown = [r for r in rows if machine is None or machine in r["machine"]]
    if not shown:
        raise UserError(
            f"{results}: no rows to tabulate"
            + (f" on a machine matching {machine!r}" if machine else "")
        )
    plots = plot_paths(groups_of(shown), plot_file)
    text = markdown(shown, plots, published)
    write_atomic(table, text.encode())
    written = plot(shown, plot_file)
    return {"rows": len(rows), "new": len(new), "notes": notes, "markdown": text, "plots": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, metavar="FOLDER")
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--table", type=Path, default=HERE / "table.md")
    parser.add_argument("--plot", type=Path, default=HERE / "plot.png")
    parser.add_argument("--label", help="label of the tuning runs' method names (see above)")
    parser.add_argument("--machine", help="tabulate only machines whose description has this")
    parser.add_argument(
        "--reference", type=Path, help="published figures (JSONL) printed beside ours"
    )
    args = parser.parse_args(argv)
    try:
        out = summarize(
            args.folders,
            args.results,
            args.table,
            args.plot,
            args.label,
            args.machine,
            args.reference,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in out["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(out["markdown"])
    print(
        f"{out['new']} run(s) read; {args.results}: {out['rows']} rows; table {args.table}; "
        f"plot {', '.join(map(str, out['plots']))}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
