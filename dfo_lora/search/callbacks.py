"""What a search reports while it runs: progress bar, JSONL log, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

from dfo_lora.errors import UserError
from dfo_lora.search.checkpoint import atomic_write_bytes


class Callback:
    """Hooks of the layer-wise search; every method is optional."""

    def on_start(self, total_evals: int, done_evals: int) -> None: ...

    def on_generation(self, record: dict) -> None: ...

    def on_dev(self, record: dict) -> None: ...

    def on_end(self, results: dict) -> None: ...


class JsonlLog(Callback):
    """One JSON line per generation (and per dev evaluation) in `log.jsonl`.

    The line count is part of every checkpoint, so a resumed run first cuts the file back
    to that count: lines written after the checkpoint by the killed run disappear.
    """

    def __init__(self, path: Path):
        self.path = path
        self.lines = 0

    def truncate(self, lines: int) -> None:
        """Keep the first `lines` lines (atomically); fewer than that is a damaged log."""
        kept = self.check_holds(lines)[:lines]
        atomic_write_bytes(self.path, "".join(kept).encode())
        self.lines = len(kept)

    def check_holds(self, lines: int) -> list[str]:
        """The log's lines, refused in one line when it has fewer than a checkpoint counts."""
        every = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        if len(every) < lines:
            raise UserError(
                f"{self.path}: {len(every)} lines, but the checkpoint counts {lines}; "
                "the log was cut or replaced, so the run cannot resume (start it again "
                "with --overwrite)"
            )
        return every

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        self.lines += 1

    def on_generation(self, record: dict) -> None:
        self._write({"kind": "generation", **record})

    def on_dev(self, record: dict) -> None:
        self._write({"kind": "dev", **record})


class ProgressBar(Callback):
    """tqdm bar over evaluations: best train loss, best dev metric, evaluations/s."""

    def __init__(self, metric: str, disable: bool = False):
        self.metric = metric
        self.disable = disable
        self.bar = None
        self.best_dev = None

    def on_start(self, total_evals: int, done_evals: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_evals, initial=done_evals, unit="eval", disable=self.disable)

    def on_generation(self, record: dict) -> None:
        self.bar.update(record["popsize"])
        postfix = {"layer": record["layer"], "best_loss": f"{record['best_loss']:.4f}"}
        if self.best_dev is not None:
            postfix[f"best_dev_{self.metric}"] = f"{self.best_dev:.4f}"
        self.bar.set_postfix(postfix, refresh=False)

    def on_dev(self, record: dict) -> None:
        self.best_dev = record["best_dev"][self.metric]

    def on_end(self, results: dict) -> None:
        if self.bar is not None:
            self.bar.close()


class TensorBoard(Callback):
    """Scalars for TensorBoard, when the tensorboard package is installed."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def on_generation(self, record: dict) -> None:
        step = record["evals"]
        self.writer.add_scalar("train/loss_min", record["loss_min"], step)
        self.writer.add_scalar("train/best_loss", record["best_loss"], step)

    def on_dev(self, record: dict) -> None:
        for name, value in record["dev"].items():
            self.writer.add_scalar(f"dev/{name}", value, record["evals"])

    def on_end(self, results: dict) -> None:
        self.writer.close()


def tensorboard_if_available(logdir: Path) -> list[Callback]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return [TensorBoard(logdir)]
