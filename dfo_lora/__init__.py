"""dfo-lora: derivative-free optimization of low-rank adapters with forward passes only.

from dfo_lora import TuneConfig, tune
results = tune(TuneConfig(task="mr", budget=600), out="runs/mr")
model = load_tuned("runs/mr-native")  # after `dfo-lora export runs/mr --format native ...`
"""

from dfo_lora.errors import UserError

__all__ = ["TuneConfig", "UserError", "load_config", "load_tuned", "tune"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import dfo_lora` stays cheap (no torch) until the API is used.
    if name in ("TuneConfig", "load_config"):
        from dfo_lora import config

        return getattr(config, name)
    if name == "tune":  # on the backend the config names (local, or Ray actors)
        from dfo_lora.distributed.run import run_tune

        return run_tune
    if name == "load_tuned":
        from dfo_lora.native import load_tuned

        return load_tuned
    raise AttributeError(name)
