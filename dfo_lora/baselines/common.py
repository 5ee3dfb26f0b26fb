"""What every baseline shares with `tune`: data, server, selection, output folder.

A baseline runs against the same `EvaluationServer` that `tune` builds (`build_server`
from `TuneConfig.server_spec()`, i.e. the same k-shot train/dev/test by seed, template,
verbalizer tokens, truncation, metric and loss functions), and reports through it:
`server.evaluate(split, calibrate=...)` scores dev and test, exactly as `tune` does.

Methods that train (gradient-lora, mezo-lora) also need train logits with autograd on;
`train_logits` runs the server's own buckets through the backbone registry's `embed`,
`run_layer` and `verbalizer_logits` (the forward that `EvaluationServer.predict` runs,
without its inference mode), and `train_loss` applies the server's loss functions
(`server/losses.py`) and, with `calibrate`, its calibration (each state's mean train
logits subtracted, as `EvaluationServer.score` does).

Dev selection is `tune`'s rule (search/loop.py): the state with the best dev metric is
kept, ties go to the lower dev loss, then to the earlier state; the starting state
(step 0) competes. Test is scored once, with the kept state.

The output folder is written only when a method starts writing (after every check has
passed), so bad input leaves nothing behind; `run_baseline` holds its lock for the whole
run (search/outdir.py), and a previous run's files are removed then, never the folder or
anything dfo-lora did not write: `config.yaml` (the TuneConfig of the shared
settings), `baseline.yaml` (method and resolved options), `log.jsonl` (one line per
training step, `kind: generation` like tune's lines, and per dev evaluation),
`results.json` (tune's keys plus `method`, `options`, `calibrated_zero_shot`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from dfo_lora.config import TuneConfig
from dfo_lora.search import outdir
from dfo_lora.search.callbacks import JsonlLog
from dfo_lora.search.checkpoint import atomic_write_bytes
from dfo_lora.search.loop import _better as better_dev  # tune's dev-selection rule
from dfo_lora.search.run import machines_so_far, server_notes, versions
from dfo_lora.server.losses import per_example_loss

SPLITS = ("dev", "test")


@dataclass
class Context:
    """One baseline run: settings, the loaded data, backbone and server, the output folder."""

    method: str
    options: dict
    config: TuneConfig
    spec: object  # ServerSpec the server was built from
    data: object  # FewShotData
    backbone: object  # Backbone
    server: object  # EvaluationServer
    out: Path
    progress: bool = True
    notes: list[str] = field(default_factory=list)
    zero_shot: dict = field(default_factory=dict)
    calibrated_zero_shot: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    # A resumable method's checkpoint being continued (baselines/resume.py), else None.
    resumed: dict | None = None
    # The machines the run has run on, this one last (`machines_so_far`)
    machines: list[dict] = field(default_factory=lambda: machines_so_far(None))
    _log: JsonlLog | None = None

    @property
    def metric(self) -> str:
        return self.server.metric

    def evaluate(self, split: str, calibrate: bool = False, server=None) -> dict:
        return (server or self.server).evaluate(split, calibrate=calibrate)

    def score_prompt(self) -> None:
        """The plain prompt and the calibrated zero state on dev and test."""
        self.zero_shot = {s: self.evaluate(s, calibrate=False) for s in SPLITS}
        self.calibrated_zero_shot = {s: self.evaluate(s, calibrate=True) for s in SPLITS}

    # ------------------------------------------------------------------ output folder
    def open_out(self) -> Path:
        """Start writing the output folder (once): a previous run's files are removed (only
        those: `outdir.clear`), then the run writes into it. A resumed run keeps the folder
        and cuts log.jsonl back to the lines its checkpoint counted."""
        if self._log is None and self.resumed is not None:
            self._log = JsonlLog(self.out / "log.jsonl")
            self._log.truncate(self.resumed["log_lines"])
        if self._log is None:
            self.out.mkdir(parents=True, exist_ok=True)
            outdir.clear(self.out)
            atomic_write_bytes(self.out / "config.yaml", self.config.to_yaml().encode())
            described = {"method": self.method, "options": self.options}
            atomic_write_bytes(
                self.out / "baseline.yaml", yaml.safe_dump(described, sort_keys=False).encode()
            )
            self._log = JsonlLog(self.out / "log.jsonl")
            self._log.truncate(0)
        return self.out

    def resume_from(self, state: dict) -> None:
        """Continue a checkpointed run: its prompt scores and its clock."""
        self.resumed = state
        self.machines = machines_so_far(state)
        self.zero_shot = state["zero_shot"]
        self.calibrated_zero_shot = state["calibrated_zero_shot"]
        self.started = time.perf_counter() - state["elapsed_s"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log_lines(self) -> int:
        self.open_out()
        return self._log.lines

    def log_step(self, record: dict) -> None:
        self.open_out()
        self._log.on_generation(record)

    def log_dev(self, record: dict) -> None:
        self.open_out()
        self._log.on_dev(record)

    def finish(
        self,
        tuned: dict,
        evaluations: int = 0,
        best_dev_evals: int = 0,
        server=None,
        **extra,
    ) -> dict:
        """results.json: tune's keys, plus method, options and calibrated_zero_shot."""
        server = server or self.server
        results = {
            "method": self.method,
            "options": self.options,
            "tuned": tuned,
            "zero_shot": self.zero_shot,
            "calibrated_zero_shot": self.calibrated_zero_shot,
            "best_dev_evals": best_dev_evals,
            "evaluations": evaluations,
            "rounds": None,  # layer-wise search rounds: none in a baseline
            "wall_time_s": self.elapsed(),
            "metric": self.metric,
            "peak_mem_bytes": server.peak_memory(),
            "versions": versions(),
            "machines": self.machines,
            "server": {k: v for k, v in server.info().items() if k != "sigma_hat"},
            "notes": server_notes(self.server) + self.notes,
            **extra,
        }
        out = self.open_out()
        atomic_write_bytes(
            out / "results.json", json.dumps(results, indent=2, sort_keys=True).encode()
        )
        return results


