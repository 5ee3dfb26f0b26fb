"""Ask/tell optimizers with exact, pickle-free state: CMA-ES (pycma) and the Fireworks family.

    opt = make_optimizer("dynfwa", dim=500, popsize=20, sigma=1.0, seed=13)
    Z = opt.ask()                      # (popsize, dim)
    opt.tell(Z, losses)                # losses (popsize,), NaN/inf = worst
    z_best, f_best = opt.best
    state = opt.state_dict()           # JSON values + numpy arrays
    opt2 = optimizer_from_state(state) # continues bit for bit

The one table of optimizers (name -> class, allowed options, help) is
`registry.OPTIMIZERS`; the factory, the run config and the CLI help all read it.

No torch here (the optimizers never see the model), no global RNG left changed.
"""

from dfo_lora.optim.base import (
    OPTIMIZER_NAMES,
    Optimizer,
    OptimizerConfig,
    make_optimizer,
    optimizer_from_state,
)
from dfo_lora.optim.registry import OPTIMIZERS, OptimizerEntry, describe_optimizers

__all__ = [
    "OPTIMIZERS",
    "OPTIMIZER_NAMES",
    "Optimizer",
    "OptimizerConfig",
    "OptimizerEntry",
    "describe_optimizers",
    "make_optimizer",
    "optimizer_from_state",
]
