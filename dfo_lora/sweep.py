"""`dfo-lora sweep FILE`: a grid of tuning runs, run concurrently over Ray server actors.

Sweep file (YAML; see experiments/configs/sweep_example.yaml):

    out: runs/sweep-example      # one folder per run under it, and sweep.jsonl
    concurrency: 0               # runs at a time; 0 = as many as the cluster's servers allow
    grid:                        # the product of these lists, in this order
      model: [smollm2-135m]
      task: [sst2, rte]
      seed: [13, 42]
      method: [cma, dynfwa]      # = optimizer
    config:                      # TuneConfig values for every run (any `tune` option)
      budget: 600
      servers: 1                 # server actors per replica group (see below)

Any TuneConfig field can be a grid key. Runs whose server is the same (model, task,
data, seed, space and server options: `ServerSpec`) share one group of server actors;
those differing only in the search (method, popsize, budget, schedule) interleave on the
same replicas, each through its own state token (servers.RemoteServer). A group is
started when its first run starts and stopped after its last run, and groups start only
while the cluster has the CPUs/GPUs for them, so a long grid never waits on resources
that its own finished groups still hold.

Each run writes the usual output folder (`<out>/<key>=<value>__...`); `sweep.jsonl`
(one line per run, in grid order) is rewritten after every run. A re-run skips runs
whose results.json exists, resumes runs that left a checkpoint with the same config
(tuning runs, and the baselines that checkpoint: mezo-lora, mezo), and starts the others
afresh. `backend: local` in `config` runs the grid one run at a
time in this process instead; with `concurrency: N` (N > 1) it runs N at a time, each in
its own process with OMP_NUM_THREADS torch threads where that is set, else an equal
share of the CPUs (the thread count can change bf16 rounding, so a sweep that is to
repeat a record sets it).

`--only KEY=VALUE[,VALUE...]` (repeatable; `run_sweep(only=...)`) runs just the grid's runs
with those values, written as in the folder names (`--only task=agnews --only seed=13,87`),
into the same folders as the whole sweep; every run is still validated, and sweep.jsonl
still lists every finished run. Two parts run at once into one `out` are refused (the
sweep holds its folder): give the second its own `--out`, or one part `--concurrency 2`.

Baselines: `method` also takes a baseline name (`dfo-lora baseline`: zero-shot,
calibrated, icl, gradient-lora, subspace-gradient, mezo-lora, c-lora, f-lora). Such a run runs that
baseline on the run's model, task, data and seed (the other TuneConfig values of the
run are its shared settings: test_limit, max_length, dtype, ...), in this process, one
at a time (backend local), writes its folder and its sweep.jsonl line like a tuning
run, and is skipped on a re-run once its results.json exists. Method options go in
`config:` under `baseline:`, keyed by method (each checked before anything runs):

    grid:
      method: [calibrated, gradient-lora, mezo-lora, cma]
    config:
      baseline:
        gradient-lora: {steps: 100, lr: 5.0e-4}
        mezo-lora: {steps: 500}

Rows: a table whose rows are not a product (the same method on two spaces, each with
its own options) names them under `rows:`, each a mapping of TuneConfig values (with
`method`) and, for a baseline, `options:` that replace `config: baseline:` for that row;
the grid's `row` axis picks them by name, and the row's name is the run's method name in
the summarizer's tables:

    rows:
      adapter: {method: gradient, space: series, options: {lr: 1.0e-3}}
      bitfit: {method: gradient, space: bitfit}
      c-lora: {method: cma}
    grid:
      task: [sst2, rte]
      row: [adapter, bitfit, c-lora]
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfo_lora.config import TuneConfig, coerce, read_yaml_mapping
from dfo_lora.errors import UserError, did_you_mean

SWEEP_KEYS = ("out", "concurrency", "rows", "grid", "config")
ALIASES = {"method": "optimizer"}
JSONL = "sweep.jsonl"


@dataclass
class SweepRun:
    name: str
    params: dict  # grid values, keyed as in the file
    config: TuneConfig
    out: Path
    baseline: str | None = None  # a `dfo-lora baseline` method instead of a tuning run
    options: dict = field(default_factory=dict)  # that method's options
    selected: bool = True  # picked by `--only` (else only read back when finished)

    @property
    def group_key(self) -> str:
        c = self.config
        spec = c.server_spec().to_dict()
        return json.dumps([spec, c.servers, c.gpus_per_server, c.cpus_per_server], sort_keys=True)


@dataclass
class Sweep:
    path: Path
    out: Path
    concurrency: int
    runs: list[SweepRun]


def _slug(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_slug(v) for v in value)
    text = str(value)
    if "/" in text or "\\" in text:
        text = Path(text).name
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def load_sweep(
    path: str | Path,
    out: str | Path | None = None,
    concurrency=None,
    only: list[str] | None = None,
) -> Sweep:
    """Parse and validate the whole grid (every run's config) before anything runs;
    `only` ("KEY=VALUE[,VALUE...]" each) marks the runs to run (`_select`)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{path}: unknown sweep key {key!r} (keys: {', '.join(SWEEP_KEYS)}){hint}"
            )
    if not data.get("grid") and not data.get("config"):  # else: the default run, on Ray
        raise UserError(
            f"{path}: no runs: give grid (lists to combine) and/or config (every run's "
            "settings); see dfo-lora sweep --help"
        )
    grid = data.get("grid") or {}
    base = data.get("config") or {}
    table_rows = data.get("rows") or {}
    for name, value in (("grid", grid), ("config", base), ("rows", table_rows)):
        if not isinstance(value, dict):
            raise UserError(f"{path}: {name}: expected a mapping, got {type(value).__name__}")
    from dfo_lora.baselines.registry import methods, options_by_method

    baselines = options_by_method(base.get("baseline"), where=f"{path}: config: ")
    values: dict = {"backend": "ray"}
    for key, value in base.items():
        if key == "baseline":
            continue
        if key in ALIASES:
            key = ALIASES[key]
        values[key] = coerce(key, value, where=f"{path}: config: ")
    rows = _parse_rows(path, table_rows)
    axes = []
    for key, options in grid.items():
        field = ALIASES.get(key, key)
        options = options if isinstance(options, list) else [options]
        if not options:
            raise UserError(f"{path}: grid: {key}: empty list")
        if key == "row":
            for name in options:
                if str(name) not in rows:
                    known = ", ".join(rows) or "none: give rows"
                    raise UserError(
                        f"{path}: grid: row: {name!r} is not a row (rows: {known})"
                        + did_you_mean(str(name), rows)
                    )
            axes.append((key, [str(v) for v in options]))
            continue
        axes.append((key, [coerce(field, v, where=f"{path}: grid: ") for v in options]))
    if rows and "row" not in grid:
        raise UserError(f"{path}: rows: given, but the grid has no row axis to pick them")
    root = Path(out) if out is not None else Path(data.get("out") or Path("runs") / path.stem)
    concurrency = data.get("concurrency", 0) if concurrency is None else concurrency
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 0:
        raise UserError(f"{path}: concurrency: {concurrency!r} is not a whole number >= 0")
    runs, seen = [], {}
    for combo in itertools.product(*[options for _, options in axes]):
        params = {key: value for (key, _), value in zip(axes, combo, strict=True)}
        name = "__".join(f"{key}={_slug(v)}" for key, v in params.items()) or "run"
        if name in seen:
            raise UserError(
                f"{path}: grid: runs {seen[name]} and {params} get the same folder name {name!r}"
            )
        seen[name] = params
        row_values, row_options = rows.get(params.get("row"), ({}, None))
        picked = {ALIASES.get(k, k): v for k, v in params.items() if k != "row"}
        merged = {**values, **row_values, **picked}
        baseline = merged.get("optimizer")
        if baseline in methods():  # a baseline: its own runner, in this process
            # The run's config keeps the search of `config:` (its optimizer_options are
            # that optimizer's), which the baseline does not run.
            merged["optimizer"] = values.get("optimizer", TuneConfig().optimizer)
            merged["backend"] = "local"
        else:
            baseline = None
        config = TuneConfig()
        for key, value in merged.items():
            setattr(config, key, value)
        try:
            config.validate()
        except UserError as exc:
            raise UserError(f"{path}: run {name}: {exc}") from None
        options = dict(baselines.get(baseline, {})) if baseline else {}
        if baseline and row_options is not None:
            options = dict(row_options)
        runs.append(SweepRun(name, params, config, root / name, baseline, options))
    _select(path, runs, axes, only or [])
    addresses = {r.config.address for r in runs if r.config.backend == "ray"}
    if len(addresses) > 1:
        raise UserError(f"{path}: address: one sweep uses one cluster, got {sorted(addresses)}")
    return Sweep(path, root, concurrency, runs)


