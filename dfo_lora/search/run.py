"""A tuning run on disk: the output folder, checkpoints, resume, results.

Output folder:
- `config.yaml`       the fully resolved TuneConfig;
- `log.jsonl`         one line per generation and per dev evaluation;
- `checkpoint/state.safetensors`  written atomically after every layer visit (and
                       every `checkpoint_every_s` within long visits);
- `results.json`      dev/test metrics of the tuned (best-dev) and zero-shot states, and
                       of the calibrated zero state (`calibrated_zero_shot`, whatever the
                       run's objective), evaluations, wall time, peak memory, versions;
- `tuned.safetensors` z per layer of the best-dev state (+ the space's settings), which
                       `dfo-lora eval` loads, and the fp32 weights of the best and the final
                       state (the space's `export_tensors`; LoRA: factors A, B), which
                       `dfo-lora export` writes as PEFT, merged or native weights (the
                       format, its writer and its checked reader: `search/tuned.py`);
- `.lock`             while the run lives: its pid and host (`outdir`: one run per folder,
                       --overwrite removes only these files).

Every check that can fail before the first evaluation (the folder, the config, the model,
the layers and the budget against the model) runs before the first write.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from dfo_lora.config import TuneConfig, load_config
from dfo_lora.errors import UserError
from dfo_lora.search import outdir
from dfo_lora.search.callbacks import JsonlLog, ProgressBar, tensorboard_if_available
from dfo_lora.search.checkpoint import (
    atomic_write_bytes,
    load_state,
    save_state,
)
from dfo_lora.search.loop import LayerwiseSearch
from dfo_lora.search.tuned import factor_tensors, save_tuned

CHECKPOINT = Path("checkpoint") / "state.safetensors"
DEFAULT_OUT = Path("runs") / "latest"  # a run's folder when none is given


def versions() -> dict:
    import cma
    import torch
    import transformers

    import dfo_lora

    return {
        "dfo_lora": dfo_lora.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cma": cma.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        **hardware(),
    }


# CPU flags that decide speed and numerics here: bf16 is native (and `--dtype auto` picks
# it) with AMX or avx512_bf16; without them fp32 on AVX2/AVX-512 (BENCHMARKS.md "The
# dtype on each CPU").
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def hardware() -> dict:
    """The machine a result came from: CPU model and flags, GPU (experiments/quality)."""
    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "gpu": gpu}


# A machine that a checkpoint written before runs recorded their machines ran on.
UNRECORDED = {"cpu": None, "cpu_flags": None, "gpu": None}


def machines_so_far(state: dict | None) -> list[dict]:
    """Every machine a run has run on, in order, this one last (`hardware()` each): kept in
    the checkpoint and results.json, so that a run resumed on another machine says so
    (results.json's `versions` name only the last). A checkpoint written before this record
    existed starts the list with `UNRECORDED`."""
    here = hardware()
    if state is None:
        return [here]
    saved = state.get("machines")
    recorded = isinstance(saved, list) and saved and all(isinstance(m, dict) for m in saved)
    history = [dict(m) for m in saved] if recorded else [dict(UNRECORDED)]
    if history[-1] != here:
        history.append(here)
    return history


def prepare_out_dir(
    out: Path, config: TuneConfig, resume: bool, overwrite: bool, resumable: bool = True
) -> TuneConfig:
    """Check the folder before anything is written; returns the config to run.
    (`resumable`: whether the "exists" error may suggest --resume: tune's runs and the
    baselines that checkpoint.)

    A folder that another live run holds is refused (`outdir.check_not_held`); its lock
    never counts as content, and `overwrite` is refused for a folder holding files that
    dfo-lora did not write (`outdir.check_clearable`).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} is a file, not a folder")
    outdir.check_not_held(out)
    if resume:
        saved = out / "config.yaml"
        if not saved.is_file():
            raise UserError(f"resume: {saved} does not exist (nothing to resume in {out})")
        if not (out / CHECKPOINT).is_file():
            raise UserError(
                f"resume: {out / CHECKPOINT} does not exist (the run never checkpointed)"
            )
        previous = load_config(saved)
        if config is not None and config.to_dict() != previous.to_dict():
            diff = [k for k, v in config.to_dict().items() if previous.to_dict()[k] != v]
            raise UserError(
                f"resume: config differs from {saved} in {', '.join(diff)}; "
                "resume with the same settings or start a new --out"
            )
        return previous
    if outdir.contents(out):
        if not overwrite:
            also = " or --resume" if resumable else ""
            raise UserError(f"out: {out} exists and is not empty; pass --overwrite{also}")
        outdir.check_clearable(out)
    return config


