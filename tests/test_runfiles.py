"""Every file of a run is checked when read back, and every write of a run is whole (issue
23): a truncated, replaced, NaN-filled or edited tuned.safetensors, checkpoint or native
export is one line naming the file (and the tensor or field), exit 2, for every reader;
a write that fails midway leaves the old file or the new one, never a partial one, and
`dfo-lora tune --resume` then finishes the run as if nothing had happened; `dfo-lora
eval` takes the test subset, the base model, the device and the dtype again."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

import dfo_lora
from dfo_lora import cli
from dfo_lora.errors import UserError
from dfo_lora.export import export_run
from dfo_lora.native import MANIFEST, WEIGHTS
from dfo_lora.search import checkpoint
from dfo_lora.search.checkpoint import load_state, read_safetensors
from dfo_lora.search.run import CHECKPOINT, UNRECORDED, hardware, tune
from dfo_lora.search.tuned import load_tuned
from tests.test_search import tiny_config

RUN_FILES = ("config.yaml", "results.json", "tuned.safetensors", "log.jsonl")


def run_config(model_dir):
    """Two rounds over the tiny Llama's 3 layers: 6 checkpoints; the last state is kept
    (a changed state for certain), in fp32 so that a resumed run matches bit for bit."""
    return tiny_config(model_dir, budget=36, select="final", dtype="fp32", test_limit=20)


@pytest.fixture(scope="module")
def finished(tiny_llama_dir, tmp_path_factory):
    """One whole run, never changed: the reference of every resumed run, and what the
    tampering tests copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    results = tune(run_config(tiny_llama_dir), out, progress=False)
    return out, results


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def cli_error(capsys, *argv) -> str:
    """`dfo-lora ARGV` in this process: exit 2, one line `error: ...` on stderr, no traceback."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})


def rewrite(path: Path, change=None, meta_change=None) -> None:
    """Rewrite a safetensors file with its tensors and metadata changed in place."""
    tensors, meta = load_file(str(path)), metadata(path)
    if change:
        change(tensors)
    if meta_change:
        meta_change(meta)
    save_file(tensors, str(path), metadata=meta)


def edit_config_metadata(**values):
    def change(meta: dict) -> None:
        config = yaml.safe_load(meta["config"])
        config.update(values)
        meta["config"] = yaml.safe_dump(config, sort_keys=False)

    return change


def set_value(key: str, index=(0, 0), value=np.nan):
    """Set one entry of one tensor (of a safetensors file's tensors, or a state's)."""

    def change(tensors: dict) -> None:
        tensors[key] = tensors[key].copy()
        tensors[key][index] = value

    return change


# ------------------------------------------------------------------ tuned.safetensors

TAMPERED_TUNED = {
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[:-100]),
        ["tuned.safetensors: not a readable safetensors file (", "--resume"],
    ),
    "text": (
        lambda p: p.write_text("this is not a tensor file\n"),
        ["tuned.safetensors: not a readable safetensors file ("],
    ),
    "missing": (lambda p: p.unlink(), ["tuned.safetensors does not exist"]),
    "z nan": (lambda p: rewrite(p, set_value("z")), ["tensor 'z' holds NaN (1 of "]),
    "factor inf": (
        lambda p: rewrite(p, set_value("best.0.q.A", (1, 2), np.inf)),
        ["tensor 'best.0.q.A' holds inf"],
    ),
    "metadata rank 9": (
        lambda p: rewrite(p, meta_change=edit_config_metadata(rank=9)),
        ["config metadata differs from", "config.yaml in rank (9 vs 4)"],
    ),
    "model edited in config.yaml": (
        lambda p: (p.parent / "config.yaml").write_text(
            yaml.safe_dump({**yaml.safe_load((p.parent / "config.yaml").read_text()), "model": "m"})
        ),
        ["config metadata differs from", "in model (", "vs 'm')", "eval takes --model"],
    ),
    "z wrong width": (
        lambda p: rewrite(p, lambda t: t.__setitem__("z", t["z"][:, :7].copy())),
        ["tensor 'z' has shape (3, 7), expected (3, 60) (intrinsic_dim in"],
    ),
    "a factor missing": (
        lambda p: rewrite(p, lambda t: t.pop("final.1.k.B")),
        ["final.1.k has no B tensor"],
    ),
    "a layer's weights missing": (
        lambda p: rewrite(
            p, lambda t: [t.pop(k) for k in [k for k in t if k.startswith("best.2.")]]
        ),
        ["z changes layers [0, 1, 2] but the best weights are for layers [0, 1]"],
    ),
    "another target": (
        lambda p: rewrite(p, lambda t: t.__setitem__("best.0.o.A", t["best.0.q.A"])),
        ["tensor 'best.0.o.A' adapts 'o', not one of q,k"],
    ),
}


@pytest.mark.parametrize("case", list(TAMPERED_TUNED))
def test_a_tampered_tuned_file_is_one_line_for_eval_and_export(finished, tmp_path, capsys, case):
    tamper, expected = TAMPERED_TUNED[case]
    run = copy_run(finished[0], tmp_path / "run")
    tamper(run / "tuned.safetensors")
    out = tmp_path / "export"
    for argv in (
        ["eval", run],
        ["export", run, "--format", "peft", "--out", out],
        ["export", run, "--format", "native", "--out", out],
    ):
        line = cli_error(capsys, *argv)
        for text in expected:
            assert text in line, (argv[0], line)
        assert str(run) in line  # the file is named with its folder
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ex")]


def test_a_rank_edited_in_both_files_is_a_shape_error(finished, tmp_path, capsys):
    """config.yaml and the metadata agree on rank 9, but the factors are rank 4."""
    run = copy_run(finished[0], tmp_path / "run")
    rewrite(run / "tuned.safetensors", meta_change=edit_config_metadata(rank=9))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "rank": 9}, sort_keys=False))
    line = cli_error(capsys, "export", run, "--format", "peft", "--out", tmp_path / "x")
    assert "tensor 'best.0.k.A' has shape (4, 32), expected (9, in) (rank 9 in" in line
    with pytest.raises(UserError, match="expected \\(9, in\\)"):
        load_tuned(run)


def test_a_damaged_tuned_file_is_rewritten_by_resume(finished, tmp_path, capsys):
    """What the error's hint says: the checkpoint still holds the best-dev state."""
    run = copy_run(finished[0], tmp_path / "run")
    (run / "tuned.safetensors").write_bytes(b"\0" * 64)
    assert "--resume" in cli_error(capsys, "eval", run)
    assert cli.main(["tune", "--resume", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert_same_run(run, finished[0])


def as_if_saved_on_another_cpu(scale: float):
    """A checkpoint change: every CMA-ES state as another CPU kind would have saved it
    (same losses and RNG, hashes that the replay here does not meet, numbers moved)."""

    def change(state):
        for per_layer in state["optimizers"]:
            for opt in per_layer:
                opt.update(candidates_sha256="0" * 64, es_sha256="0" * 64)
                opt["es_probe"] = opt["es_probe"] * (1 + scale)

    return change


OTHER_MACHINE = {"cpu": "Other CPU", "cpu_flags": ["avx2"], "gpu": None}


@pytest.mark.parametrize("recorded", [True, False], ids=["machine-recorded", "older-checkpoint"])
def test_a_checkpoint_from_another_cpu_kind_resumes_and_says_so(
    finished, tmp_path, capsys, recorded
):
    """Rounding is all that differs: the resume goes on (here to the same results, as the
    replay on this CPU is the saved run's own), says how far the replay was, and
    results.json lists both machines (the first unknown for a checkpoint from before the
    record)."""
    run = copy_run(finished[0], tmp_path / "run")

    def elsewhere(state):
        as_if_saved_on_another_cpu(1e-12)(state)
        if recorded:
            state["machines"] = [OTHER_MACHINE]
        else:
            del state["machines"]

    tamper_state(run / CHECKPOINT, elsewhere)
    assert cli.main(["tune", "--resume", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "not restored bit for bit (another CPU kind or BLAS) and matches the saved" in err
    assert "saved one to 1e-12 (relative)" in err, err
    assert_same_run(run, finished[0])
    first = OTHER_MACHINE if recorded else UNRECORDED
    machines = [first, hardware()]
    assert json.loads((run / "results.json").read_text())["machines"] == machines


def test_the_untouched_run_reads_back(finished):
    """The checks pass on what tune writes (so every failure above is the tampering)."""
    run, results = finished
    z, config = load_tuned(run)
    assert z.shape == (3, 60) and np.any(z) and config.rank == 4
    state = load_state(run / CHECKPOINT, config)
    assert np.array_equal(state["best_dev_z"], z)
    assert results["evaluations"] == 36
    assert results["machines"] == state["machines"] == [hardware()]


# ------------------------------------------------------------------ the checkpoint


def tamper_state(path: Path, change) -> None:
    """Change the checkpoint's state (arrays and JSON) and write it back."""
    state = load_state(path)
    change(state)
    checkpoint.save_state(path, state)


TAMPERED_CHECKPOINT = {
    "truncated": (
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        "state.safetensors: not a readable safetensors file (",
    ),
    "z nan": (
        lambda p: tamper_state(p, lambda s: set_value("z", (1, 3))(s)),
        "tensor 'z' holds NaN (1 of 180 values",
    ),
    "optimizer nan": (
        lambda p: tamper_state(p, lambda s: set_value("best_x", 0)(s["optimizers"][0][0])),
        "tensor 'optimizers.0.0.best_x' holds NaN",
    ),
    "another run's": (
        lambda p: tamper_state(p, lambda s: s["config"].__setitem__("popsize", 8)),
        "its config differs from config.yaml in popsize",
    ),
    "z wrong width": (
        lambda p: tamper_state(p, lambda s: s.__setitem__("z", s["z"][:, :10].copy())),
        "tensor 'z' has shape (3, 10), expected (layers, 60)",
    ),
    "optimizer moved beyond rounding": (
        lambda p: tamper_state(p, as_if_saved_on_another_cpu(1e-3)),
        "does not reproduce the saved candidates: it lands 0.001 (relative) from the saved",
    ),
    "no state metadata": (
        lambda p: rewrite(p, meta_change=lambda m: m.pop("state")),
        "no 'state' entry",
    ),
}


@pytest.mark.parametrize("case", list(TAMPERED_CHECKPOINT))
def test_a_tampered_checkpoint_is_one_line_for_resume(finished, tmp_path, capsys, case):
    tamper, expected = TAMPERED_CHECKPOINT[case]
    run = copy_run(finished[0], tmp_path / "run")
    tamper(run / CHECKPOINT)
    before = (run / "results.json").read_bytes()
    line = cli_error(capsys, "tune", "--resume", run, "--quiet")
    assert expected in line and str(run / CHECKPOINT) in line, line
    assert "corrupt" in line or "another run" in line
    assert (run / "results.json").read_bytes() == before and not (run / ".lock").exists()


def test_a_worst_loss_of_inf_in_a_checkpoint_is_no_damage(tmp_path):
    """The optimizers' loss arrays may hold +inf (a NaN loss counts as the worst); NaN and
    -inf there, and inf anywhere else, are damage."""
    path = tmp_path / "state.safetensors"
    checkpoint.save_state(path, {"opt": {"loss_history": np.array([[1.0, np.inf]])}})
    assert np.isposinf(load_state(path)["opt"]["loss_history"][0, 1])
    for key, value in (("loss_history", -np.inf), ("loss_history", np.nan), ("x", np.inf)):
        checkpoint.save_state(path, {"opt": {key: np.array([1.0, value])}})
        with pytest.raises(UserError, match=f"tensor 'opt.{key}' holds"):
            load_state(path)
    with pytest.raises(UserError, match="is a folder, not a file"):
        read_safetensors(tmp_path)


# ------------------------------------------------------------------ native exports


@pytest.fixture(scope="module")
def native(finished, tmp_path_factory):
    return export_run(finished[0], "native", tmp_path_factory.mktemp("native") / "native")


def load_error(folder: Path) -> str:
    with pytest.raises(UserError) as caught:
        dfo_lora.load_tuned(folder)
    assert "\n" not in str(caught.value)
    return str(caught.value)


TAMPERED_NATIVE = {
    "truncated": (
        lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-1]),
        "weights.safetensors: not a readable safetensors file (",
    ),
    "nan": (lambda d: rewrite(d / WEIGHTS, set_value("1.k.B")), "tensor '1.k.B' holds NaN"),
    "rank 9 in the manifest": (
        lambda d: edit_manifest(d, lambda m: m["space_config"].__setitem__("rank", 9)),
        "tensor '0.k.A' has shape (4, 32), expected (9, in) (rank 9 in",
    ),
    "widths of two models": (
        lambda d: rewrite(
            d / WEIGHTS, lambda t: t.__setitem__("2.q.A", np.zeros((4, 16), np.float32))
        ),
        "tensor '2.q.A' has in width 16, '0.q.A' 32",
    ),
    "manifest not json": (
        lambda d: (d / MANIFEST).write_text("{not json"),
        "is not a readable JSON manifest (",
    ),
    "manifest without space": (
        lambda d: edit_manifest(d, lambda m: m.pop("space")),
        "has no space (edited? re-export the run)",
    ),
    "unknown space field": (
        lambda d: edit_manifest(d, lambda m: m["space_config"].__setitem__("colour", 1)),
        "dfo_lora_export.json: the lora space_config: ",
    ),
}


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", list(TAMPERED_NATIVE))
def test_a_tampered_native_export_is_one_line_for_load_tuned(native, tmp_path, case):
    tamper, expected = TAMPERED_NATIVE[case]
    folder = copy_run(native, tmp_path / "native")
    tamper(folder)
    line = load_error(folder)
    assert expected in line and str(folder) in line, line


# ------------------------------------------------------------------ faults while writing


class WriteFault:
    """Make the `nth` atomic write of a run file named `name` fail midway: `rename` after
    its temp file is whole (the rename raises), `partial` after half of it is on disk (the
    flush fails as on a full disk). Records the file as it was when the write began."""

    def __init__(self, monkeypatch, name: str, nth: int, how: str):
        self.name, self.nth, self.how = name, nth, how
        self.calls, self.before, self.temps = 0, None, []
        self._replace, self._fsync = os.replace, os.fsync
        self._temp = checkpoint.create_temp_file
        monkeypatch.setattr(checkpoint, "create_temp_file", self.create_temp_file)
        monkeypatch.setattr(os, "replace", self.replace)
        monkeypatch.setattr(os, "fsync", self.fsync)

    def create_temp_file(self, parent: Path, prefix: str):
        fd, tmp = self._temp(parent, prefix)
        if prefix == f".{self.name}.":
            self.calls += 1
            if self.calls == self.nth:
                dst = Path(parent) / self.name
                self.before = dst.read_bytes() if dst.exists() else None
                self.temps.append((fd, tmp))
        return fd, tmp

    def fsync(self, fd: int) -> None:
        if self.how == "partial" and any(fd == f for f, _ in self.temps):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        self._fsync(fd)

    def replace(self, src, dst) -> None:
        if self.how == "rename" and any(str(src) == t for _, t in self.temps):
            assert Path(src).stat().st_size > 0  # the temp file is written, not renamed
            raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
        self._replace(src, dst)


def assert_whole(out: Path, name: str, before: bytes | None) -> None:
    """The folder holds the file as it was before the failed write (or none, if there was
    none), and no temp file of it."""
    path = out / (CHECKPOINT if name == "state.safetensors" else name)
    if before is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == before
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{name}.")]


def assert_same_run(out: Path, reference: Path) -> None:
    """The resumed run's results and states are the uninterrupted run's."""
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    for key in ("tuned", "zero_shot", "calibrated_zero_shot", "best_dev_evals", "evaluations"):
        assert a[key] == b[key], key
    za, config = load_tuned(reference)
    zb, _ = load_tuned(out)  # the rewritten tuned.safetensors reads back whole
    assert np.array_equal(za, zb)
    final_a = load_state(reference / CHECKPOINT, config)["z"]
    assert np.array_equal(final_a, load_state(out / CHECKPOINT, config)["z"])
    lines = [
        [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]
        for lines in ((d / "log.jsonl").read_text().splitlines() for d in (reference, out))
    ]
    assert lines[0] == lines[1]


@pytest.mark.parametrize(
    ("name", "nth", "how"),
    [
        ("state.safetensors", 3, "rename"),
        ("state.safetensors", 2, "partial"),
        ("tuned.safetensors", 1, "partial"),
        ("results.json", 1, "rename"),
    ],
)
def test_a_failed_write_leaves_a_whole_folder_that_resumes(
    finished, tiny_llama_dir, tmp_path, monkeypatch, capsys, name, nth, how
):
    out = tmp_path / "run"
    fault = WriteFault(monkeypatch, name, nth, how)
    with pytest.raises(OSError, match="injected"):
        tune(run_config(tiny_llama_dir), out, progress=False)
    assert fault.calls == nth and fault.temps
    monkeypatch.undo()
    assert_whole(out, name, fault.before)
    if name == "state.safetensors":
        assert fault.before is not None  # an older checkpoint stays, whole
        load_state(out / CHECKPOINT, run_config(tiny_llama_dir))
    assert not (out / "results.json").exists() and not (out / ".lock").exists()

    assert cli.main(["tune", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert_same_run(out, finished[0])


def test_a_failed_config_write_leaves_an_empty_folder_for_the_same_command(
    finished, tiny_llama_dir, tmp_path, monkeypatch
):
    """The first write fails: nothing to resume, nothing left, and the same run starts in
    the same --out."""
    out = tmp_path / "run"
    fault = WriteFault(monkeypatch, "config.yaml", 1, "partial")
    with pytest.raises(OSError, match="injected"):
        tune(run_config(tiny_llama_dir), out, progress=False)
    monkeypatch.undo()
    assert fault.before is None and fault.temps
    assert not out.exists() or sorted(os.listdir(out)) == []  # a folder it made goes too
    tune(run_config(tiny_llama_dir), out, progress=False)
    assert_same_run(out, finished[0])


CRASH = textwrap.dedent(
    """
    import os, sys
    from dfo_lora import cli
    from dfo_lora.search import checkpoint

    made, real_temp, real_fsync = [], checkpoint.create_temp_file, os.fsync

    def temp(parent, prefix):
        fd, tmp = real_temp(parent, prefix)
        if prefix == ".state.safetensors.":
            made.append(fd)
        return fd, tmp

    def fsync(fd):
        if len(made) == 3 and fd == made[-1]:  # the 3rd checkpoint: half on disk, then dead
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            os._exit(9)
        real_fsync(fd)

    checkpoint.create_temp_file, os.fsync = temp, fsync
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_a_crash_mid_checkpoint_keeps_the_old_one_and_resumes(
    finished, tiny_llama_dir, tmp_path, capsys
):
    """A process killed while writing a checkpoint (no clean-up runs) leaves its half
    written temp file beside the previous checkpoint, which resumes (and the resume
    removes the temp file)."""
    out = tmp_path / "run"
    args = ["tune", "--model", tiny_llama_dir, "--task", "sst2", "--test-limit", "20"]
    args += ["--popsize", "6", "--budget", "36", "--eval-every", "12", "--intrinsic-dim", "60"]
    args += ["--select", "final", "--dtype", "fp32", "--quiet", "--out", out]
    done = subprocess.run(
        [sys.executable, "-c", CRASH, *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 9, done.stderr
    partial = [p for p in (out / "checkpoint").iterdir() if p.name.startswith(".state")]
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises(UserError, match="not a readable safetensors file"):
        read_safetensors(partial[0])  # what a non-atomic write would have left
    config = run_config(tiny_llama_dir)
    assert load_state(out / CHECKPOINT, config)["position"]["visit"] == 2  # the 2nd one
    assert cli.main(["tune", "--resume", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert_same_run(out, finished[0])
    assert not partial[0].exists()  # the resume, holding the lock, removed the dead temp


@pytest.mark.parametrize(("fmt", "how"), [("native", "rename"), ("peft", "partial")])
def test_a_failed_export_leaves_nothing_and_the_run_unchanged(
    finished, tmp_path, monkeypatch, fmt, how
):
    run = finished[0]
    before = {name: (run / name).read_bytes() for name in RUN_FILES}
    out = tmp_path / "export"
    if how == "rename":  # the staging folder is whole; renaming it into place fails
        real = os.replace

        def replace(src, dst):
            if Path(dst) == out:
                raise OSError(errno.EIO, "Input/output error (injected)", str(dst))
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    else:  # the adapter's weights are half written when the disk fills
        import peft.peft_model  # its own name for safetensors' save_file

        real_save = peft.peft_model.safe_save_file

        def save_file(tensors, filename, *args, **kwargs):
            real_save(tensors, filename, *args, **kwargs)
            Path(filename).write_bytes(Path(filename).read_bytes()[:100])
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    with pytest.raises(OSError, match="injected"):
        export_run(run, fmt, out)
    monkeypatch.undo()
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []
    assert {name: (run / name).read_bytes() for name in RUN_FILES} == before
    export_run(run, fmt, out)  # the same export, once the disk is back
    if fmt == "native":
        assert sorted(os.listdir(out)) == [MANIFEST, WEIGHTS]
        dfo_lora.load_tuned(out)
    else:
        assert (out / "adapter_model.safetensors").is_file()
        read_safetensors(out / "adapter_model.safetensors")


# ------------------------------------------------------------------ eval's options


def eval_row(capsys, *argv) -> dict:
    assert cli.main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_scores_the_full_test_split_or_a_subset(finished, tmp_path, capsys, smollm2_dir):
    run, results = finished
    default = eval_row(capsys, run)
    assert default["test_limit"] == 20 and default["examples"] == 20
    assert default["accuracy"] == pytest.approx(results["tuned"]["test"]["accuracy"])
    subset = eval_row(capsys, run, "--test-limit", "7")
    assert subset["examples"] == 7 and subset["test_limit"] == 7
    full = eval_row(capsys, run, "--test-limit", "none", "--dtype", "fp32", "--device", "cpu")
    assert full["test_limit"] is None and full["examples"] > 20  # sst2's whole test split
    # The base model moved: the run's folder is gone, --model points at the new place.
    moved = copy_run(run, tmp_path / "run")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    elsewhere = tmp_path / "models" / "tiny"
    shutil.copytree(config["model"], elsewhere)
    gone = tmp_path / "gone"
    for path in (moved / "config.yaml",):
        path.write_text(path.read_text().replace(config["model"], str(gone)))
    rewrite(
        moved / "tuned.safetensors",
        meta_change=edit_config_metadata(model=str(gone)),
    )
    line = cli_error(capsys, "eval", moved)
    assert "gone" in line
    again = eval_row(capsys, moved, "--model", elsewhere)
    assert again["accuracy"] == default["accuracy"] and again["loss"] == default["loss"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--test-limit", "0"], "test_limit: must be positive, got 0"),
        (["--test-limit", "ten"], "test_limit: 'ten' is not a valid int"),
        (["--test-limit", "5", "--split", "dev"], "--test-limit limits the test split"),
        (["--dtype", "fp8"], "dtype: 'fp8' is not one of auto, bf16, fp16, fp32"),
        (["--device", "tpu"], "device: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        (["--model", "/nowhere/model"], "/nowhere/model"),
    ],
)
def test_eval_bad_options_are_one_line(finished, capsys, argv, expected):
    line = cli_error(capsys, "eval", finished[0], *argv)
    assert expected in line, line


def test_eval_bad_option_through_the_command_line(finished):
    """The same through a real `dfo-lora` process: one line, exit 2, no traceback."""
    from tests.test_cli import one_line_error, run_cli

    line = one_line_error(run_cli("eval", finished[0], "--dtype", "fp64"))
    assert "dtype: 'fp64' is not one of" in line
