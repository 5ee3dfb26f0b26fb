"""`tune` on the backend the config names: the same `search.run.tune`, other server and
optimizers. `run_tune` is the public `dfo_lora.tune` and what `dfo-lora tune` calls."""

from __future__ import annotations

from pathlib import Path

from dfo_lora.config import TuneConfig


def run_tune(
    config: TuneConfig | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    server=None,
    optimizers=None,
) -> dict:
    """Run (or resume) a search on the backend the config names (`backend`: local or ray;
    a resumed run: its saved config's); returns the results dict (results.json).

    `server` / `optimizers` (a ready server, where the optimizers live) go straight to
    `search.run.tune`: whoever passes them has placed the run already.
    """
    from dfo_lora.search.run import DEFAULT_OUT, prepare_out_dir, tune

    if server is not None or optimizers is not None:
        return tune(config, out, resume, overwrite, progress, server, optimizers)
    resolved = config
    if out is None and not resume:
        out = DEFAULT_OUT
    if out is not None:  # checks the folder before any actor starts; nothing is written
        resolved = prepare_out_dir(Path(out), config, resume, overwrite)
    if resolved is None or resolved.backend == "local":
        return tune(config, out, resume=resume, overwrite=overwrite, progress=progress)
    return tune_on_ray(resolved, out, resume=resume, overwrite=overwrite, progress=progress)


def tune_on_ray(
    config: TuneConfig,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Server replicas and the optimizer pool as actors; the loop runs in this process."""
    from dfo_lora.distributed.cluster import RaySession
    from dfo_lora.distributed.optimizers import RemoteOptimizers
    from dfo_lora.distributed.servers import RemoteServer, ServerGroup, actor_spec
    from dfo_lora.search.run import tune

    with RaySession(config.address):
        group = ServerGroup.start(
            actor_spec(config),
            servers=config.servers,
            gpus_per_server=config.gpus_per_server,
            cpus_per_server=config.cpus_per_server,
        )
        try:
            optimizers = RemoteOptimizers()
            try:
                return tune(
                    config,
                    out,
                    resume=resume,
                    overwrite=overwrite,
                    progress=progress,
                    server=RemoteServer(group),
                    optimizers=optimizers,
                )
            finally:
                optimizers.close()
        finally:
            group.shutdown()
