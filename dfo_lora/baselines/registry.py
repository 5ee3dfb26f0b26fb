"""The one registry of baselines: method name -> (runner, allowed options, help).

`dfo-lora baseline`'s parser and help, the `baseline:` mapping of a `--config` file or a
sweep, and `run_baseline` all read `METHODS`; a method's options are declared once, in
its own module, as `Option`s (`dfo_lora.options`, the type the run config's fields
carry too). A value is checked (type, choices, positive) by the
option itself, with a message that names the method and the option.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.options import Option


@dataclass(frozen=True)
class Method:
    """A baseline: how it runs, which options it takes and one line of help.

    `run(context) -> results` for methods that run against the prepared evaluation server
    (see common.py); `uses_tune` methods run `tune` themselves and get
    `run(config, options, out, overwrite, progress)`.
    """

    name: str
    run: Callable
    help: str
    options: dict[str, Option] = field(default_factory=dict)
    uses_tune: bool = False
    needs_peft: bool = False
    # Trains the run's own search space (any space), so the server holds that space;
    # the others adapt the plain model and get a LoRA-space server (peft's projections).
    own_space: bool = False
    # Writes checkpoint/state.safetensors as it trains, so `--resume` continues it.
    resumable: bool = False

    def resolve(self, given: dict | None) -> dict:
        """Defaults <- given values (CLI strings or YAML values), each checked."""
        values = {name: opt.default for name, opt in self.options.items()}
        for name, value in (given or {}).items():
            key = str(name).replace("-", "_")
            if key not in self.options:
                takes = ", ".join(self.options) or "no options"
                raise UserError(
                    f"{self.name}: unknown option {name!r} (it takes {takes})"
                    + did_you_mean(key, self.options)
                )
            values[key] = self.options[key].parse(self.name, key, value)
        return values


def _build() -> dict[str, Method]:
    from dfo_lora.baselines import (
        gradient,
        gradient_lora,
        icl,
        mezo,
        mezo_lora,
        paper,
        subspace_gradient,
        zero_shot,
    )

    methods = [
        Method("zero-shot", zero_shot.run_zero_shot, zero_shot.HELP_ZERO_SHOT),
        Method("calibrated", zero_shot.run_calibrated, zero_shot.HELP_CALIBRATED),
        Method("icl", icl.run, icl.HELP, icl.OPTIONS),
        Method(
            "gradient-lora",
            gradient_lora.run,
            gradient_lora.HELP,
            gradient_lora.OPTIONS,
            needs_peft=True,
        ),
        Method("gradient", gradient.run, gradient.HELP, gradient.OPTIONS, own_space=True),
        Method(
            "subspace-gradient",
            subspace_gradient.run,
            subspace_gradient.HELP,
            subspace_gradient.OPTIONS,
            own_space=True,
        ),
        Method(
            "mezo-lora",
            mezo_lora.run,
            mezo_lora.HELP,
            mezo_lora.OPTIONS,
            needs_peft=True,
            resumable=True,
        ),
        Method("mezo", mezo.run, mezo.HELP, mezo.OPTIONS, own_space=True, resumable=True),
        Method("c-lora", paper.run_c_lora, paper.HELP_C_LORA, paper.OPTIONS, uses_tune=True),
        Method("f-lora", paper.run_f_lora, paper.HELP_F_LORA, paper.OPTIONS_F_LORA, uses_tune=True),
    ]
    return {m.name: m for m in methods}


_METHODS: dict[str, Method] = {}


def methods() -> dict[str, Method]:
    """name -> Method, in the order of `dfo-lora baseline --help`."""
    if not _METHODS:
        _METHODS.update(_build())
    return _METHODS


def get_method(name: str) -> Method:
    table = methods()
    if name not in table:
        raise UserError(
            f"baseline: unknown method {name!r} (methods: {', '.join(table)})"
            + did_you_mean(name, table)
        )
    return table[name]


def all_options() -> dict[str, list[tuple[str, Option]]]:
    """option name -> [(method, Option)], for one CLI flag per option name."""
    table: dict[str, list[tuple[str, Option]]] = {}
    for method in methods().values():
        for name, opt in method.options.items():
            table.setdefault(name, []).append((method.name, opt))
    return table


def describe_methods() -> str:
    """The methods, their help and options with defaults (the CLI epilog, README)."""
    lines = []
    for method in methods().values():
        lines.append(f"  {method.name:14s} {method.help}")
        for name, opt in method.options.items():
            default = ",".join(opt.default) if isinstance(opt.default, list) else opt.default
            lines.append(f"      --{name.replace('_', '-')} (default {default}): {opt.help}")
    return "\n".join(lines)


def options_by_method(mapping, where: str = "") -> dict[str, dict]:
    """A `baseline:` mapping (method -> its options) from a config or sweep file, checked."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise UserError(
            f"{where}baseline: expected a mapping of method -> options, got {type(mapping).__name__}"
        )
    checked = {}
    for name, given in mapping.items():
        try:
            method = get_method(str(name))
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        if given is None:
            given = {}
        if not isinstance(given, dict):
            raise UserError(
                f"{where}baseline: {name}: expected a mapping of options, got {type(given).__name__}"
            )
        try:
            method.resolve(given)
        except UserError as exc:
            raise UserError(f"{where}baseline: {exc}") from None
        checked[method.name] = dict(given)
    return checked