def _select(path: Path, runs: list[SweepRun], axes: list, only: list[str]) -> None:
    """Mark the runs whose grid values match every `--only KEY=VALUE[,VALUE...]`. A value
    is written as in the run's folder name (`seed=13`, `targets=q+v`), so one part of a
    grid can run on its own (another machine, another process) into the same folders
    as the whole sweep."""
    choices = {key: [_slug(v) for v in options] for key, options in axes}
    wanted: dict[str, set[str]] = {}
    for item in only:
        key, eq, text = item.partition("=")
        values = [v.strip() for v in text.split(",")]
        if not eq or not key.strip() or not all(values):
            raise UserError(f"{path}: --only {item!r}: expected KEY=VALUE[,VALUE...]")
        key = key.strip()
        if key not in choices:
            raise UserError(
                f"{path}: --only {item}: {key!r} is not a grid axis "
                f"(axes: {', '.join(choices) or 'none'})" + did_you_mean(key, choices)
            )
        for value in values:
            if value not in choices[key]:
                raise UserError(
                    f"{path}: --only {item}: {value!r} is not in the grid's {key} "
                    f"({', '.join(choices[key])})"
                )
        wanted.setdefault(key, set()).update(values)
    for run in runs:
        run.selected = all(_slug(run.params[k]) in v for k, v in wanted.items())


