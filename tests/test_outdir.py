"""A run folder is owned, whole and readable (issue 23): one run per folder (a lock held
for the run's life, a dead holder's taken over), every check before the first write,
--overwrite removes only the tool's own files, and files honour the umask."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from dfo_lora.errors import UserError
from dfo_lora.fileio import create_temp_dir, honour_umask
from dfo_lora.search import outdir
from dfo_lora.search.checkpoint import atomic_write_bytes, save_state
from tests.test_cli import one_line_error, run_cli

TINY_RUN = ["--test-limit", "20", "--popsize", "6", "--intrinsic-dim", "60", "--quiet"]


@pytest.fixture()
def tune_args(tiny_llama_dir):
    return ["tune", "--model", tiny_llama_dir, "--task", "sst2", *TINY_RUN]


def snapshot(folder: Path) -> dict:
    """Every entry under `folder` (links not followed): kind, size, mtime and bytes."""
    found = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        found[str(path.relative_to(folder))] = (
            path.is_symlink(),
            info.st_size,
            info.st_mtime_ns,
            data,
        )
    return found


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dfo_lora.search import outdir
    with outdir.hold(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(600)
    """
)


def start_holder(folder: Path) -> subprocess.Popen:
    """A real child process that holds `folder`'s lock until it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------- the lock
def test_lock_is_held_for_the_block_and_released_however_it_ends(tmp_path):
    out = tmp_path / "a" / "run"
    with outdir.hold(out):
        holder = json.loads((out / outdir.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with outdir.hold(out):  # re-entrant in this thread (a baseline running tune)
            outdir.check_not_held(out)
        assert (out / outdir.LOCK).exists()  # the inner block did not release it
        assert outdir.contents(out) == []  # the lock is no content
        (out / "results.json").write_text("{}")
    assert not (out / outdir.LOCK).exists() and (out / "results.json").exists()
    # a folder the lock created and nothing was written into goes again, its parents too
    with pytest.raises(KeyboardInterrupt):
        with outdir.hold(tmp_path / "b" / "run"):
            assert (tmp_path / "b" / "run" / outdir.LOCK).exists()
            raise KeyboardInterrupt
    assert not (tmp_path / "b").exists()


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = start_holder(out)
    try:
        for attempt in (lambda: outdir.check_not_held(out), lambda: outdir.hold(out).__enter__()):
            with pytest.raises(UserError) as err:
                attempt()
            message = str(err.value)
            assert f"pid {proc.pid} on {socket.gethostname()}" in message and str(out) in message
            assert "\n" not in message
        assert json.loads((out / outdir.LOCK).read_text())["pid"] == proc.pid  # untouched
    finally:
        proc.kill()
        proc.wait()
    assert (out / outdir.LOCK).exists()  # SIGKILL ran no finally: the lock is stale
    outdir.check_not_held(out)
    with outdir.hold(out):
        assert json.loads((out / outdir.LOCK).read_text())["pid"] == os.getpid()
    assert not (out / outdir.LOCK).exists()


def test_a_reused_pid_is_stale_and_another_hosts_lock_is_held(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # our own pid, alive, but started at another time: the lock's process is gone
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": "1"}
    (out / outdir.LOCK).write_text(json.dumps(lock))
    with outdir.hold(out):
        assert json.loads((out / outdir.LOCK).read_text())["process_start"] != "1"
    # another host's process cannot be checked: it counts as alive
    (out / outdir.LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(UserError, match="in use by another run .pid 1 on elsewhere"):
        outdir.check_not_held(out)


def test_second_tune_and_resume_of_a_running_run_exit_2_and_touch_nothing(tmp_path, tune_args):
    """A real tune is frozen (SIGSTOP) mid-search: a second tune on its --out, with
    --overwrite or without, and a --resume, exit 2 naming it and leave the folder as it
    is; the first run, stopped by SIGTERM (handled as Ctrl-C), releases the lock, says how
    to continue and resumes to the end."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "dfo_lora.cli", *map(str, tune_args), "--budget", "720"]
        + ["--eval-every", "30", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint" / "state.safetensors").exists():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(out)
        assert ".lock" in before
        holder = f"pid {first.pid} on {socket.gethostname()}"
        for args in (
            [*tune_args, "--budget", "720", "--eval-every", "30", "--out", out],
            [*tune_args, "--budget", "720", "--eval-every", "30", "--out", out, "--overwrite"],
            ["tune", "--resume", out, "--quiet"],
        ):
            line = one_line_error(run_cli(*args))
            assert "in use by another run" in line and holder in line, line
            assert snapshot(out) == before
        first.send_signal(signal.SIGTERM)  # handled as soon as it runs again
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=120) == 143, first.stderr.read()
        last = first.stderr.read().strip().splitlines()[-1]
        assert last == f"interrupted; continue with: dfo-lora tune --resume {out}", last
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
            first.kill()
            first.wait()
    assert not (out / outdir.LOCK).exists()  # the stop released it
    assert not (out / "results.json").exists()
    resumed = run_cli("tune", "--resume", out, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at " in resumed.stderr and " of 720 evaluations" in resumed.stderr
    assert json.loads((out / "results.json").read_text())["evaluations"] == 720
    assert not (out / outdir.LOCK).exists()


def test_a_folder_holding_only_a_stale_lock_is_empty(tmp_path, tune_args):
    out = tmp_path / "run"
    proc = start_holder(out)
    proc.kill()
    proc.wait()
    assert [p.name for p in out.iterdir()] == [outdir.LOCK]
    done = run_cli(*tune_args, "--budget", "18", "--out", out)  # no --overwrite needed
    assert done.returncode == 0, done.stderr
    assert (out / "results.json").is_file() and not (out / outdir.LOCK).exists()


def test_baseline_refuses_a_held_folder(tmp_path, tiny_llama_dir):
    from tests.test_baselines import cli_args

    out = tmp_path / "run"
    proc = start_holder(out)
    try:
        before = snapshot(out)
        result = run_cli(*cli_args(tiny_llama_dir, "zero-shot", out, "--overwrite"))
        line = one_line_error(result)
        assert f"in use by another run (pid {proc.pid}" in line
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- checks first
def test_layer_and_budget_errors_write_nothing(tmp_path, tune_args):
    """The checks against the loaded model (layers, one round of budget) used to leave
    config.yaml behind, so the corrected run failed with 'exists and is not empty'."""
    out = tmp_path / "run"
    cases = {
        ("--layers", "99", "--budget", "18"): "layers: layer 99 does not exist",
        ("--layers", "top:99", "--budget", "18"): "layers: 'top:99' asks for 99",
        ("--budget", "5"): "budget: 5 is smaller than one round",
    }
    for extra, expected in cases.items():
        line = one_line_error(run_cli(*tune_args, *extra, "--out", out))
        assert expected in line, (extra, line)
        assert not out.exists(), extra
    # the corrected run starts in that folder
    done = run_cli(*tune_args, "--layers", "top:2", "--budget", "12", "--out", out)
    assert done.returncode == 0, done.stderr
    # over a finished run, --overwrite with a bad value leaves the old run as it was
    before = snapshot(out)
    line = one_line_error(run_cli(*tune_args, "--budget", "5", "--out", out, "--overwrite"))
    assert "budget: 5 is smaller" in line
    assert snapshot(out) == before


# ---------------------------------------------------------------------- overwrite
def test_overwrite_removes_only_the_runs_own_files(tmp_path, tune_args):
    out = tmp_path / "run"
    first = run_cli(*tune_args, "--budget", "18", "--out", out)
    assert first.returncode == 0, first.stderr
    (out / ".results.json.1a2b3c").write_text("{")  # a killed write's temporary file
    inode = out.stat().st_ino
    done = run_cli(*tune_args, "--budget", "12", "--layers", "0,1", "--out", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["evaluations"] == 12
    assert not (out / ".results.json.1a2b3c").exists()
    assert out.stat().st_ino == inode  # the folder itself stays (it may be a mount point)
    # a user's file in the folder: --overwrite refuses and keeps everything
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    line = one_line_error(run_cli(*tune_args, "--budget", "18", "--out", out, "--overwrite"))
    assert "notes.txt" in line and "did not write" in line
    assert snapshot(out) == before
    # a symbolic link as --out: nothing is deleted through it
    (out / "notes.txt").unlink()
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    before = snapshot(out)
    line = one_line_error(run_cli(*tune_args, "--budget", "18", "--out", link, "--overwrite"))
    assert "symbolic link" in line and str(link) in line
    assert link.is_symlink() and snapshot(out) == before


def test_baseline_overwrite_keeps_a_users_file(tmp_path, tiny_llama_dir):
    from tests.test_baselines import cli_args

    out = tmp_path / "run"
    assert run_cli(*cli_args(tiny_llama_dir, "zero-shot", out)).returncode == 0
    done = run_cli(*cli_args(tiny_llama_dir, "zero-shot", out, "--overwrite"))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "results.json").read_text())["method"] == "zero-shot"
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    line = one_line_error(run_cli(*cli_args(tiny_llama_dir, "zero-shot", out, "--overwrite")))
    assert "keep.txt" in line and snapshot(out) == before


