"""`dfo-lora plot RUN [RUN...] --out FILE.png`: train loss and dev metric against evaluations.

Reads each run folder's `log.jsonl` (search/callbacks.py's JsonlLog): a `generation` line
per generation (`evals`, `loss_min` = the generation's best train loss, ...) and a `dev`
line per dev evaluation (`evals`, `dev` = the dev metrics and loss). The left panel draws
each generation's best train loss, the right one the dev metric; one colour per run,
labelled by its folder name. Matplotlib draws off-screen (Agg); nothing needs a display.

Bad input (a missing folder, a folder without log.jsonl, a line that is not a JSON object
with `kind` and `evals`) raises UserError naming the file and line; nothing is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from dfo_lora.errors import UserError

METRIC_PREFERENCE = ("f1", "accuracy")  # the task metric when results.json is absent


@dataclass
class RunLog:
    """What the plot needs from one run's log.jsonl."""

    label: str
    train_evals: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # best candidate per generation
    dev_evals: list[int] = field(default_factory=list)
    dev_metric: list[float] = field(default_factory=list)
    metric: str = "accuracy"


def read_run_log(run: str | Path, label: str | None = None) -> RunLog:
    """Parse `run/log.jsonl`; UserError naming the file (and line) for bad input."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"plot: {run} is not a folder")
    path = run / "log.jsonl"
    if not path.is_file():
        raise UserError(f"plot: {path} does not exist (is {run} a run folder of dfo-lora tune?)")
    metric = _results_metric(run)
    log = RunLog(label=label or run.resolve().name)
    dev_records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"plot: {path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "kind" not in record or "evals" not in record:
            raise UserError(f"{where}: expected a JSON object with 'kind' and 'evals'")
        evals = _number(record["evals"], f"{where}: evals")
        if record["kind"] == "generation":
            loss = record.get("loss_min")
            # None: every candidate of the generation had a non-finite loss (a gap)
            log.train_evals.append(int(evals))
            log.train_loss.append(math.nan if loss is None else _number(loss, f"{where}: loss_min"))
        elif record["kind"] == "dev":
            dev = record.get("dev")
            if not isinstance(dev, dict) or not dev:
                raise UserError(f"{where}: 'dev' is not a mapping of metrics")
            dev_records.append((int(evals), dev, where))
    if not log.train_evals and not dev_records:
        raise UserError(f"plot: {path} has no generation or dev lines")
    if dev_records:
        keys = dev_records[0][1]
        if metric is None or metric not in keys:
            others = [k for k in keys if k != "loss" and not k.startswith("uncalibrated_")]
            metric = next((m for m in METRIC_PREFERENCE if m in keys), None)
            metric = metric or (others[0] if others else "loss")
        log.metric = metric
        for evals, dev, where in dev_records:
            if metric not in dev:
                raise UserError(f"{where}: dev has no {metric!r}")
            log.dev_evals.append(evals)
            log.dev_metric.append(_number(dev[metric], f"{where}: dev.{metric}"))
    elif metric:
        log.metric = metric
    return log


def _results_metric(run: Path) -> str | None:
    try:
        return json.loads((run / "results.json").read_text()).get("metric")
    except (OSError, ValueError, AttributeError):
        return None  # an unfinished run has no results.json yet


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {value!r} is not a number")
    return float(value)


def labels_for(runs: list[Path]) -> list[str]:
    """Folder names; where two runs share a name, their parent's name is added."""
    names = [Path(r).resolve().name for r in runs]
    return [
        f"{Path(r).resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for r, n in zip(runs, names, strict=True)
    ]


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs' train loss and dev metric against evaluations into the PNG `out`."""
    if not runs:
        raise UserError("plot: give at least one run folder")
    runs = [Path(r) for r in runs]
    logs = [read_run_log(r, label) for r, label in zip(runs, labels_for(runs), strict=True)]
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    train_ax, dev_ax = fig.subplots(1, 2)
    colours = [f"C{i % 10}" for i in range(len(logs))]
    for log, colour in zip(logs, colours, strict=True):
        if log.train_evals:
            train_ax.plot(log.train_evals, log.train_loss, color=colour, lw=1, label=log.label)
        if log.dev_evals:
            dev_ax.plot(
                log.dev_evals, log.dev_metric, color=colour, marker="o", ms=3, label=log.label
            )
    train_ax.set(
        xlabel="evaluations", ylabel="train loss", title="best candidate of each generation"
    )
    metrics = sorted({log.metric for log in logs if log.dev_evals})
    dev_ax.set(xlabel="evaluations", ylabel=f"dev {' / '.join(metrics) or 'metric'}", title="dev")
    for ax in (train_ax, dev_ax):
        ax.grid(alpha=0.3)
    (dev_ax if any(log.dev_evals for log in logs) else train_ax).legend(fontsize="small")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)  # never a half-written PNG
    finally:
        tmp.unlink(missing_ok=True)
    return out
