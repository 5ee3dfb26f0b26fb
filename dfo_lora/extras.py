"""Optional dependencies: each behind a call that imports it or fails in one line.

`peft` (the `baselines` extra; `make setup` installs it) is needed by the peft baselines
(gradient-lora, mezo-lora), by `export --format peft` and by `bench`'s peft reference;
nothing else imports it, so the rest of the tool runs without it.
"""

from __future__ import annotations

from dfo_lora.errors import UserError

PEFT_EXTRA = "baselines"  # pip install 'dfo-lora[baselines]'


def require_peft(what: str):
    """The peft module, or a one-line error naming `what` needs it and the extra."""
    try:
        import peft
    except ImportError:
        raise UserError(
            f"{what} needs the peft package: pip install 'dfo-lora[{PEFT_EXTRA}]' "
            "(or pip install peft; make setup installs it)"
        ) from None
    return peft