def _parse_rows(path: Path, table_rows: dict) -> dict[str, tuple[dict, dict | None]]:
    """rows: name -> (TuneConfig values, the baseline's options or None), each checked."""
    from dfo_lora.baselines.registry import get_method, methods

    rows = {}
    for name, row in table_rows.items():
        where = f"{path}: rows: {name}: "
        if not isinstance(row, dict):
            raise UserError(f"{where}expected a mapping of settings, got {type(row).__name__}")
        values, options = {}, None
        for key, value in row.items():
            if key == "options":
                if not isinstance(value, dict):
                    raise UserError(f"{where}options: expected a mapping")
                options = dict(value)
                continue
            field_name = ALIASES.get(key, key)
            values[field_name] = coerce(field_name, value, where=where)
        if options is not None:
            if values.get("optimizer") not in methods():
                raise UserError(f"{where}options are for baselines only")
            try:
                get_method(str(values.get("optimizer"))).resolve(options)
            except UserError as exc:
                raise UserError(f"{where}{exc}") from None
        rows[str(name)] = (values, options)
    return rows


# ---------------------------------------------------------------------------------------


def _record(run: SweepRun, root: Path, status: str, results=None, error=None) -> dict:
    record = {"run": run.name, "dir": str(run.out.relative_to(root)), "params": run.params}
    record["status"] = status
    if results is not None:
        metric = results["metric"]
        record.update(
            metric=metric,
            dev=results["tuned"]["dev"][metric],
            test=results["tuned"]["test"][metric],
            zero_shot_dev=results["zero_shot"]["dev"][metric],
            zero_shot_test=results["zero_shot"]["test"][metric],
            best_dev_evals=results["best_dev_evals"],
            evaluations=results["evaluations"],
            wall_time_s=results["wall_time_s"],
        )
        calibrated = results.get("calibrated_zero_shot")
        if calibrated:
            record.update(
                calibrated_zero_shot_dev=calibrated["dev"][metric],
                calibrated_zero_shot_test=calibrated["test"][metric],
            )
    if error is not None:
        record["error"] = error
    return record


def _read_results(path: Path) -> dict:
    """A finished run's results.json, or one line naming it (a cut or edited file)."""
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(
            f"{path}: not valid JSON ({exc}); remove it to run that cell again"
        ) from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object; remove it to run that cell again")
    return results


def _resumable(run: SweepRun) -> bool:
    from dfo_lora.search.run import CHECKPOINT

    saved = run.out / "config.yaml"
    if not (saved.is_file() and (run.out / CHECKPOINT).is_file()):
        return False
    try:
        return yaml.safe_load(saved.read_text()) == yaml.safe_load(run.config.to_yaml())
    except yaml.YAMLError:
        return False


class _Resources:
    """CPUs and GPUs that server groups of this sweep may still reserve."""

    def __init__(self, cpus: float, gpus: float):
        self.free = {"CPU": cpus, "GPU": gpus}
        self.total = dict(self.free)
        self.cond = threading.Condition()

    def _need(self, config: TuneConfig) -> dict:
        n = config.servers
        return {"CPU": n * config.cpus_per_server, "GPU": n * config.gpus_per_server}

    def take(self, config: TuneConfig) -> None:
        need = self._need(config)
        for key, amount in need.items():
            if amount > self.total[key] + 1e-9:  # would wait forever
                option = {"CPU": "cpus_per_server", "GPU": "gpus_per_server"}[key]
                raise UserError(
                    f"{option}: {config.servers} server(s) need {amount:g} {key}s, but the Ray "
                    f"cluster has {self.total[key]:g} {key}s"
                )
        with self.cond:
            self.cond.wait_for(lambda: all(need[k] <= self.free[k] + 1e-9 for k in need))
            for key, amount in need.items():
                self.free[key] -= amount

    def give(self, config: TuneConfig) -> None:
        with self.cond:
            for key, amount in self._need(config).items():
                self.free[key] += amount
            self.cond.notify_all()


