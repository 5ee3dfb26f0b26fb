"""Diagnose overfitting: a search whose every dev check also scores test (a fixed subset).

    python experiments/trajectory.py OUT.jsonl --task sst2 --seed 42 [any `tune` option ...]

Writes one JSON line per dev check: evaluations, train loss of the committed state (the
last generation's best), dev and test metric and loss. Test is read here only to study
the search (how far dev selection is from the best test state along the path); a real
run never looks at test before its end.

Each row also holds the committed state `z` (layers x d, when that is at most 4,096
numbers). With `--average-last K[,K2...]` (before the tune options) each row also scores
the mean of the states at the last K checks, this one included (`average`: {K: dev and
test}; tail averaging, as SWA does for SGD: for a space whose delta is linear in z, the
mean of the deltas), without touching the search: the committed state is put back after.

Resumable: the search checkpoints after every layer visit to
`runs/trajectories/<OUT's stem>.safetensors` (`--checkpoint PATH`, before the tune
options, puts it elsewhere, e.g. in a folder that is committed so the trace can continue
in a later session); the same command again continues from it (the rows after the
checkpoint's evaluations are dropped and scored again). Delete the checkpoint to start
afresh.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from dfo_lora.cli import build_parser
from dfo_lora.config import FIELD_TYPES, load_config
from dfo_lora.search.callbacks import Callback
from dfo_lora.search.checkpoint import load_state, save_state
from dfo_lora.search.loop import LayerwiseSearch
from dfo_lora.server.factory import build_server

MAX_STORED_Z = 4096  # numbers of z kept per row


class TestTrace(Callback):
    def __init__(
        self,
        server,
        path: Path,
        upto: int | None = None,
        elapsed_s: float = 0.0,
        average: tuple[int, ...] = (),
    ):
        """Rows go to `path`; resuming at `upto` evaluations keeps only the rows up to it."""
        self.server, self.path, self.train, self.average = server, path, None, average
        self.start = time.perf_counter() - elapsed_s
        kept = []
        if upto is not None and path.is_file():
            kept = [x for x in path.read_text().splitlines() if json.loads(x)["evals"] <= upto]
        path.write_text("".join(x + "\n" for x in kept))
        self.states = [np.asarray(json.loads(x)["z"]) for x in kept] if average else []

    def on_generation(self, record: dict) -> None:
        self.train = record["best_loss"]

    def on_dev(self, record: dict) -> None:
        test = self.server.evaluate("test")
        z = self.server.get_state()
        row = {
            "evals": record["evals"],
            "train": self.train,
            "dev": record["dev"],
            "test": test,
            "z": z.tolist() if z.size <= MAX_STORED_Z else None,
            "wall_s": round(time.perf_counter() - self.start, 1),
        }
        if self.average:
            self.states.append(z)
            row["average"] = {}
            for k in self.average:
                self.server.set_state(np.mean(self.states[-k:], axis=0))
                row["average"][k] = {
                    "dev": self.server.evaluate("dev"),
                    "test": self.server.evaluate("test"),
                }
            self.server.set_state(z)  # the search goes on from its own state
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        averaged = " ".join(
            f"avg{k} {v['test']['accuracy']:.3f}" for k, v in row.get("average", {}).items()
        )
        dev = record["dev"]
        print(
            f"{record['evals']:5d} train {self.train or 0:.3f} dev {dev['accuracy']:.3f}"
            f"/{dev['loss']:.3f} test {test['accuracy']:.3f}/{test['loss']:.3f} {averaged}",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):  # the first argument is OUT.jsonl
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    average, checkpoint = (), Path("runs") / "trajectories" / f"{out.stem}.safetensors"
    while rest[:1] and rest[0] in ("--average-last", "--checkpoint"):
        if rest[0] == "--average-last":
            average = tuple(int(k) for k in rest[1].split(","))
        else:
            checkpoint = Path(rest[1])
        rest = rest[2:]
    args = build_parser().parse_args(["tune", *rest])
    overrides = {k: getattr(args, k) for k in FIELD_TYPES if getattr(args, k, None) is not None}
    config = load_config(args.config, overrides)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = load_state(checkpoint, config) if checkpoint.is_file() else None
    server = build_server(config.server_spec())
    metric = server.info()["metric"]
    if state is None:
        trace = TestTrace(server, out, average=average)
    else:
        upto, elapsed = state["position"]["evals"], state["elapsed_s"]
        trace = TestTrace(server, out, upto, elapsed, average=average)
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