class DevSelection:
    """tune's rule: best dev metric, ties to the lower dev loss, then the earlier state;
    with `last`, every offer is kept (tune's `select: final`: the newest state)."""

    def __init__(self, metric: str, last: bool = False):
        self.metric = metric
        self.last = last
        self.best: dict | None = None
        self.best_evals = 0
        self.best_step = 0
        self.state = None

    def offer(self, dev: dict, evals: int, step: int, state=None) -> bool:
        if not self.last and not better_dev(dev, self.best, self.metric):
            return False
        self.best, self.best_evals, self.best_step, self.state = dev, evals, step, state
        return True


def step_record(
    step: int, loss: float, best_loss: float, accuracy: float, started: float, **extra
) -> dict:
    """The log line of one full-batch training step (`kind: generation`, as tune's)."""
    return {
        "evals": step,
        "step": step,
        "popsize": 1,
        "loss_min": loss,
        "loss_mean": loss,
        "best_loss": best_loss,
        "train_acc_max": accuracy,
        **extra,
        "time_s": time.perf_counter() - started,
    }


def train_logits(server, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Verbalizer logits (N, C) in fp32 and labels (N,) of a split, autograd allowed.

    The same forward as `EvaluationServer.predict` (the server's length buckets, the
    registry's enter / run_layer / verbalizer_logits at each example's slot), in bucket
    order; under `torch.no_grad()` it is a plain forward.
    """
    arch, model = server.arch, server.model
    logits, labels = [], []
    for bucket in server.buckets[split]:
        with server.backbone.compute():  # bf16-mixed: autocast, as the server scores
            hidden, inputs = arch.enter(model, bucket.input_ids, bucket.attention_mask)
            for layer in server.layers:  # (n, T, H)
                hidden = arch.run_layer(layer, hidden, inputs)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            at_slot = hidden[rows, bucket.slots]  # (n, H): only the slot position
            logits.append(arch.verbalizer_logits(model, at_slot, server.verbalizer).float())
        labels.append(bucket.labels)
    return torch.cat(logits), torch.cat(labels)


def train_loss(server, loss: str, calibrate: bool) -> tuple[torch.Tensor, float]:
    """Mean train loss (a scalar tensor) and train accuracy, as the server scores a state."""
    logits, labels = train_logits(server)
    if calibrate:  # each state's own mean train logits removed (EvaluationServer.score)
        logits = logits - logits.mean(0, keepdim=True)
    accuracy = float((logits.argmax(-1) == labels).float().mean())
    return per_example_loss(loss, logits, labels).mean(), accuracy


class ProgressBar:
    """A tqdm bar over training steps with the train loss and the best dev metric."""

    def __init__(self, total: int, metric: str, disable: bool, initial: int = 0):
        from tqdm import tqdm

        self.metric = metric
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=disable)
        self.postfix: dict = {}

    def step(self, loss: float) -> None:
        self.postfix["loss"] = f"{loss:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def dev(self, best: dict) -> None:
        self.postfix[f"best_dev_{self.metric}"] = f"{best[self.metric]:.4f}"

    def close(self) -> None:
        self.bar.close()