def test_every_weights_file_a_baseline_writes_is_the_runs_own(tmp_path):
    """gradient and mezo --on weights write parameters.safetensors: --overwrite (and a
    sweep restarting the cell) must clear it like lora.safetensors and z.safetensors."""
    for name in ("lora.safetensors", "z.safetensors", "parameters.safetensors", "results.json"):
        (tmp_path / name).write_bytes(b"x")
    outdir.check_clearable(tmp_path)
    outdir.clear(tmp_path)
    assert outdir.contents(tmp_path) == []


# ---------------------------------------------------------------------- permissions
@pytest.mark.parametrize(
    "umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_written_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        save_state(tmp_path / "checkpoint" / "state.safetensors", {"z": np.zeros(3)})
        staging = create_temp_dir(tmp_path, ".x-")
        save_file({"w": np.ones(2)}, str(staging / "weights.safetensors"))  # makes it 0o600
        honour_umask(staging)  # what export and the model cache do before the rename
        plain = tmp_path / "plain.txt"
        plain.write_text("as open() makes it")
    finally:
        os.umask(old)
    assert plain.stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "checkpoint" / "state.safetensors").stat().st_mode & 0o777 == file_mode
    assert staging.stat().st_mode & 0o777 == dir_mode
    assert (staging / "weights.safetensors").stat().st_mode & 0o777 == file_mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".a.json")) == []