class _Groups:
    """Server groups by ServerSpec, started on first use, stopped after their last run."""

    def __init__(self, runs: list[SweepRun], resources: _Resources):
        self.remaining = Counter(r.group_key for r in runs)
        self.resources = resources
        self.groups: dict = {}
        self.errors: dict[str, str] = {}
        self.lock = threading.Lock()
        self.key_locks: dict[str, threading.Lock] = defaultdict(threading.Lock)

    def acquire(self, run: SweepRun):
        from dfo_lora.distributed.servers import ServerGroup, actor_spec

        key, c = run.group_key, run.config
        with self.lock:
            key_lock = self.key_locks[key]
        with key_lock:
            if key in self.errors:
                raise UserError(self.errors[key])
            if key not in self.groups:
                try:
                    self.resources.take(c)
                except UserError as exc:
                    self.errors[key] = str(exc)
                    raise
                try:
                    self.groups[key] = ServerGroup.start(
                        actor_spec(c), c.servers, c.gpus_per_server, c.cpus_per_server
                    )
                except UserError as exc:
                    self.resources.give(c)
                    self.errors[key] = str(exc)
                    raise
            return self.groups[key]

    def finish(self, run: SweepRun) -> None:
        key = run.group_key
        with self.lock:
            self.remaining[key] -= 1
            last = self.remaining[key] == 0
            group = self.groups.pop(key, None) if last else None
        if group is not None:
            group.shutdown()
            self.resources.give(run.config)


def run_sweep(
    path: str | Path,
    out: str | Path | None = None,
    concurrency: int | None = None,
    echo=print,
    only: list[str] | None = None,
) -> dict:
    """Run (or continue) a sweep; returns {"done", "skipped", "failed", "jsonl"}.
    With `only`, just the runs it picks run; sweep.jsonl still lists every finished run.

    The sweep's folder is held (`outdir.hold`: its `.lock`) for the whole sweep, so a
    second sweep into the same folder is refused in one line instead of rewriting
    sweep.jsonl beside this one; each run also holds its own folder."""
    from dfo_lora.search import outdir

    sweep = load_sweep(path, out, concurrency, only)
    with outdir.hold(sweep.out):
        return _run_sweep(sweep, echo)


def _run_sweep(sweep: Sweep, echo) -> dict:
    from dfo_lora.search.checkpoint import atomic_write_bytes

    records: dict[str, dict] = {}
    lock = threading.Lock()
    jsonl = sweep.out / JSONL

    def save(run: SweepRun, record: dict) -> None:
        with lock:
            records[run.name] = record
            lines = [json.dumps(records[r.name]) for r in sweep.runs if r.name in records]
            atomic_write_bytes(jsonl, ("\n".join(lines) + "\n").encode())

    todo = []
    for run in sweep.runs:
        done = run.out / "results.json"
        if done.is_file():
            try:
                record = _record(run, sweep.out, "skipped", _read_results(done))
            except (KeyError, TypeError) as exc:  # an edited or foreign results.json
                raise UserError(
                    f"{done}: not a dfo-lora results file (no {exc}); remove it to run "
                    "that cell again"
                ) from None
            save(run, record)
        elif run.selected:
            todo.append(run)
    finished = len(records)
    picked = sum(r.selected for r in sweep.runs)
    by_only = f", {picked} picked by --only" if picked < len(sweep.runs) else ""
    echo(f"sweep: {len(sweep.runs)} runs{by_only}, {finished} already finished")

    def one(run: SweepRun, server_for=None) -> None:
        resume = _resumes(run)
        echo(f"sweep: {run.name}: {'resuming' if resume else 'starting'}")
        results, error = _attempt(run, resume, server_for)
        finish(run, results, error)

    def finish(run: SweepRun, results: dict | None, error: str | None) -> None:
        if error is not None:
            save(run, _record(run, sweep.out, "failed", error=error))
            echo(f"sweep: {run.name}: FAILED: {error}")
            return
        save(run, _record(run, sweep.out, "done", results))
        metric = results["metric"]
        echo(
            f"sweep: {run.name}: done, test {metric} {results['tuned']['test'][metric]:.4f} "
            f"(zero-shot {results['zero_shot']['test'][metric]:.4f}, "
            f"{results['wall_time_s']:.0f} s)"
        )

    local = [r for r in todo if r.config.backend == "local"]
    if sweep.concurrency > 1 and len(local) > 1:
        _run_local_processes(local, sweep.concurrency, echo, finish)
    else:
        for run in local:
            one(run)
    on_ray = [r for r in todo if r.config.backend == "ray"]
    if on_ray:
        _run_on_ray(sweep, on_ray, one)
    counts = Counter(r["status"] for r in records.values())
    return {
        "done": counts["done"],
        "skipped": counts["skipped"],
        "failed": counts["failed"],
        "jsonl": str(jsonl),
    }


