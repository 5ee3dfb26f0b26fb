"""One exception type for bad user input.

Every problem a user can cause (a missing file, a malformed line, a bad config value)
raises `UserError` with a one-line message that names the file, line or field. The CLI
prints it as `error: <message>` and exits with code 2, without a traceback.
"""

import difflib


class UserError(Exception):
    """Bad input from the user; the message is one line and names the cause."""


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """ "; did you mean 'x'?" for the closest choice, or "" when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def check_positive(config, integers: tuple[str, ...] = (), reals: tuple[str, ...] = ()) -> None:
    """The search spaces' shared checks: these fields of `config` must be positive."""
    for name in integers:
        if getattr(config, name) <= 0:
            raise UserError(f"{name}: must be a positive integer, got {getattr(config, name)}")
    for name in reals:
        if not getattr(config, name) > 0:
            raise UserError(f"{name}: must be positive, got {getattr(config, name)}")


def check_targets(targets, example: str = "q,k") -> None:
    """At least one target, none twice."""
    if not targets:
        raise UserError(f"targets: at least one projection is needed (e.g. {example})")
    if len(set(targets)) != len(targets):
        raise UserError(f"targets: duplicate entries in {','.join(targets)}")
