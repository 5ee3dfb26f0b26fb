"""`dfo-lora plot`: the figure and file from real and fake run folders (the format by
--out's suffix, title, zero-shot lines, a row per task), one-line errors for bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from dfo_lora.config import TuneConfig
from dfo_lora.errors import UserError
from dfo_lora.plot import build_figure, plot_runs, read_run_log
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
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary file left


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


def write_run(
    folder: Path,
    task: str = "sst2",
    model: str = "/models/tiny-llama",
    zero: float = 0.5,
    calibrated: float | None = 0.625,
    calibrate: bool = False,
    finished: bool = True,
) -> Path:
    """A fake run folder (config.yaml, log.jsonl, results.json when `finished`) with the
    keys search/run.py writes, so the plot's reading is tested without a tune."""
    folder.mkdir(parents=True)
    config = {"model": model, "task": task, "calibrate": calibrate}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {"kind": "dev", "evals": 0, "dev": {"accuracy": zero, "loss": 0.7}},
        {"kind": "generation", "evals": 6, "loss_min": 0.69},
        {"kind": "generation", "evals": 12, "loss_min": 0.65},
        {"kind": "dev", "evals": 12, "dev": {"accuracy": zero + 0.1, "loss": 0.6}},
    ]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        zero_shot = {split: {"accuracy": zero, "loss": 0.7} for split in ("dev", "test")}
        results = {"metric": "accuracy", "zero_shot": zero_shot, "tuned": {}}
        if calibrated is not None:
            results["calibrated_zero_shot"] = {
                split: {"accuracy": calibrated, "loss": 0.68} for split in ("dev", "test")
            }
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def references(ax) -> dict[str, float]:
    """The dev panel's horizontal reference lines: label -> y."""
    found = {}
    for line in ax.get_lines():
        y = list(line.get_ydata())
        if ": " in line.get_label() and len(y) == 2 and y[0] == y[1]:
            found[line.get_label()] = float(y[0])
    return found


def test_real_run_title_and_zero_shot_line(tiny_run, tiny_llama_dir):
    results = json.loads((tiny_run / "results.json").read_text())
    fig = build_figure([read_run_log(tiny_run)])
    assert fig.get_suptitle() == f"task sst2, model {tiny_llama_dir.name}"
    train_ax, dev_ax = fig.axes
    assert references(dev_ax) == {
        "sst2-cma: zero-shot": results["zero_shot"]["dev"]["accuracy"],
        "sst2-cma: calibrated zero-shot": results["calibrated_zero_shot"]["dev"]["accuracy"],
    }


@pytest.mark.parametrize(
    ("name", "check"),
    [
        ("fig.jpg", lambda data: data.startswith(b"\xff\xd8\xff")),
        ("fig.JPEG", lambda data: data.startswith(b"\xff\xd8\xff")),
        ("fig.pdf", lambda data: data.startswith(b"%PDF-")),
        ("fig.png", lambda data: data.startswith(PNG_SIGNATURE)),
        ("fig.svg", lambda data: ElementTree.fromstring(data).tag.endswith("svg")),
    ],
)
def test_out_suffix_names_the_format(tmp_path, name, check):
    run = write_run(tmp_path / "run")
    out = plot_runs([run], tmp_path / "figs" / name)
    assert out == tmp_path / "figs" / name
    assert check(out.read_bytes())
    assert [p.name for p in out.parent.iterdir()] == [name]  # no temporary file left


@pytest.mark.parametrize("name", ["fig.gif", "fig.png.bak", "fig"])
def test_unsupported_suffix_is_refused_before_writing(tmp_path, name):
    run = write_run(tmp_path / "run")
    out = tmp_path / "figs" / name
    with pytest.raises(UserError, match=r"use one of \.png, \.pdf, \.svg, \.jpg, \.jpeg") as e:
        plot_runs([run], out)
    assert str(out) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "figs").exists()


def test_calibrated_reference_lines(tmp_path):
    plain = write_run(tmp_path / "plain", zero=0.5, calibrated=0.625)
    calibrated = write_run(tmp_path / "cal", zero=0.75, calibrated=0.75, calibrate=True)
    running = write_run(tmp_path / "running", zero=0.25, finished=False)
    old = write_run(tmp_path / "old", zero=0.375, calibrated=None)  # no calibrated_zero_shot
    logs = [read_run_log(r) for r in (plain, calibrated, running, old)]
    assert [log.references for log in logs] == [
        [("zero-shot", 0.5), ("calibrated zero-shot", 0.625)],
        [("calibrated zero-shot", 0.75)],  # --calibrate: zero_shot is the calibrated state
        [],  # still running: no results.json, no reference line
        [("zero-shot", 0.375)],
    ]
    (_, dev_ax) = build_figure(logs).axes
    assert references(dev_ax) == {
        "plain: zero-shot": 0.5,
        "plain: calibrated zero-shot": 0.625,
        "cal: calibrated zero-shot": 0.75,
        "old: zero-shot": 0.375,
    }
    lines = {line.get_label(): line for line in dev_ax.get_lines()}
    assert lines["plain: zero-shot"].get_color() == lines["plain"].get_color()


def test_two_tasks_get_two_rows(tmp_path):
    sst2 = write_run(tmp_path / "a", task="sst2", model="smollm2-135m", zero=0.5)
    trec = write_run(tmp_path / "b", task="trec", model="/m/tiny-llama", zero=0.25)
    sst2_b = write_run(tmp_path / "c", task="sst2", model="/m/tiny-llama", zero=0.625)
    fig = build_figure([read_run_log(r) for r in (sst2, trec, sst2_b)])
    assert fig.get_suptitle() == (
        "task sst2, models smollm2-135m, tiny-llama; task trec, model tiny-llama"
    )
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "sst2: best candidate of each generation",
        "sst2: dev",
        "trec: best candidate of each generation",
        "trec: dev",
    ]
    _, sst2_dev, trec_train, trec_dev = fig.axes
    assert sst2_dev.get_legend_handles_labels()[1] == [
        "a",
        "a: zero-shot",
        "a: calibrated zero-shot",
        "c",
        "c: zero-shot",
        "c: calibrated zero-shot",
    ]
    assert references(trec_dev) == {"b: zero-shot": 0.25, "b: calibrated zero-shot": 0.625}
    assert [line.get_label() for line in trec_train.get_lines()] == ["b"]
    out = plot_runs([sst2, trec, sst2_b], tmp_path / "tasks.png")
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_out_under_a_file_is_one_line(tmp_path):
    run = write_run(tmp_path / "run")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder\n")
    for out in (blocker / "x.png", blocker / "sub" / "x.png"):
        done = cli("plot", run, "--out", out)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines == [f"error: plot: cannot write {out}: {blocker} is a file, not a folder"]
    assert blocker.read_text() == "a file, not a folder\n"
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'dir.png'}: it is a folder"):
        plot_runs([run], tmp_path / "dir.png")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_folder_is_one_line(tmp_path):
    run = write_run(tmp_path / "run")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"cannot write {folder / 'x.png'}: .* not writable"):
            plot_runs([run], folder / "x.png")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails midway (a full disk at fsync) is a one-line UserError, and
    neither the temporary file nor the target is left behind."""
    run = write_run(tmp_path / "run")
    out = tmp_path / "figs" / "x.png"
    out.parent.mkdir()

    def full_disk(fd: int) -> None:
        assert any(out.parent.iterdir())  # the temporary file exists and was written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError) as e:
        plot_runs([run], out)
    assert str(e.value) == f"plot: cannot write {out}: {os.strerror(errno.ENOSPC)}"
    assert list(out.parent.iterdir()) == []
