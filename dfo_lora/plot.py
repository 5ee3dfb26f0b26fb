"""`dfo-lora plot RUN [RUN...] --out FILE`: train loss and dev metric against evaluations.

Reads each run folder's `log.jsonl` (search/callbacks.py's JsonlLog): a `generation` line
per generation (`evals`, `loss_min` = the generation's best train loss, ...) and a `dev`
line per dev evaluation (`evals`, `dev` = the dev metrics and loss). Each task gets its own
row of two panels, since the metrics of different tasks are not comparable: the left one
draws each generation's best train loss, the right one the dev metric; one colour per run,
labelled by its folder name. The figure is titled with the runs' tasks and models (from
each run's `config.yaml`: `task`, `model`). On the dev panel, dashed and dotted
horizontal lines mark each run's zero state (results.json's `zero_shot` and
`calibrated_zero_shot` dev metric); a run still running has no results.json and so no
reference lines, which is not an error. Matplotlib draws off-screen (Agg); nothing needs
a display.

The format is the one `--out`'s suffix names (FORMATS); the file is written through a
temporary sibling and a rename, so a failed write leaves no partial file.

Bad input (a missing folder, a folder without log.jsonl, a line that is not a JSON object
with `kind` and `evals`, an unsupported suffix, an `--out` that cannot be written) raises
UserError naming the file and line; nothing is written.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dfo_lora.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRIC_PREFERENCE = ("f1", "accuracy")  # the task metric when results.json is absent

# suffix -> matplotlib format; jpg goes through Pillow, a dependency of matplotlib
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg"}
DPI = 120  # raster formats only
UNKNOWN_TASK = "unknown task"  # a folder without a readable config.yaml


@dataclass
class RunLog:
    """What the plot needs from one run folder: its log.jsonl, config.yaml, results.json."""

    label: str
    train_evals: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # best candidate per generation
    dev_evals: list[int] = field(default_factory=list)
    dev_metric: list[float] = field(default_factory=list)
    metric: str = "accuracy"
    task: str | None = None
    model: str | None = None
    # (name, dev metric) of the zero state: plain and calibrated prompt; empty while running
    references: list[tuple[str, float]] = field(default_factory=list)


def read_run_log(run: str | Path, label: str | None = None) -> RunLog:
    """Parse `run/log.jsonl` (and the run's config and results); UserError naming the file
    (and line) for bad input."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"plot: {run} is not a folder")
    path = run / "log.jsonl"
    if not path.is_file():
        raise UserError(f"plot: {path} does not exist (is {run} a run folder of dfo-lora tune?)")
    results = _read_mapping(run / "results.json", json.loads)
    config = _read_mapping(run / "config.yaml", yaml.safe_load)
    metric = results.get("metric") if isinstance(results.get("metric"), str) else None
    log = RunLog(label=label or run.resolve().name)
    log.task, log.model = _text(config.get("task")), _text(config.get("model"))
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
    log.references = _references(results, log.metric, bool(config.get("calibrate")))
    return log


def _read_mapping(path: Path, parse) -> dict[str, Any]:
    """A JSON/YAML file's mapping, {} when absent or unreadable: a running run has no
    results.json yet, and the plot does without a title or reference lines."""
    try:
        data = parse(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _references(results: dict, metric: str, calibrated_run: bool) -> list[tuple[str, float]]:
    """The zero state's dev metric, plain and calibrated; with --calibrate the run's
    `zero_shot` is the calibrated state already, so it is drawn once."""
    named = [("calibrated zero-shot", "calibrated_zero_shot")]
    if not calibrated_run:
        named.insert(0, ("zero-shot", "zero_shot"))
    references = []
    for name, key in named:
        state = results.get(key)
        dev = state.get("dev") if isinstance(state, dict) else None
        value = dev.get(metric) if isinstance(dev, dict) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            references.append((name, float(value)))
    return references


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


def output_format(out: str | Path) -> str:
    """Matplotlib's format for `out`'s suffix; UserError for any other suffix, so that
    `x.jpg` is a JPEG and never PNG bytes under a JPEG name."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        what = f"suffix {suffix!r}" if suffix else "no suffix"
        raise UserError(f"plot: {out} has {what}; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def check_writable(out: str | Path) -> None:
    """UserError naming `out` when it cannot be written: checked before the runs are read,
    so a bad --out fails at once (the write itself is guarded too)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"plot: cannot write {out}: it is a folder")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing ancestor, created below
    if not folder.is_dir():
        raise UserError(f"plot: cannot write {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"plot: cannot write {out}: {folder} is not writable")


def model_name(model: str) -> str:
    """A local model folder by its name (tmp paths are long); a preset or hub id as is."""
    return Path(model).name if os.path.isabs(model) else model


def figure_title(logs: list[RunLog]) -> str:
    """'task T, model M' per task (models joined), tasks in the order of the runs."""
    parts = []
    for task, rows in group_by_task(logs).items():
        models = list(dict.fromkeys(model_name(log.model) for log in rows if log.model))
        what = f"model{'s' if len(models) > 1 else ''} {', '.join(models) or 'unknown'}"
        parts.append(f"task {task}, {what}")
    return "; ".join(parts)


def group_by_task(logs: list[RunLog]) -> dict[str, list[RunLog]]:
    """The runs of each task, in the order the tasks first appear."""
    groups: dict[str, list[RunLog]] = {}
    for log in logs:
        groups.setdefault(log.task or UNKNOWN_TASK, []).append(log)
    return groups


def build_figure(logs: list[RunLog]) -> Figure:
    """The figure, one row (train panel, dev panel) per task; separate from saving so that
    it can be inspected."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    groups = group_by_task(logs)
    fig = Figure(figsize=(11, 0.6 + 4.2 * len(groups)), layout="constrained")
    fig.suptitle(figure_title(logs))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    colours = {id(log): f"C{i % 10}" for i, log in enumerate(logs)}  # one per run, all rows
    for (task, rows), (train_ax, dev_ax) in zip(groups.items(), axes, strict=True):
        for log in rows:
            colour = colours[id(log)]
            if log.train_evals:
                train_ax.plot(log.train_evals, log.train_loss, color=colour, lw=1, label=log.label)
            if log.dev_evals:
                dev_ax.plot(
                    log.dev_evals, log.dev_metric, color=colour, marker="o", ms=3, label=log.label
                )
            for name, value in log.references:
                style = ":" if name.startswith("calibrated") else "--"
                dev_ax.axhline(
                    value, color=colour, ls=style, lw=1, alpha=0.8, label=f"{log.label}: {name}"
                )
        train_ax.set(
            xlabel="evaluations",
            ylabel="train loss",
            title=f"{task}: best candidate of each generation",
        )
        metrics = sorted({log.metric for log in rows if log.dev_evals or log.references})
        dev_ax.set(
            xlabel="evaluations",
            ylabel=f"dev {' / '.join(metrics) or 'metric'}",
            title=f"{task}: dev",
        )
        for ax in (train_ax, dev_ax):
            ax.grid(alpha=0.3)
        on_dev = any(log.dev_evals or log.references for log in rows)
        (dev_ax if on_dev else train_ax).legend(fontsize="small")
    return fig


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write `fig` in the format `out`'s suffix names, atomically: rendered in memory
    first, then a temporary sibling renamed into place, so no partial file is left."""
    from dfo_lora.search.checkpoint import atomic_write_bytes

    out = Path(out)
    fmt = output_format(out)
    check_writable(out)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI)
    try:
        atomic_write_bytes(out, buffer.getvalue())  # makes the parent folders too
    except OSError as exc:
        raise UserError(f"plot: cannot write {out}: {exc.strerror or exc}") from None
    return out


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Draw the runs' train loss and dev metric against evaluations into `out` (PNG, PDF,
    SVG or JPEG by its suffix); `out` is checked before the runs are read."""
    if not runs:
        raise UserError("plot: give at least one run folder")
    output_format(out)
    check_writable(out)
    runs = [Path(r) for r in runs]
    logs = [read_run_log(r, label) for r, label in zip(runs, labels_for(runs), strict=True)]
    return save_figure(build_figure(logs), out)