def tune(
    config: TuneConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    server=None,
    optimizers=None,
) -> dict:
    """Run (or resume) a C-LoRA / F-LoRA search in this process; returns the results dict.

    `server` lets a caller pass a ready server (in-process or a Ray proxy); by default
    one is built from the config. `optimizers` places the per-layer optimizers (see
    LayerwiseSearch; default in-process). A `backend: ray` config needs its server
    passed: the public `dfo_lora.tune` (`distributed.run.run_tune`) starts the actors.
    """
    if out is None:
        if resume:
            raise UserError("resume: needs the run's output folder")
        out = DEFAULT_OUT
    out = Path(out)
    config = prepare_out_dir(out, config if config is not None else None, resume, overwrite)
    if config is None:
        config = TuneConfig().validate()
    if server is None and config.backend != "local":
        raise UserError(
            f"backend: {config.backend!r} is not run by dfo_lora.search.run.tune, which runs "
            "in this process; call dfo_lora.tune, which starts the Ray actors"
        )
    with outdir.hold(out):  # one run per folder, from here to the end, however it ends
        prepare_out_dir(out, config, resume, overwrite)  # again, now that the folder is ours
        return _run(config, out, resume, progress, server, optimizers)


def _run(config: TuneConfig, out: Path, resume: bool, progress: bool, server, optimizers):
    """`tune` in a folder this process holds: every check first (the server's, and the
    search's layers and budget against the model), then the first write."""
    state = load_state(out / CHECKPOINT, config) if resume else None  # that run's, whole
    if server is None:
        from dfo_lora.server.factory import build_server

        server = build_server(config.server_spec())
    machines = machines_so_far(state)
    log = JsonlLog(out / "log.jsonl")
    callbacks = [log, ProgressBar(server_metric(server), disable=not progress)]
    search = LayerwiseSearch(  # checks the layers and the budget: nothing is written yet
        server,
        config,
        metric=server_metric(server),
        callbacks=callbacks,
        checkpoint=lambda s: save_state(out / CHECKPOINT, {**s, "machines": machines}),
        optimizers=optimizers,
    )
    if state is not None:
        try:  # an optimizer's state that does not replay: name the file
            search.load_state_dict(state)
            drifts = [o.replay_drift for per in search.optimizers for o in per]
        except UserError as exc:
            raise UserError(f"{out / CHECKPOINT}: {exc}") from None
        outdir.remove_stale_temps(out)  # a killed write's temp file: we hold the lock
        drifts = [d for d in drifts if d is not None]  # None: restored bit for bit
        print(
            f"resuming {out} at {search.position.evals} of {config.budget} evaluations"
            + (
                f"; the optimizer state was not restored bit for bit (another CPU kind or "
                f"BLAS) and matches the saved one to {max(drifts):.1g} (relative)"
                if drifts
                else ""
            ),
            file=sys.stderr,
        )
    else:  # the first write: a previous run's files go (overwrite), the config comes
        outdir.clear(out)
        atomic_write_bytes(out / "config.yaml", config.to_yaml().encode())
    log.truncate(search.log_lines if state is not None else 0)
    search.callbacks.extend(tensorboard_if_available(out / "tensorboard"))
    results = search.run()
    results["calibrated_zero_shot"] = calibrated_zero_shot(server, config, results["zero_shot"])
    results["peak_mem_bytes"] = server.peak_memory()
    results["versions"] = versions()
    results["machines"] = machines
    info = server.info()
    results["server"] = {k: v for k, v in info.items() if k not in ("sigma_hat", "space_state")}
    results["notes"] = server_notes(server)
    results["resolved"] = resolved_settings(config, info)
    factors = {
        **factor_tensors(server.state_factors(search.best_dev_z), "best"),
        **factor_tensors(server.state_factors(server.get_state()), "final"),
    }
    save_tuned(
        out / "tuned.safetensors", search.best_dev_z, config, factors, info.get("space_state")
    )
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    return results


def calibrated_zero_shot(server, config: TuneConfig, zero_shot: dict) -> dict:
    """The calibrated zero state's dev and test metrics, whatever the run's objective, so
    every results.json shows plain prompt, calibrated zero state and tuned state."""
    if config.calibrate:  # the run's zero_shot is that state already
        return {split: dict(zero_shot[split]) for split in ("dev", "test")}
    current = server.get_state()
    server.set_state(np.zeros_like(current))
    try:
        return {split: server.evaluate(split, calibrate=True) for split in ("dev", "test")}
    finally:
        server.set_state(current)


def resolved_settings(config: TuneConfig, info: dict) -> dict:
    """What the config's `auto` and unset values became on this machine (config.yaml
    keeps them as given, so a resume on another machine resolves them there again)."""
    from dfo_lora.tasks.loaders import default_data_dir

    data_dir = config.data_dir
    if data_dir is None:
        try:
            data_dir = str(default_data_dir().resolve())
        except UserError:  # a YAML task with its own data paths: no shared folder needed
            data_dir = None
    space = config.space_config()
    return {
        "dtype": info.get("dtype"),
        "device": info.get("device"),
        "targets": list(getattr(space, "targets", None) or []) or None,
        "data_dir": data_dir,
    }


def server_metric(server) -> str:
    return server.info().get("metric", "accuracy")


def server_notes(server) -> list[str]:
    return list(server.info().get("notes", []))
