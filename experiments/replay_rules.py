"""Which state each selection rule keeps along a trajectory (experiments/trajectory.py rows).

    python experiments/replay_rules.py TRACE.jsonl [MORE.jsonl ...]

Every row of a trace is a dev check that also scored test, so a rule's pick can be read
off without new runs. For each trace it prints the test accuracy of: the zero state; the
last state (`select: final` at the trace's budget); the best dev metric (`metric`, ties
by dev loss, earlier first: the search's own rule); the lowest dev loss (`loss`); and
the best test among the checks (what no rule can know). Each pick says at how many
evaluations it was made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def picks(rows: list[dict]) -> dict[str, dict]:
    """The row each rule keeps (ties go to the earlier check, as the search's rule does)."""

    def first_best(key) -> dict:
        return min(enumerate(rows), key=lambda item: (key(item[1]), item[0]))[1]

    return {
        "zero": rows[0],
        "final": rows[-1],
        "metric": first_best(lambda r: (-r["dev"]["accuracy"], r["dev"]["loss"])),
        "loss": first_best(lambda r: r["dev"]["loss"]),
        "best test": first_best(lambda r: -r["test"]["accuracy"]),
    }


def main() -> None:
    for name in sys.argv[1:]:
        rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
        chosen = picks(rows)
        cells = "  ".join(
            f"{rule} {row['test']['accuracy'] * 100:.1f} (@{row['evals']})"
            for rule, row in chosen.items()
        )
        print(f"{Path(name).stem}: {cells}")


if __name__ == "__main__":
    main()
