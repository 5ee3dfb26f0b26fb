"""Label bias and margin of a finished run: zero-shot, best-dev and final states.

    python experiments/diagnose_bias.py runs/grid/mr-rec-42

For each state and split: accuracy, the fraction predicted as the second label, and the
mean/std of the margin logit[1] - logit[0] (binary tasks). Also the zero-shot accuracy
after subtracting the median train margin (calibration from the 32 train examples only),
and per state the test accuracy with the mean train margin subtracted (what `--calibrate`
does) and with the best threshold chosen on test itself: if tuning had only moved the
bias, the second would not fall.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from dfo_lora.config import load_config
from dfo_lora.search.checkpoint import load_state
from dfo_lora.server.factory import build_server


def main(run: Path) -> None:
    server = build_server(load_config(run / "config.yaml").server_spec())
    states = {
        "zero-shot": np.zeros_like(server.get_state()),
        "best dev": load_file(str(run / "tuned.safetensors"))["z"],
        "final": load_state(run / "checkpoint" / "state.safetensors")["z"],
    }
    print("| state | split | accuracy | predicted label 1 | margin mean | margin std |")
    print("|---|---|---|---|---|---|")
    margins = {}
    for name, z in states.items():
        server.set_state(z)
        for split in ("train", "dev", "test"):
            out = server.predict(split)
            margin = out["logits"][:, 1] - out["logits"][:, 0]
            pred = (margin > 0).astype(int)
            margins[name, split] = (margin, out["labels"])
            print(
                f"| {name} | {split} | {np.mean(pred == out['labels']):.3f} | {pred.mean():.2f} "
                f"| {margin.mean():+.2f} | {margin.std():.2f} |"
            )
    print("\n| state | test acc, train-mean offset | test acc, best threshold on test |")
    print("|---|---|---|")
    for name in states:
        train_margin, _ = margins[name, "train"]
        test_margin, test_labels = margins[name, "test"]
        at_offset = np.mean((test_margin > train_margin.mean()) == test_labels)
        cuts = np.quantile(test_margin, np.linspace(0.01, 0.99, 99))
        best = max(np.mean((test_margin > t) == test_labels) for t in cuts)
        print(f"| {name} | {at_offset:.3f} | {best:.3f} |")
    train_margin, _ = margins["zero-shot", "train"]
    test_margin, test_labels = margins["zero-shot", "test"]
    threshold = float(np.median(train_margin))
    calibrated = np.mean((test_margin > threshold) == test_labels)
    print(
        f"\nzero-shot test accuracy calibrated on train (threshold {threshold:.2f}): {calibrated:.3f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
