"""Diagnose overfitting: a search whose every dev check also scores test (a fixed subset).

    python experiments/trajectory.py OUT.jsonl --task sst2 --seed 42 [any `tune` option ...]

Writes one JSON line per dev check: evaluations, train loss of the committed state (the
last generation's best), dev and test metric and loss. Test is read here only to study
the search (how far dev selection is from the best test state along the path); a real
run never looks at test before its end.

Resumable: the search checkpoints after every layer visit to
`runs/trajectories/<OUT's stem>.safetensors`; the same command again continues from it
(the rows after the checkpoint's evaluations are dropped and scored again), so a long
trace can span sessions. Delete the checkpoint to start afresh.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dfo_lora.cli import build_parser
from dfo_lora.config import FIELD_TYPES, load_config
from dfo_lora.search.callbacks import Callback
from dfo_lora.search.checkpoint import load_state, save_state
from dfo_lora.search.loop import LayerwiseSearch
from dfo_lora.server.factory import build_server


class TestTrace(Callback):
    def __init__(self, server, path: Path, upto: int | None = None, elapsed_s: float = 0.0):
        """Rows go to `path`; resuming at `upto` evaluations keeps only the rows up to it."""
        self.server, self.path, self.train = server, path, None
        self.start = time.perf_counter() - elapsed_s
        kept = []
        if upto is not None and path.is_file():
            kept = [x for x in path.read_text().splitlines() if json.loads(x)["evals"] <= upto]
        path.write_text("".join(x + "\n" for x in kept))

    def on_generation(self, record: dict) -> None:
        self.train = record["best_loss"]

    def on_dev(self, record: dict) -> None:
        test = self.server.evaluate("test")
        row = {
            "evals": record["evals"],
            "train": self.train,
            "dev": record["dev"],
            "test": test,
            "wall_s": round(time.perf_counter() - self.start, 1),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            f"{record['evals']:5d} train {self.train or 0:.3f} dev {record['dev']['accuracy']:.3f}"
            f"/{record['dev']['loss']:.3f} test {test['accuracy']:.3f}/{test['loss']:.3f}",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):  # the first argument is OUT.jsonl
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    out = Path(sys.argv[1])
    args = build_parser().parse_args(["tune", *sys.argv[2:]])
    overrides = {k: getattr(args, k) for k in FIELD_TYPES if getattr(args, k, None) is not None}
    config = load_config(args.config, overrides)
    checkpoint = Path("runs") / "trajectories" / f"{out.stem}.safetensors"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = load_state(checkpoint, config) if checkpoint.is_file() else None
    server = build_server(config.server_spec())
    metric = server.info()["metric"]
    if state is None:
        trace = TestTrace(server, out)
    else:
        trace = TestTrace(server, out, state["position"]["evals"], state["elapsed_s"])
    search = LayerwiseSearch(
        server, config, metric, callbacks=[trace], checkpoint=lambda s: save_state(checkpoint, s)
    )
    if state is not None:
        search.load_state_dict(state)
        print(f"resuming at {search.position.evals} evaluations", flush=True)
    results = search.run()
    print(json.dumps({"tuned": results["tuned"], "zero_shot": results["zero_shot"]}))


if __name__ == "__main__":
    main()
