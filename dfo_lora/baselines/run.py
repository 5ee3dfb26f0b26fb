"""`run_baseline`: one baseline run into an output folder, like `tune`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dfo_lora.baselines import resume as checkpoint
from dfo_lora.baselines.common import Context
from dfo_lora.baselines.registry import get_method, methods
from dfo_lora.config import TuneConfig, load_config, read_yaml_mapping
from dfo_lora.errors import UserError
from dfo_lora.extras import require_peft
from dfo_lora.search.run import CHECKPOINT


def default_out(method: str, config: TuneConfig) -> Path:
    return Path("runs") / f"{Path(config.task).stem}-{config.seed}-{method}"


def run_baseline(
    method: str | None,
    config: TuneConfig | None,
    options: dict | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool = False,
) -> dict:
    """Run baseline `method` on the data `config` names; returns results (results.json).

    `config` gives the shared settings (model, task, data_dir, k, seed, test_limit,
    max_length, dtype, device, loss, performance); `options` the method's own (CLI
    strings or YAML values, checked against the registry). Every check (method, options,
    peft, output folder, ICL fit) runs before anything is written to `out`, and the run
    holds the folder's lock from loading the model to its last write (search/outdir.py).

    `resume` continues a resumable method's run in `out` from its checkpoint; its
    config.yaml and baseline.yaml give the settings (`config` and `options`, if given,
    must agree with them), and the checkpoint must be that run's.
    """
    from dfo_lora.search import outdir
    from dfo_lora.search.run import prepare_out_dir

    if resume:
        if out is None:
            raise UserError("resume: needs the run's output folder")
        method, config, options = saved_run(Path(out), method, config, options)
    entry = get_method(method)
    resolved = entry.resolve(options)
    if entry.needs_peft:
        require_peft(entry.name)
    out = Path(out) if out is not None else default_out(entry.name, config)
    if out.exists() and not out.is_dir():
        raise UserError(f"out: {out} is a file, not a folder")
    prepare_out_dir(out, config, resume, overwrite, resumable=entry.resumable)  # checks only
    with outdir.hold(out):  # tune, for c-lora / f-lora, holds it again (re-entrant)
        prepare_out_dir(out, config, resume, overwrite, resumable=entry.resumable)  # now ours
        if entry.uses_tune:
            return entry.run(config, resolved, out, overwrite=overwrite, progress=progress)
        state = None
        if resume:
            state = checkpoint.load(out / CHECKPOINT, entry.name, config, resolved)
            outdir.remove_stale_temps(out)  # a killed write's temp file: we hold the lock
        ctx = prepare_context(entry.name, config, resolved, out, progress)
        if state is None:
            ctx.score_prompt()
        else:
            ctx.resume_from(state)
        return entry.run(ctx)


def saved_run(
    out: Path, method: str | None, config: TuneConfig | None, options: dict | None
) -> tuple[str, TuneConfig, dict]:
    """The method, config and options of the run in `out` (baseline.yaml, config.yaml),
    checked against those given."""
    described = out / "baseline.yaml"
    if not described.is_file():
        raise UserError(f"resume: {described} does not exist (no baseline run in {out})")
    saved = read_yaml_mapping(described)
    name, given = saved.get("method"), saved.get("options")
    if not isinstance(name, str) or not isinstance(given, dict):
        raise UserError(f"{described}: expected `method: NAME` and `options: {{...}}`")
    entry = get_method(name)
    if not entry.resumable:
        raise UserError(
            f"resume: {entry.name} does not checkpoint (only "
            f"{', '.join(m.name for m in methods().values() if m.resumable)} do); "
            "run it again with --overwrite"
        )
    if method is not None and get_method(method).name != entry.name:
        raise UserError(f"resume: {out} holds a {entry.name} run, not {method}")
    resolved = entry.resolve(given)
    if options is not None and entry.resolve(options) != resolved:
        mine = entry.resolve(options)
        diff = [k for k in resolved if mine[k] != resolved[k]]
        raise UserError(
            f"resume: options differ from {described} in {', '.join(diff)}; "
            "resume with the same options or start a new --out"
        )
    previous = config
    if previous is None:
        saved_config = out / "config.yaml"
        if not saved_config.is_file():
            raise UserError(f"resume: {saved_config} does not exist (nothing to resume in {out})")
        previous = load_config(saved_config)
    return entry.name, previous, resolved


def prepare_context(
    method: str, config: TuneConfig, options: dict, out: Path, progress: bool = True
) -> Context:
    """Data, backbone and server as tune builds them (the server scores the plain prompt;
    a method chooses calibration per evaluation); nothing is written yet. The
    server holds the run's space for a method that trains it (`own_space`), else LoRA."""
    from dfo_lora.backbone import load_backbone
    from dfo_lora.server.factory import build_server, load_data
    from dfo_lora.spaces.lora import LoraConfig

    spec = config.server_spec()
    # The other baselines adapt the plain model (peft LoRA, prompts): another search
    # space's modules (hydra, adapters) would stand where peft looks for the projections.
    space = spec.space
    if not get_method(method).own_space and not isinstance(space, LoraConfig):
        space = LoraConfig(seed=spec.seed)
    spec = dataclasses.replace(
        spec, calibrate=False, loss=options.get("loss", config.loss), space=space
    )
    data = load_data(spec)
    backbone = load_backbone(spec.model, spec.dtype, spec.device, spec.trust_remote_code)
    server = build_server(spec, backbone=backbone, data=data)
    return Context(
        method=method,
        options=options,
        config=config,
        spec=spec,
        data=data,
        backbone=backbone,
        server=server,
        out=Path(out),
        progress=progress,
    )
