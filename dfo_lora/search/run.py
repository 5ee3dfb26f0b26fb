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
                       `dfo-lora export` writes as PEFT, merged or native weights;
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
import yaml

from dfo_lora.config import TuneConfig, load_config, read_yaml_mapping
from dfo_lora.errors import UserError
from dfo_lora.export import check_state_tensors, factor_tensors
from dfo_lora.search import outdir
from dfo_lora.search.callbacks import JsonlLog, ProgressBar, tensorboard_if_available
from dfo_lora.search.checkpoint import (
    atomic_write_bytes,
    atomic_write_safetensors,
    load_state,
    read_safetensors,
    save_state,
)
from dfo_lora.search.loop import LayerwiseSearch

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


def prepare_out_dir(
    out: Path, config: TuneConfig, resume: bool, overwrite: bool, resumable: bool = True
) -> TuneConfig:
    """Check the folder before anything is written; returns the config to run.
    (`resumable`: whether the "exists" error may suggest --resume; baselines cannot.)

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
    log = JsonlLog(out / "log.jsonl")
    callbacks = [log, ProgressBar(server_metric(server), disable=not progress)]
    search = LayerwiseSearch(  # checks the layers and the budget: nothing is written yet
        server,
        config,
        metric=server_metric(server),
        callbacks=callbacks,
        checkpoint=lambda s: save_state(out / CHECKPOINT, s),
        optimizers=optimizers,
    )
    if state is not None:
        search.load_state_dict(state)
        outdir.remove_stale_temps(out)  # a killed write's temp file: we hold the lock
        print(
            f"resuming {out} at {search.position.evals} of {config.budget} evaluations",
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


def save_tuned(
    path: Path,
    z: np.ndarray,
    config: TuneConfig,
    factors: dict[str, np.ndarray] | None = None,
    space_state: dict | None = None,
) -> None:
    """The tuned state: z per layer (the config, in metadata, rebuilds the same
    projections), the fp32 weights of the best and final states (LoRA's factors, for
    `export`) and the space's own state (name, seed, sigma_hat) as JSON metadata."""
    arrays = {"z": np.ascontiguousarray(z), **(factors or {})}
    metadata = {"config": config.to_yaml()}
    if space_state is not None:
        metadata["space"] = json.dumps(space_state)
    atomic_write_safetensors(path, arrays, metadata)  # the umask's mode, as open() gives


def load_tuned_state(run_dir: Path, state: str = "best"):
    """The fp32 weights of a run's best or final state ("<layer>.<group>.<name>", the
    space's `export_tensors`; LoRA: the factors A, B) and its config, for `export`."""
    tensors, config = _read_tuned(run_dir, "export")
    if not any(key.startswith(("best.", "final.")) for key in tensors):
        if np.any(tensors["z"]):
            raise UserError(
                f"export: {run_dir}/tuned.safetensors holds z only (tuned before exports "
                f"existed); re-run it: dfo-lora tune --config {run_dir}/config.yaml --out NEW"
            )
    prefix = f"{state}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, config


def load_tuned(run_dir: Path) -> tuple[np.ndarray, TuneConfig]:
    """The best-dev z (layers, intrinsic_dim) of a finished run and its config.yaml."""
    tensors, config = _read_tuned(run_dir)
    return tensors["z"], config


# What a damaged tuned.safetensors leaves: the checkpoint still holds the best-dev state.
TUNED_HINT = "; rewrite it from the run's checkpoint with dfo-lora tune --resume {run}"


def _read_tuned(run_dir: Path, command: str = "eval") -> tuple[dict[str, np.ndarray], TuneConfig]:
    """Every array of tuned.safetensors and the run's config.yaml, read back whole: the
    file parses, every tensor is finite (`checkpoint.read_safetensors`), its metadata
    (config, space) agrees with config.yaml, z is (layers, intrinsic_dim) and the best and
    final weights have the space's shapes (`export.check_state_tensors`). Each failure is
    one line naming the file and the tensor or field."""
    run_dir = Path(run_dir)
    path = run_dir / "tuned.safetensors"
    if not path.is_file():
        raise UserError(f"{command}: {path} does not exist (is {run_dir} a finished run?)")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{command}: {saved} does not exist (is {run_dir} a finished run?)")
    config = load_config(saved)
    hint = TUNED_HINT.format(run=run_dir)
    tensors, meta = read_safetensors(path, hint=hint)
    _check_tuned_metadata(path, meta, saved)
    space = _space_metadata(path, meta, config)
    layers = len(space["sigma_hat"]) if isinstance(space.get("sigma_hat"), list) else None
    z = tensors.get("z")
    if z is None:
        raise UserError(f"{path}: no tensor 'z'{hint}")
    if z.ndim != 2 or z.shape[1] != config.intrinsic_dim or layers not in (None, z.shape[0]):
        rows = "layers" if layers is None else layers
        raise UserError(
            f"{path}: tensor 'z' has shape {tuple(z.shape)}, expected ({rows}, "
            f"{config.intrinsic_dim}) (intrinsic_dim in {saved}){hint}"
        )
    factors = {k: v for k, v in tensors.items() if k != "z"}
    check_state_tensors(
        path, factors, config.space, config.space_config(), str(saved), True, z.shape[0]
    )
    if factors:  # the best weights are z's: one entry per layer that z changes
        best = sorted({int(k.split(".")[1]) for k in factors if k.startswith("best.")})
        changed = [int(i) for i in np.flatnonzero(np.any(z != 0, axis=1))]
        if best != changed:
            raise UserError(
                f"{path}: z changes layers {changed} but the best weights are for layers "
                f"{best}; the file was edited{hint}"
            )
    return tensors, config


# Where a run reads from and runs on, not what it tuned: `dfo-lora eval` takes them again.
WHERE_FIELDS = ("model", "data_dir", "device", "dtype", "test_limit")


def _check_tuned_metadata(path: Path, meta: dict, saved: Path) -> None:
    """tuned.safetensors' copy of the config equals config.yaml (both are written by the
    same tune): a difference means one was edited or they are two runs' files."""
    try:
        values = yaml.safe_load(meta["config"])
    except KeyError:
        raise UserError(f"{path}: no 'config' metadata (not a tuned.safetensors)") from None
    except yaml.YAMLError:
        raise UserError(f"{path}: its 'config' metadata is not YAML") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: its 'config' metadata is not a mapping")
    want = read_yaml_mapping(saved)  # as written, so fields added since compare equal
    diff = [k for k in {**want, **values} if values.get(k) != want.get(k)]
    if diff:
        shown = ", ".join(f"{k} ({values.get(k)!r} vs {want.get(k)!r})" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        why = "one was edited or they are two runs' files"
        if set(diff) <= set(WHERE_FIELDS):  # a moved model or data folder, edited in by hand
            why = "put config.yaml back (eval takes --model, --data-dir, --device, --dtype again)"
        raise UserError(f"{path}: its config metadata differs from {saved} in {shown}{more}; {why}")


def _space_metadata(path: Path, meta: dict, config: TuneConfig) -> dict:
    """The space's saved state (name, seed, sigma_hat); {} in files from before it."""
    if "space" not in meta:
        return {}
    try:
        space = json.loads(meta["space"])
    except ValueError:
        raise UserError(f"{path}: its 'space' metadata is not JSON") from None
    if not isinstance(space, dict):
        raise UserError(f"{path}: its 'space' metadata is not a mapping")
    for key, want in (("space", config.space), ("seed", config.seed)):
        if key in space and space[key] != want:
            raise UserError(
                f"{path}: its space metadata has {key} {space[key]!r}, config.yaml {want!r}"
            )
    return space
