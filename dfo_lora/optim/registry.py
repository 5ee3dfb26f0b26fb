"""The one table of layer optimizers: name -> class, the options it takes, and its help.

`make_optimizer` builds from it, each optimizer class checks its options against it, the
run config validates `optimizer` / `fwa_variant` against it, and `dfo-lora tune --help`
prints it. Adding an optimizer means adding one entry here (and its class).

Classes are named as "module:Class" and imported on first use, so reading the table
(config validation, CLI help) does not load pycma.
"""

from __future__ import annotations

import importlib
import textwrap
from dataclasses import dataclass

from dfo_lora.errors import UserError, did_you_mean


@dataclass(frozen=True)
class OptimizerEntry:
    """One registered optimizer."""

    name: str  # registry name, also `Optimizer.name` and the name in a saved state
    family: str  # "cma" (pycma) or "fireworks"; the families share a class
    target: str  # "module:Class" of the implementation
    options: tuple[str, ...]  # keys of `make_optimizer(..., **options)` it takes
    help: str  # one line for `dfo-lora tune --help`
    # False where the best candidate is a probe around the point the optimizer steps, not a
    # state to install: the layer-wise loop must then commit its mean (`commit: mean`)
    commits_best: bool = True

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        return getattr(importlib.import_module(module), cls)


_CMA = "dfo_lora.optim.cma_es:CMAES"
_FW = "dfo_lora.optim.fireworks:Fireworks"
_FW_COMMON = ("init_amplitude", "bound")

_ENTRIES = (
    OptimizerEntry(
        "cma", "cma", _CMA, ("bound", "pycma_options"), "CMA-ES, full covariance (pycma)"
    ),
    OptimizerEntry(
        "cma_diag",
        "cma",
        _CMA,
        ("bound", "pycma_options"),
        "separable CMA-ES (pycma, CMA_diagonal=True)",
    ),
    OptimizerEntry(
        "fwa",
        "fireworks",
        _FW,
        ("n_fireworks", "n_gaussian", "a", "b", "amplitude", *_FW_COMMON),
        "Fireworks Algorithm (Tan & Zhu 2010)",
    ),
    OptimizerEntry(
        "efwa",
        "fireworks",
        _FW,
        (
            "n_fireworks",
            "n_gaussian",
            "a",
            "b",
            "amplitude",
            "min_amplitude_start",
            "min_amplitude_end",
            "max_evals",
            *_FW_COMMON,
        ),
        "Enhanced Fireworks Algorithm (Zheng, Janecek & Tan 2013)",
    ),
    OptimizerEntry(
        "dynfwa",
        "fireworks",
        _FW,
        ("n_fireworks", "a", "b", "amplitude", "ca", "cr", *_FW_COMMON),
        "dynamic-search Fireworks (Zheng et al. 2014), the family's default",
    ),
    OptimizerEntry(
        "bbfwa",
        "fireworks",
        _FW,
        ("ca", "cr", *_FW_COMMON),
        "bare-bones Fireworks (Li & Tan 2018)",
    ),
    OptimizerEntry(
        "esgrad",
        "gradient",
        "dfo_lora.optim.esgrad:GradientStep",
        ("lr", "normalize", "direction", "reference_dim"),
        "antithetic least-squares gradient estimate, one step of length lr per generation "
        "(lr * sqrt(d / reference_dim) with reference_dim) along the estimate, its sign or "
        "Adam's scaled moments (direction); needs commit: mean",
        commits_best=False,
    ),
)

OPTIMIZERS: dict[str, OptimizerEntry] = {entry.name: entry for entry in _ENTRIES}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
CMA_NAMES: tuple[str, ...] = tuple(n for n, e in OPTIMIZERS.items() if e.family == "cma")
FIREWORKS_NAMES: tuple[str, ...] = tuple(
    n for n, e in OPTIMIZERS.items() if e.family == "fireworks"
)


def optimizer_entry(name) -> OptimizerEntry:
    """The registry entry of `name`; UserError with a did-you-mean for an unknown one."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        hint = did_you_mean(name, OPTIMIZER_NAMES) if isinstance(name, str) else ""
        raise UserError(
            f"optimizer.name: unknown optimizer {name!r}{hint} "
            f"(choices: {', '.join(OPTIMIZER_NAMES)})"
        )
    return OPTIMIZERS[name]


def describe_optimizers(width: int = 88) -> str:
    """Per optimizer: name, what it is, the options it takes (for --help), wrapped."""
    pad = max(map(len, OPTIMIZER_NAMES)) + 4
    return "\n".join(
        textwrap.fill(
            f"{e.help}; options: {', '.join(e.options) or 'none'}",
            width,
            initial_indent=f"  {e.name:<{pad - 2}}",
            subsequent_indent=" " * pad,
        )
        for e in OPTIMIZERS.values()
    )
