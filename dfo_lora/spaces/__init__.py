"""The search spaces, behind one interface (`SearchSpace`, see base.py) and one registry.

    lora      the paper's space: z -> LoRA factors (A, B) per adapted projection
    hydra     HydraLoRA: a shared A, N heads B_i and a per-token router per projection
    series    bottleneck adapters after residual-writing projections (o, MLP output)
    parallel  a bottleneck adapter beside each layer's MLP
    bitfit    a bias shift on the output of each target projection (BitFit)
    prompt    prompt tokens in front, their input shifted (BBT)
    deep-prompt  the same prompt, shifted at every layer's input (BBTv2)

Each space lives in its own folder (`<name>/`: config, layer, model); what they share is
in `base.py` (the interface), `statistics.py`, `projection.py` and `modules.py`.

A space is chosen by its config's type (`space_class`); `space_config` builds the config
of a space by name from the run's values, so the server, the run config and the CLI only
know this registry.
"""

from __future__ import annotations

import dataclasses

from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.options import Option
from dfo_lora.spaces.adapters import ParallelConfig, ParallelSpace, SeriesConfig, SeriesSpace
from dfo_lora.spaces.base import LayerModules, SearchSpace, Weights, take
from dfo_lora.spaces.bitfit import BitfitConfig, BitfitSpace
from dfo_lora.spaces.hydra import HydraConfig, HydraSpace
from dfo_lora.spaces.lora import LoraConfig, LoraSpace
from dfo_lora.spaces.modules import unwrap_all
from dfo_lora.spaces.projection import ProjectedSpace
from dfo_lora.spaces.prompt import DeepPromptConfig, DeepPromptSpace, PromptConfig, PromptSpace
from dfo_lora.spaces.statistics import SpaceStatistics, StatisticsRequest

# name -> (config class, space class)
SPACES: dict[str, tuple[type, type[SearchSpace]]] = {
    "lora": (LoraConfig, LoraSpace),
    "hydra": (HydraConfig, HydraSpace),
    "series": (SeriesConfig, SeriesSpace),
    "parallel": (ParallelConfig, ParallelSpace),
    "bitfit": (BitfitConfig, BitfitSpace),
    "prompt": (PromptConfig, PromptSpace),
    "deep-prompt": (DeepPromptConfig, DeepPromptSpace),
}
SPACE_NAMES = tuple(SPACES)


def check_space_name(name: str) -> None:
    if name not in SPACES:
        raise UserError(
            f"space: {name!r} is not one of {', '.join(SPACES)}{did_you_mean(name, SPACES)}"
        )


def space_class(config) -> type[SearchSpace]:
    """The space class of a space config (LoraConfig -> LoraSpace, ...)."""
    for config_class, cls in SPACES.values():
        if type(config) is config_class:
            return cls
    raise UserError(f"space: unknown space config {type(config).__name__}")


def space_name(config) -> str:
    return space_class(config).name


def run_keys(config_class: type) -> dict[str, str]:
    """A space config's fields -> the run config's keys that set them (the same name unless
    the class's `RUN_KEYS` renames it: hydra's `heads` is the run's `hydra_heads`)."""
    renamed = getattr(config_class, "RUN_KEYS", {})
    return {f.name: renamed.get(f.name, f.name) for f in dataclasses.fields(config_class)}


def space_config(name: str, run):
    """The config of space `name` from a run's values (`run`: any object with the run
    config's keys as attributes, e.g. a TuneConfig). A value of None keeps the space's
    own default (targets not given: lora's q,k, series' residual writers); lists become
    tuples."""
    check_space_name(name)
    config_class = SPACES[name][0]
    values = {}
    for field_name, key in run_keys(config_class).items():
        value = getattr(run, key)
        if value is not None:
            values[field_name] = tuple(value) if isinstance(value, list) else value
    return config_class(**values)


def space_options(key: str) -> dict[str, Option]:
    """A run-config key that only some spaces read -> each of those spaces' declaration of
    it (`OPTIONS` of its config class: help, choices, the space's own default)."""
    declared = {}
    for name in option_users()[key]:
        config_class = SPACES[name][0]
        field = next(f for f, k in run_keys(config_class).items() if k == key)
        declared[name] = config_class.OPTIONS[field]
    return declared


def _declared_help(key: str) -> dict[tuple[str, str], list[str]]:
    """(help, shown default) -> the spaces that declare a space option so."""
    entries: dict[tuple[str, str], list[str]] = {}
    for name, option in space_options(key).items():
        default = option.shown if option.shown is not None else option.default
        if isinstance(default, tuple):
            default = ",".join(default)
        entries.setdefault((option.help, str(default)), []).append(name)
    return entries


def options_alike(key: str) -> bool:
    """Whether every space that reads `key` declares it with the same help and default."""
    return len(_declared_help(key)) == 1


def option_help(key: str) -> str:
    """The help of a space option, from the spaces that read it: their shared help where
    they declare it alike, else "lora: ... [its default]; series: ... [its default]"."""
    entries = _declared_help(key)
    if len(entries) == 1:
        return next(iter(entries))[0]
    return "; ".join(
        f"{', '.join(names)}: {help_text} [{default}]"
        for (help_text, default), names in entries.items()
    )


def option_users() -> dict[str, tuple[str, ...]]:
    """Run-config keys that only some spaces read -> those spaces, in registry order (a run
    of another space must leave the key at its default)."""
    users: dict[str, list[str]] = {}
    for name, (config_class, _) in SPACES.items():
        for key in run_keys(config_class).values():
            users.setdefault(key, []).append(name)
    return {key: tuple(names) for key, names in users.items() if len(names) < len(SPACES)}


__all__ = [
    "SPACES",
    "SPACE_NAMES",
    "BitfitConfig",
    "BitfitSpace",
    "DeepPromptConfig",
    "DeepPromptSpace",
    "PromptConfig",
    "PromptSpace",
    "HydraConfig",
    "HydraSpace",
    "LayerModules",
    "LoraConfig",
    "LoraSpace",
    "ParallelConfig",
    "ParallelSpace",
    "ProjectedSpace",
    "SearchSpace",
    "SeriesConfig",
    "SeriesSpace",
    "SpaceStatistics",
    "StatisticsRequest",
    "Weights",
    "check_space_name",
    "space_class",
    "option_help",
    "options_alike",
    "option_users",
    "run_keys",
    "space_config",
    "space_name",
    "space_options",
    "take",
    "unwrap_all",
]