def _resumes(run: SweepRun) -> bool:
    """A run that left a checkpoint of the same config continues: a tuning run, or a
    baseline whose method checkpoints (mezo-lora, mezo) with the same options; the other
    baselines restart."""
    if run.baseline is None:
        return _resumable(run)
    from dfo_lora.baselines.run import saved_run

    try:  # the method checkpoints and baseline.yaml holds it with the same options
        saved_run(run.out, run.baseline, run.config, run.options)
    except UserError:
        return False
    return _resumable(run)


def _attempt(run: SweepRun, resume: bool, server_for=None) -> tuple[dict | None, str | None]:
    """Run one cell: (its results, None), or (None, the error's first line): one failed
    run must not stop the sweep."""
    from dfo_lora.search.run import tune

    optimizers = None
    try:
        kwargs = {}
        if server_for is not None:
            from dfo_lora.distributed.optimizers import RemoteOptimizers
            from dfo_lora.distributed.servers import RemoteServer

            kwargs["server"] = RemoteServer(server_for(run))
            kwargs["optimizers"] = optimizers = RemoteOptimizers()
        if run.baseline is not None:
            from dfo_lora.baselines import run_baseline

            return run_baseline(
                run.baseline,
                run.config,
                run.options,
                run.out,
                overwrite=not resume,
                progress=False,
                resume=resume,
            ), None
        config = None if resume else run.config
        return tune(config, run.out, resume=resume, overwrite=True, progress=False, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - reported in the run's sweep.jsonl line
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return None, (message.splitlines() or [type(exc).__name__])[0]
    finally:
        if optimizers is not None:
            optimizers.close()


def _attempt_in_worker(run: SweepRun, resume: bool, threads: int):
    """`_attempt` in a worker process of `_run_local_processes`, with its share of threads
    (it says when it starts: the parent only knows when a run is queued and when done)."""
    import torch

    torch.set_num_threads(threads)
    print(f"sweep: {run.name}: {'resuming' if resume else 'starting'}", flush=True)
    return _attempt(run, resume)


def local_threads(concurrency: int) -> int:
    """Torch threads of each of `concurrency` local runs: OMP_NUM_THREADS where set, else an
    equal share of this machine's CPUs (at least one)."""
    import os

    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, (os.cpu_count() or 1) // concurrency)


def _run_local_processes(runs: list[SweepRun], concurrency: int, echo, finish) -> None:
    """`backend: local` with `concurrency` > 1: that many runs at a time, each in its own
    process (a fresh model per run; no state is shared between runs), in grid order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = local_threads(concurrency)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(max_workers=min(concurrency, len(runs)), mp_context=context) as pool:
        echo(f"sweep: {len(runs)} runs queued, {concurrency} at a time, {threads} threads each")
        futures = {}
        for run in runs:
            futures[pool.submit(_attempt_in_worker, run, _resumes(run), threads)] = run
        for future in as_completed(futures):
            try:
                results, error = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (killed, out of memory)
                results, error = None, f"worker process failed: {type(exc).__name__}: {exc}"
            finish(futures[future], results, error)


def _run_on_ray(sweep: Sweep, runs: list[SweepRun], one) -> None:
    import ray

    from dfo_lora.distributed.cluster import RaySession, capacity

    order = sorted(runs, key=lambda r: r.group_key)  # a group's runs one after another
    with RaySession(runs[0].config.address):
        total = ray.cluster_resources()
        groups = _Groups(runs, _Resources(total.get("CPU", 0.0), total.get("GPU", 0.0)))
        workers = sweep.concurrency
        if workers == 0:
            c = runs[0].config
            workers = max(1, capacity(c.gpus_per_server, c.cpus_per_server) // c.servers)
        workers = min(workers, len(runs))

        def job(run: SweepRun) -> None:
            try:
                one(run, server_for=groups.acquire)
            finally:
                groups.finish(run)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
            list(pool.map(job, order))