def test_a_runs_files_are_readable_under_umask_022(tmp_path, tune_args):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:  # the child inherits the umask
        done = run_cli(*tune_args, "--budget", "18", "--out", out)
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    for name in ("config.yaml", "results.json", "tuned.safetensors", "log.jsonl"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert (out / "checkpoint" / "state.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_second_sweep_into_a_held_sweep_folder_is_refused(tmp_path, tiny_llama_dir):
    """A sweep holds its folder for its life: another sweep into it is one line, exit 2,
    and neither sweep.jsonl nor a run folder is written."""
    root = tmp_path / "sweep"
    proc = start_holder(root)
    try:
        sweep = tmp_path / "s.yaml"
        sweep.write_text(
            f"out: {root}\ngrid:\n  seed: [1]\n"
            f"config:\n  model: {tiny_llama_dir}\n  backend: local\n  budget: 36\n"
        )
        line = one_line_error(run_cli("sweep", sweep))
        assert f"in use by another run (pid {proc.pid}" in line, line
        assert [p.name for p in root.iterdir()] == [outdir.LOCK]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("content", ["{cut", "[]", '{"metric": "accuracy"}'])
def test_a_sweep_reading_a_damaged_results_file_names_it(tmp_path, tiny_llama_dir, content):
    root = tmp_path / "sweep"
    cell = root / "seed=1"
    cell.mkdir(parents=True)
    (cell / "results.json").write_text(content)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"out: {root}\ngrid:\n  seed: [1]\n"
        f"config:\n  model: {tiny_llama_dir}\n  backend: local\n  budget: 36\n"
    )
    line = one_line_error(run_cli("sweep", sweep))
    assert str(cell / "results.json") in line and "remove it to run that cell again" in line
    assert sorted(p.name for p in root.iterdir()) == ["seed=1"]  # no sweep.jsonl, no lock
