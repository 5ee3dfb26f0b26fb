"""The Ray backend: evaluation servers and optimizers as actors.

- `servers`: `ServerActor` (one model replica), `ServerGroup` (replicas of one spec,
  placed together, health and load), `RemoteServer` (the EvaluationServer API over a
  group: scatter of a population, gather in candidate order, state sync, retries);
- `optimizers`: `OptimizerPool` actor and the `RemoteOptimizers` factory the loop takes;
- `cluster`: connecting to Ray (`auto`, `local`, an address) and capacity checks;
- `run`: `run_tune` (the public `dfo_lora.tune`, and `dfo-lora tune`) on either backend.

Sweeps (`dfo_lora/sweep.py`) sit above this package: they run tuning runs on it and
baselines beside it.

The single-process path stays the default and never imports Ray.
"""

from dfo_lora.distributed.run import run_tune
from dfo_lora.sweep import run_sweep

__all__ = ["run_sweep", "run_tune"]
