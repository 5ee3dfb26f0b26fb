"""Baselines on exactly tune's data, encoding, metric and dev selection.

`dfo-lora baseline METHOD --model ... --task ... --seed ... --out DIR` (or
`run_baseline(method, config, options, out)`), METHOD one of:

- `zero-shot`, `calibrated` (zero_shot.py): the plain prompt and the calibrated zero state;
- `icl` (icl.py): demonstrations per class from train in every prompt;
- `gradient-lora` (gradient_lora.py): peft LoRA + AdamW, dev-selected: the ceiling;
- `mezo-lora` (mezo_lora.py): MeZO zeroth-order SGD on the same LoRA weights;
- `c-lora`, `f-lora` (paper.py): `tune` with the paper's settings.

One registry (registry.py) maps each name to its runner, its options (with defaults and
checks) and its help; the CLI, config files and sweeps read it. common.py holds what the
methods share with tune (server, selection rule, results.json); lora.py the peft layer.
Every run's results.json has tune's keys (`tuned`, `zero_shot`, `evaluations`,
`best_dev_evals`, `wall_time_s`, `peak_mem_bytes`, `versions`, `server`, `notes`, ...)
plus `method`, `options` and `calibrated_zero_shot`.
"""

from dfo_lora.baselines.registry import Method, get_method, methods
from dfo_lora.baselines.run import run_baseline
from dfo_lora.options import Option

__all__ = ["Method", "Option", "get_method", "methods", "run_baseline"]
