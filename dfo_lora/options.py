"""`Option`: one option of a baseline method or of a run config, declared once.

A baseline's options (`dfo_lora.baselines`) are `Option`s that parse and check their
values; every field of the run config (`TuneConfig`) carries one in its metadata
(`config.opt`), which gives the CLI its help and shown default.
"""

from __future__ import annotations

from dataclasses import dataclass

from dfo_lora.errors import UserError, did_you_mean

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One option of a method or a run: its default, help and what a value must be."""

    default: object
    help: str
    choices: tuple = ()  # allowed values (strings, or list items for list options)
    positive: bool = False  # numbers must be > 0
    minimum: float | None = None  # numbers must be >= this
    shown: str | None = None  # the default as help prints it, where `default` is None

    @property
    def kind(self) -> type:
        return type(self.default)

    def parse(self, method: str, name: str, value):
        """A CLI string or YAML value -> the option's type, or a UserError naming it."""
        where = f"{method}: {name}"
        kind, parsed = self.kind, None
        if kind is bool:
            if isinstance(value, bool):
                parsed = value
            elif isinstance(value, str) and value.lower() in TRUE + FALSE:
                parsed = value.lower() in TRUE
        elif kind in (int, float):
            try:
                if not isinstance(value, bool):
                    number = float(value) if isinstance(value, str) else value
                    if kind is int and float(number).is_integer():
                        parsed = int(number)
                    elif kind is float and isinstance(number, (int, float)):
                        parsed = float(number)
            except (TypeError, ValueError):
                parsed = None
        elif kind is list:
            items = value.split(",") if isinstance(value, str) else value
            if isinstance(items, (list, tuple)):
                parsed = [str(v).strip() for v in items if str(v).strip()]
        elif kind is str and isinstance(value, str):
            parsed = value
        if parsed is None:
            raise UserError(f"{where}: {value!r} is not a valid {kind.__name__}")
        for item in parsed if kind is list else [parsed]:
            if self.choices and item not in self.choices:
                raise UserError(
                    f"{where}: {item!r} is not one of {', '.join(map(str, self.choices))}"
                    + did_you_mean(item, self.choices)
                )
        if kind is list and not parsed:
            raise UserError(f"{where}: needs at least one value")
        if kind in (int, float):
            if self.positive and not parsed > 0:
                raise UserError(f"{where}: must be positive, got {parsed}")
            if self.minimum is not None and parsed < self.minimum:
                raise UserError(f"{where}: must be at least {self.minimum:g}, got {parsed}")
        return parsed


def check_space_values(config) -> None:
    """A space config's values against the `OPTIONS` its class declares (choices, positive),
    each named by its run-config key (the class's `RUN_KEYS` rename fields: hydra's
    `heads` is `hydra_heads`)."""
    cls = type(config)
    renamed = getattr(cls, "RUN_KEYS", {})
    for name, option in cls.OPTIONS.items():
        key, value = renamed.get(name, name), getattr(config, name)
        if option.choices and value not in option.choices:
            raise UserError(
                f"{key}: {value!r} is not one of {', '.join(option.choices)} for the "
                f"{cls.name} space{did_you_mean(str(value), option.choices)}"
            )
        if option.positive and (isinstance(value, bool) or not value > 0):
            kind = "integer" if isinstance(option.default, int) else "number"
            raise UserError(f"{key}: must be a positive {kind}, got {value}")
