"""`c-lora` and `f-lora`: the paper's layer-wise search with the paper's settings.

Both run `tune` itself (any backend the config names) with the settings of the DFO-LoRA
paper (arXiv 2403.01754; the same values as experiments/configs/paper_default.yaml, which a
test compares): LoRA on q and k of every layer, r = 4, d = 500, alpha = sigma = 1,
popsize 20, one generation per visit, bottom-up, commit the best-ever candidate, not
elitist; `c-lora` uses CMA-ES in every layer, `f-lora` the Fireworks Algorithm
(`fwa_variant`, dynFWA by default). Model, task, data, seed, dtype and performance
settings come from the command line or `--config`; the search settings above cannot be
overridden here (use `dfo-lora tune` for other settings). The output folder is tune's,
with `method`, `options` added to results.json and a `baseline.yaml`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dfo_lora.config import TuneConfig, load_config
from dfo_lora.options import Option
from dfo_lora.search.checkpoint import atomic_write_bytes
from dfo_lora.server.losses import LOSSES

PAPER = {
    "space": "lora",
    "targets": ["q", "k"],
    "rank": 4,
    "intrinsic_dim": 500,
    "alpha": 1.0,
    "sigma": 1.0,
    "popsize": 20,
    "layers": "all",
    "generations_per_visit": 1,
    "layer_order": "bottom_up",
    "commit": "best",
    "elitist": False,
    "optimizer_options": {},
}
HELP_C_LORA = "C-LoRA with the paper's settings (q,k, every layer, CMA-ES, alpha = sigma = 1)"
HELP_F_LORA = "F-LoRA with the paper's settings (as c-lora, Fireworks Algorithm per layer)"
OPTIONS = {
    "budget": Option(8000, 'candidate evaluations ("API calls"), the paper: 8000', positive=True),
    "eval_every": Option(100, "evaluations between dev evaluations", positive=True),
    "loss": Option("ce", "loss: " + " | ".join(LOSSES), choices=LOSSES),
    "calibrate": Option(False, "calibrated objective (tune's --calibrate; not the paper's)"),
}
OPTIONS_F_LORA = {
    **OPTIONS,
    "fwa_variant": Option(
        "dynfwa",
        "Fireworks variant: fwa | efwa | dynfwa | bbfwa",
        choices=("fwa", "efwa", "dynfwa", "bbfwa"),
    ),
}


def paper_config(config: TuneConfig, optimizer: str, options: dict) -> TuneConfig:
    """The run's shared settings with the paper's search settings and the method's options."""
    values = {**config.to_dict(), **PAPER, "optimizer": optimizer, **options}
    return load_config(None, values)


def _run(name: str, optimizer: str, config, options, out, overwrite, progress) -> dict:
    from dfo_lora.distributed import run_tune

    results = run_tune(
        paper_config(config, optimizer, options), out, overwrite=overwrite, progress=progress
    )
    results["method"] = name
    results["options"] = dict(options)
    out = Path(out)
    described = {"method": name, "options": dict(options)}
    atomic_write_bytes(out / "baseline.yaml", yaml.safe_dump(described, sort_keys=False).encode())
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode())
    return results


def run_c_lora(config, options, out, overwrite=False, progress=True) -> dict:
    return _run("c-lora", "cma", config, options, out, overwrite, progress)


def run_f_lora(config, options, out, overwrite=False, progress=True) -> dict:
    return _run("f-lora", "fwa", config, options, out, overwrite, progress)
