"""File-system faults on real mounts: a read-only file system and a full disk (tmpfs).

Each command that writes (tune, export, plot, sweep) meets the fault as a user would and
must say so in one line (`error: PATH: reason`, exit 2, no traceback) without leaving a
temp file behind. Mounting needs root and a kernel that allows it (the project's
machines do); elsewhere the mount fixture skips these tests.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from dfo_lora import cli
from dfo_lora.search.run import tune
from tests.test_runfiles import cli_error, run_config


def mount_tmpfs(where: Path, options: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return where


@pytest.fixture()
def mounted(tmp_path):
    """mount(name, options) -> a fresh tmpfs under tmp_path, unmounted afterwards."""
    points = []

    def mount(name: str, options: str) -> Path:
        points.append(mount_tmpfs(tmp_path / name, options))
        return points[-1]

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture(scope="module")
def finished_run(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fs") / "run"
    tune(run_config(tiny_llama_dir), out, progress=False)
    return out


def test_read_only_file_system_is_one_line_for_every_writer(
    mounted, finished_run, tiny_llama_dir, capsys
):
    ro = mounted("ro", "ro,size=1m")
    args = ["--model", tiny_llama_dir, "--task", "sst2", "--test-limit", "20", "--quiet"]
    args += ["--popsize", "6", "--intrinsic-dim", "60"]
    line = cli_error(capsys, "tune", *args, "--budget", "36", "--out", ro / "run")
    assert str(ro / "run") in line and "Read-only file system" in line, line
    line = cli_error(capsys, "export", finished_run, "--format", "peft", "--out", ro / "exp")
    assert str(ro) in line and "Read-only" in line, line
    line = cli_error(capsys, "plot", finished_run, "--out", ro / "x.png")
    assert str(ro / "x.png") in line, line
    sweep = finished_run.parent / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "out": str(ro / "sweep"),
                "grid": {"seed": [1]},
                "config": {"model": str(tiny_llama_dir), "budget": 36, "backend": "local"},
            }
        )
    )
    line = cli_error(capsys, "sweep", sweep)
    assert str(ro / "sweep") in line and "Read-only" in line, line
    assert list(ro.iterdir()) == []


def test_full_disk_is_one_line_and_leaves_no_temp_file(mounted, finished_run, capsys):
    full = mounted("full", "size=64k")  # the run's tensors do not fit
    (full / "filler").write_bytes(b"")
    line = cli_error(capsys, "export", finished_run, "--format", "merged", "--out", full / "m")
    assert "No space left on device" in line, line
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no staging folder left


def test_full_disk_mid_tune_is_one_line_and_resumes_elsewhere(
    mounted, tiny_llama_dir, tmp_path, capsys
):
    """The disk fills at the first checkpoint (the optimizers' state does not fit): one
    line; what was written is whole (no temp file); the run can start again elsewhere."""
    full = mounted("small", "size=48k")
    args = ["--model", tiny_llama_dir, "--task", "sst2", "--test-limit", "20", "--quiet"]
    args += ["--popsize", "6", "--intrinsic-dim", "60"]
    line = cli_error(capsys, "tune", *args, "--budget", "36", "--out", full / "run")
    assert "No space left on device" in line, line
    left = sorted(p.relative_to(full).as_posix() for p in full.rglob("*"))
    assert not [name for name in left if Path(name).name.startswith(".")], left  # no temp
    assert cli.main(["tune", *map(str, args), "--budget", "36", "--out", str(tmp_path / "b")]) == 0


def test_export_under_a_file_is_one_line(finished_run, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    line = cli_error(capsys, "export", finished_run, "--format", "native", "--out", blocker / "x")
    assert str(blocker) in line, line
    assert blocker.read_text() == "mine"
