"""`dfo-lora plot`: a PNG from real run folders, one-line errors for bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from dfo_lora.config import TuneConfig
from dfo_lora.errors import UserError
from dfo_lora.plot import plot_runs, read_run_log
from dfo_lora.search import tune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfo_lora.cli", *map(str, args)], capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    config = TuneConfig(
        model=str(tiny_llama_dir),
        task="sst2",
        test_limit=20,
        popsize=6,
        budget=36,  # 2 rounds over 3 layers
        eval_every=12,
        intrinsic_dim=60,
        dtype="fp32",
    ).validate()
    out = tmp_path_factory.mktemp("plot") / "sst2-cma"
    tune(config, out, progress=False)
    return out


def test_plot_of_two_runs_is_a_png(tiny_run, tmp_path):
    other = tmp_path / "sst2-copy"
    shutil.copytree(tiny_run, other)
    log = read_run_log(tiny_run)
    assert log.label == "sst2-cma" and log.metric == "accuracy"
    assert log.train_evals == [6 * i for i in range(1, 7)]  # one point per generation
    assert log.dev_evals[0] == 0 and len(log.dev_evals) == len(log.dev_metric) >= 3

    out = tmp_path / "figs" / "progress.png"
    done = cli("plot", tiny_run, other, "--out", out)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert not list(out.parent.glob(".*.tmp"))


def test_bad_input_is_one_line_naming_file_and_line(tiny_run, tmp_path):
    def one_line_error(*args) -> str:
        done = cli("plot", *args, "--out", tmp_path / "x.png")
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: plot: "), done.stderr
        return lines[0]

    assert "is not a folder" in one_line_error(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty / 'log.jsonl'} does not exist" in one_line_error(tiny_run, empty)

    bad = tmp_path / "bad"
    shutil.copytree(tiny_run, bad)
    lines = (bad / "log.jsonl").read_text().splitlines()
    for text, message in [
        ("{not json", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: expected a JSON object with 'kind' and 'evals'"),
        ('{"kind": "generation", "evals": "six"}', "line 3: evals: 'six' is not a number"),
        ('{"kind": "dev", "evals": 6, "dev": 0.5}', "line 3: 'dev' is not a mapping"),
    ]:
        (bad / "log.jsonl").write_text("\n".join([*lines[:2], text, *lines[3:]]) + "\n")
        line = one_line_error(bad)
        assert str(bad / "log.jsonl") in line and message in line, line
    assert not (tmp_path / "x.png").exists()  # nothing written for bad input
    (bad / "log.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no generation or dev lines"):
        plot_runs([bad], tmp_path / "x.png")
