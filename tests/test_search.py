"""The layer-wise search, checkpoints and resume, on a tiny Llama with real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dfo_lora.config import TuneConfig, parse_layers
from dfo_lora.errors import UserError
from dfo_lora.search import LayerwiseSearch, layer_order, rounds_for, tune
from dfo_lora.search.checkpoint import load_state, save_state
from dfo_lora.search.run import hardware
from dfo_lora.server.factory import build_server


def tiny_config(model_dir, **overrides) -> TuneConfig:
    values = dict(
        model=str(model_dir),
        task="sst2",
        test_limit=40,
        popsize=6,
        budget=6 * 3 * 4,  # 4 rounds over 3 layers
        eval_every=12,
        intrinsic_dim=60,
    )
    values.update(overrides)
    config = TuneConfig(**values)
    return config.validate()


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfo_lora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        **kwargs,
    )


def test_rounds_and_layer_orders():
    config = TuneConfig(popsize=20, budget=8000).validate()
    assert rounds_for(config, 30) == 13  # 8000 // (20 * 30)
    assert layer_order(config, range(4), 0) == [0, 1, 2, 3]
    config.layer_order = "top_down"
    assert layer_order(config, range(4), 0) == [3, 2, 1, 0]
    config.layer_order = "random"
    orders = [layer_order(config, range(6), r) for r in range(3)]
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert orders[0] != orders[1] or orders[1] != orders[2]
    assert orders == [layer_order(config, range(6), r) for r in range(3)]  # seeded


def test_search_counts_evaluations_and_commits_xbest(tiny_llama_dir, tmp_path):
    config = tiny_config(tiny_llama_dir)
    results = tune(config, tmp_path / "run", progress=False)
    assert results["evaluations"] == config.budget
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    generations = [x for x in lines if x["kind"] == "generation"]
    assert len(generations) == config.budget // config.popsize
    assert [g["layer"] for g in generations[:6]] == [0, 1, 2, 0, 1, 2]
    devs = [x for x in lines if x["kind"] == "dev"]
    assert [d["evals"] for d in devs] == [0, 12, 24, 36, 48, 60, 72]  # every 12 evaluations
    best = max(devs, key=lambda d: (d["dev"]["accuracy"], -d["dev"]["loss"]))
    assert results["tuned"]["dev"] == best["dev"]
    assert results["tuned"]["dev"]["accuracy"] >= results["zero_shot"]["dev"]["accuracy"]
    for key in ("tuned", "zero_shot"):
        assert set(results[key]) == {"dev", "test"}
        assert 0 <= results[key]["test"]["accuracy"] <= 1
    assert results["wall_time_s"] > 0 and results["peak_mem_bytes"] > 0
    tuned = load_file(str(tmp_path / "run" / "tuned.safetensors"))["z"]
    assert tuned.shape == (3, 60)


def test_parse_layers_forms_and_errors():
    assert parse_layers("all", 6) == [0, 1, 2, 3, 4, 5]
    assert parse_layers("top:2", 6) == [4, 5]
    assert parse_layers("bottom:2", 6) == [0, 1]
    assert parse_layers("4, 0-1,1", 6) == [0, 1, 4]
    assert parse_layers("3-5", None) == [3, 4, 5]  # syntax only: the model is not loaded yet
    for bad in ("top:0", "top:x", "5-3", "-1", "a,b", "", "first:2"):
        with pytest.raises(UserError, match=r"^layers: .* is not all, top:N"):
            parse_layers(bad, 6)
    with pytest.raises(UserError, match=r"layer 6 does not exist \(the model has layers 0-5\)"):
        parse_layers("2,6", 6)
    with pytest.raises(UserError, match="asks for 7 of the model's 6 layers"):
        parse_layers("top:7", 6)


def test_search_only_the_chosen_layers(tiny_llama_dir, tmp_path):
    """Unsearched layers stay at z = 0; the budget is spread over the searched ones only."""
    config = tiny_config(tiny_llama_dir, layers="1-2", layer_order="top_down")
    results = tune(config, tmp_path / "run", progress=False)
    assert results["evaluations"] == config.budget  # 72 // (6 * 2) = 6 rounds
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    layers = [x["layer"] for x in lines if x["kind"] == "generation"]
    assert layers == [2, 1] * 6
    server = build_server(config.server_spec())
    search = LayerwiseSearch(server, config, metric="accuracy")
    assert [len(per) for per in search.optimizers] == [1, 1]
    search.run()
    z = server.get_state()
    assert not z[0].any() and z[1].any() and z[2].any()


def test_elitist_never_raises_train_loss(tiny_llama_dir, tmp_path):
    """Each visit re-scores the layer's current z; a commit happens only below that loss, so
    the train loss measured at the next visit equals min(current, visit best)."""
    config = tiny_config(tiny_llama_dir, elitist=True, alpha=3.0, layers="0-1", budget=6 * 8 + 8)
    assert rounds_for(config, 2) == 4  # 2 layers x (6 + 1) evaluations per visit
    results = tune(config, tmp_path / "run", progress=False)
    assert results["evaluations"] == 4 * 2 * 7
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    visits = [x for x in lines if x["kind"] == "generation"]
    current = [v["current_loss"] for v in visits]
    rejected = 0
    for before, after, visit in zip(current, current[1:], visits, strict=False):
        expected = min(before, visit["loss_min"])
        assert after == pytest.approx(expected, rel=1e-5, abs=1e-6)
        rejected += visit["loss_min"] >= before
    assert current[-1] < current[0]  # some candidate was committed
    assert rejected > 0  # and some visit found nothing better and kept the layer


def test_commit_mean_and_best_differ(tiny_llama_dir, tmp_path):
    finals = {}
    for commit in ("best", "mean"):
        config = tiny_config(tiny_llama_dir, commit=commit, budget=18)
        server = build_server(config.server_spec())
        search = LayerwiseSearch(server, config, metric="accuracy")
        search.run()
        z = server.get_state()
        opt = search.optimizers[0][0]
        expected = opt.best[0] if commit == "best" else opt.mean
        assert np.array_equal(z[0], expected)
        finals[commit] = z
    assert not np.array_equal(finals["best"], finals["mean"])


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = {
        "a": np.arange(6, dtype=np.float64).reshape(2, 3),
        "nested": [{"b": np.ones(2, dtype=np.uint32), "c": 1.5}, "text", None],
        "n": 3,
    }
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert np.array_equal(back["a"], state["a"]) and back["a"].dtype == np.float64
    assert np.array_equal(back["nested"][0]["b"], state["nested"][0]["b"])
    assert back["nested"][1:] == ["text", None] and back["n"] == 3


def _kill_mid_search(args, out: Path, min_lines: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfo_lora.cli", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    log = out / "log.jsonl"
    while time.time() < deadline:
        if (out / "checkpoint" / "state.safetensors").exists() and log.exists():
            if len(log.read_text().splitlines()) >= min_lines:
                break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    "optimizer",
    [
        ["--optimizer", "cma"],
        ["--optimizer", "dynfwa"],
        # A fixed: in the paper's space esgrad has no gradient at z = 0 and never moves
        ["--optimizer", "esgrad", "--commit", "mean", "--a-factor", "pca"],
        ["--optimizer", "esgrad", "--commit", "mean", "--a-factor", "pca"]
        + ["--select", "average_if_fit", "--average-last", "5"],
        ["--optimizer", "esgrad", "--commit", "mean", "--a-factor", "pca"]
        + ["--optimizer-options", "direction=adam"],
        ["--optimizer", "hybrid", "--hybrid-mode", "round"],
        ["--elitist", "true", "--generations-per-visit", "2", "--checkpoint-every-s", "0.01"],
        ["--subspace-dim", "4", "--generations-per-visit", "2", "--checkpoint-every-s", "0.01"],
    ],
    ids=[
        "cma",
        "dynfwa",
        "esgrad",
        "esgrad-average-if-fit",
        "esgrad-adam",
        "hybrid-round",
        "elitist-mid-visit",
        "subspace-mid-visit",
    ],
)
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_llama_dir, tmp_path, optimizer):
    common = [
        "tune",
        "--model",
        tiny_llama_dir,
        "--task",
        "sst2",
        "--test-limit",
        "40",
        "--popsize",
        "6",
        "--budget",
        str(6 * 3 * 16),  # 16 rounds: killed after 20 of its ~58 log lines
        "--eval-every",
        "30",
        "--intrinsic-dim",
        "60",
        "--quiet",
        *optimizer,
    ]
    whole = tmp_path / "whole"
    done = cli(*common, "--out", whole)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    _kill_mid_search([*common, "--out", killed], killed, min_lines=20)
    assert not (killed / "results.json").exists()  # really killed mid-search
    resumed = cli("tune", "--resume", killed, "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    a = json.loads((whole / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for key in ("tuned", "zero_shot", "best_dev_evals", "evaluations"):
        assert a[key] == b[key], key
    for key in ("train_fit", "averaged", "last_state"):  # average_if_fit's decision
        assert a.get(key) == b.get(key), key
    za = load_file(str(whole / "tuned.safetensors"))["z"]
    zb = load_file(str(killed / "tuned.safetensors"))["z"]
    assert np.array_equal(za, zb)
    final_a = load_state(whole / "checkpoint" / "state.safetensors")
    final_b = load_state(killed / "checkpoint" / "state.safetensors")
    assert np.array_equal(final_a["z"], final_b["z"])
    assert final_b["machines"] == b["machines"] == [hardware()]  # resumed on the same machine
    assert np.abs(final_a["z"]).max() > 0  # the search moved: the comparison is not of zeros
    strip = [
        {k: v for k, v in json.loads(x).items() if k != "time_s"}
        for x in (whole / "log.jsonl").read_text().splitlines()
    ]
    strip_b = [
        {k: v for k, v in json.loads(x).items() if k != "time_s"}
        for x in (killed / "log.jsonl").read_text().splitlines()
    ]
    assert strip == strip_b


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # pinned: auto is bf16 on AMX CPUs only
def test_nonfinite_losses_count_as_worst(tiny_llama_dir, dtype):
    from dfo_lora.server.server import WORST_LOSS

    cands = np.zeros((3, 60))
    cands[1] = 1e30  # overflows to inf/NaN inside the forward (bf16 has fp32's range)
    # On v,o the overflow reaches every example's logits, whatever the kernels: each
    # example's loss is NaN, so the candidate's mean loss is exactly the worst.
    config = tiny_config(tiny_llama_dir, dtype=dtype, targets=["v", "o"])
    losses = build_server(config.server_spec()).score(0, cands)["loss"]
    assert np.isfinite(losses).all()
    assert losses[1] == WORST_LOSS and losses[0] < WORST_LOSS
    # On q,k it passes through the attention softmax, where some CPU kernels (the fused
    # attention on AMX CPUs, fp32 and bf16 alike) return finite rows for NaN scores: only
    # some examples count as the worst loss, and the mean lies between.
    config = tiny_config(tiny_llama_dir, dtype=dtype)
    losses = build_server(config.server_spec()).score(0, cands)["loss"]
    assert np.isfinite(losses).all()
    # The two zero candidates sit in different blocks of the stacked batch: equal up to
    # the kernels' rounding (2e-8 apart on a 2-thread AVX2 CPU in fp32).
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)
    assert 100 * losses[0] < losses[1] <= WORST_LOSS


def test_hybrid_alternates_optimizer_kinds(tiny_llama_dir):
    by_layer = tiny_config(tiny_llama_dir, optimizer="hybrid", budget=18)
    server = build_server(by_layer.server_spec())
    search = LayerwiseSearch(server, by_layer, metric="accuracy")
    kinds = [search.optimizer_for(layer, 0).name for layer in range(3)]
    assert kinds == ["cma", "dynfwa", "cma"]
    by_round = tiny_config(tiny_llama_dir, optimizer="hybrid", hybrid_mode="round", budget=18)
    search = LayerwiseSearch(server, by_round, metric="accuracy")
    assert [search.optimizer_for(1, r).name for r in range(3)] == ["cma", "dynfwa", "cma"]
    fwa = tiny_config(tiny_llama_dir, optimizer="fwa", fwa_variant="bbfwa", budget=18)
    assert LayerwiseSearch(server, fwa, metric="accuracy").optimizer_for(0, 0).name == "bbfwa"
    # optimizer_options reach the Fireworks half only
    with_opts = tiny_config(
        tiny_llama_dir, optimizer="hybrid", optimizer_options={"cr": 0.5}, budget=18
    )
    search = LayerwiseSearch(server, with_opts, metric="accuracy")
    assert search.optimizer_for(1, 0).options["cr"] == 0.5


def test_no_config_loop_import_cycle():
    """The run-level policy lives in search/policy.py: config and loop both import it, the
    loop reads the config class for type hints only, and either side imports first."""
    import ast

    root = Path(__file__).resolve().parents[1] / "dfo_lora"

    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                node.body = [ast.Pass()]  # typing-only imports
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert "dfo_lora.config" not in imported(root / "search" / "loop.py")
    assert "dfo_lora.config" not in imported(root / "search" / "policy.py")
    assert not {n for n in imported(root / "config.py") if n.startswith("dfo_lora.search.")} - {
        "dfo_lora.search.policy"
    }
    for first in ("dfo_lora.search.loop", "dfo_lora.search", "dfo_lora.config"):
        code = f"import {first}; import dfo_lora.config, dfo_lora.search.loop, dfo_lora.search.run"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, first


def test_select_loss_and_final(tiny_llama_dir, tmp_path):
    """select=loss keeps the lowest dev loss seen; select=final tests the last state."""
    by_loss = tune(tiny_config(tiny_llama_dir, select="loss"), tmp_path / "loss", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "loss" / "log.jsonl").read_text().splitlines()]
    devs = [x["dev"] for x in lines if x["kind"] == "dev"]
    assert by_loss["tuned"]["dev"]["loss"] == min(d["loss"] for d in devs)
    final = tune(tiny_config(tiny_llama_dir, select="final"), tmp_path / "final", progress=False)
    last = np.asarray(load_file(str(tmp_path / "final" / "tuned.safetensors"))["z"])
    server = build_server(tiny_config(tiny_llama_dir).server_spec())
    state = load_state(tmp_path / "final" / "checkpoint" / "state.safetensors")
    assert np.array_equal(last, np.asarray(state["z"]))  # the tested state is the final one
    server.set_state(last)
    assert final["tuned"]["test"]["accuracy"] == server.evaluate("test")["accuracy"]


def test_select_average_tests_the_mean_of_the_round_end_states(tiny_llama_dir, tmp_path):
    """select=average tests the mean of the start state and every round's end (or of the
    last average_last of them) and leaves the search's path as select=final has it: the
    round ends are read off runs of 1..4 rounds of the same search (its path does not
    depend on the budget). A is fixed (`a_factor: pca`) so that esgrad moves z from 0: in
    the paper's space the delta A(z) B(z) has no gradient at z = 0."""
    search = dict(optimizer="esgrad", commit="mean", a_factor="pca")
    ends = []
    for rounds in range(1, 5):
        config = tiny_config(tiny_llama_dir, select="final", budget=6 * 3 * rounds, **search)
        tune(config, tmp_path / f"r{rounds}", progress=False)
        ends.append(np.asarray(load_file(str(tmp_path / f"r{rounds}" / "tuned.safetensors"))["z"]))
    path = [np.zeros_like(ends[0]), *ends]
    assert all(np.abs(end).max() > 0 for end in ends) and not np.array_equal(ends[-1], ends[-2])
    for last, want in ((0, np.mean(path, axis=0)), (2, np.mean(path[-2:], axis=0))):
        out = tmp_path / f"average{last}"
        config = tiny_config(tiny_llama_dir, select="average", average_last=last, **search)
        result = tune(config, out, progress=False)
        tested = np.asarray(load_file(str(out / "tuned.safetensors"))["z"])
        assert np.allclose(tested, want, rtol=0, atol=1e-12)
        state = load_state(out / "checkpoint" / "state.safetensors")
        assert np.array_equal(np.asarray(state["z"]), ends[-1])  # the path is unchanged
        server = build_server(config.server_spec())
        server.set_state(tested)
        assert result["tuned"]["test"]["accuracy"] == server.evaluate("test")["accuracy"]
        assert result["select"] == "average"
    with pytest.raises(UserError, match="average_last"):
        tiny_config(tiny_llama_dir, average_last=-1)


def test_z_penalty_steers_towards_small_z(tiny_llama_dir, tmp_path):
    """A large decay on z makes the committed vectors smaller than without it."""
    plain = tune(tiny_config(tiny_llama_dir), tmp_path / "plain", progress=False)
    decayed = tune(tiny_config(tiny_llama_dir, z_penalty=100.0), tmp_path / "decay", progress=False)
    norms = []
    for name in ("plain", "decay"):
        state = load_state(tmp_path / name / "checkpoint" / "state.safetensors")
        norms.append(float(np.linalg.norm(np.asarray(state["z"]))))
    assert norms[1] < norms[0]
    assert plain["evaluations"] == decayed["evaluations"]
    with pytest.raises(UserError, match="z_penalty"):
        tiny_config(tiny_llama_dir, z_penalty=-1.0)
    with pytest.raises(UserError, match="select"):
        tiny_config(tiny_llama_dir, select="best")


def test_fit_on_train_and_dev_fits_every_labelled_example(tiny_llama_dir):
    plain = build_server(tiny_config(tiny_llama_dir, k=4, dtype="fp32").server_spec())
    config = tiny_config(tiny_llama_dir, k=4, dtype="fp32", fit_on="train+dev", select="final")
    both = build_server(config.server_spec())
    assert plain.split_sizes["train"] == plain.split_sizes["dev"] == 8
    assert both.split_sizes["train"] == 16 and both.split_sizes["dev"] == 8
    # the fitted split is the train split followed by the dev split
    want = np.concatenate([plain.predict("train")["logits"], plain.predict("dev")["logits"]])
    assert np.allclose(both.predict("train")["logits"], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="select must be final"):
        TuneConfig(fit_on="train+dev").validate()


class RecordingServer:
    """A real server that also keeps, per scored batch, the layer, the candidates and the
    layer's committed z at that moment (to check where a subspace search looks)."""

    def __init__(self, server):
        self.server, self.batches = server, []

    def score(self, layer, candidates):
        self.batches.append((layer, np.array(candidates), self.server.get_state()[layer].copy()))
        return self.server.score(layer, candidates)

    def __getattr__(self, name):
        return getattr(self.server, name)


def test_subspace_search_looks_along_fresh_directions_around_the_layers_z(tiny_llama_dir):
    """--subspace-dim k: every candidate of a visit is the layer's z plus a combination of
    that visit's k directions; each visit of a layer draws new ones; the commit moves z
    within them, so over the rounds z leaves any single k-dim subspace."""
    config = tiny_config(tiny_llama_dir, subspace_dim=3, intrinsic_dim=12, budget=6 * 3 * 3)
    server = RecordingServer(build_server(config.server_spec()))
    search = LayerwiseSearch(server, config, metric="accuracy")
    search.run()
    assert len(server.batches) == 9  # 3 rounds x 3 layers, one generation each
    for index, (layer, candidates, anchor) in enumerate(server.batches):
        basis = search.subspace(layer, index // 3)
        assert basis.shape == (12, 3)
        coef, *_ = np.linalg.lstsq(basis, (candidates - anchor).T, rcond=None)
        assert np.allclose(basis @ coef, (candidates - anchor).T, atol=1e-9)
        assert np.linalg.matrix_rank(candidates - anchor) == 3  # the whole subspace is used
    b0, b1 = search.subspace(0, 0), search.subspace(0, 1)
    assert not np.allclose(b0, b1)
    final = server.get_state()
    assert np.any(final[0] != 0)
    bases = np.hstack([search.subspace(0, r) for r in range(3)])  # 9 directions
    coef, *_ = np.linalg.lstsq(bases, final[0], rcond=None)
    assert np.allclose(bases @ coef, final[0], atol=1e-9)  # z = the sum of the visits' steps
    coef, *_ = np.linalg.lstsq(b0, final[0], rcond=None)
    assert not np.allclose(b0 @ coef, final[0], atol=1e-6)  # not within the first visit's


def test_subspace_dim_is_checked_against_the_space():
    with pytest.raises(UserError, match=r"subspace_dim: must be in 1..intrinsic_dim \(8\), got 9"):
        TuneConfig(intrinsic_dim=8, subspace_dim=9).validate()
    with pytest.raises(UserError, match="subspace_dim"):
        TuneConfig(subspace_dim=0).validate()


@pytest.mark.parametrize("k, fits", [(2, True), (16, False)])
def test_select_average_if_fit_averages_only_a_fitted_state(tiny_llama_dir, tmp_path, k, fits):
    """select=average_if_fit tests the mean of the path (as select=average) when the last
    state gets every train example right, and the last state itself when it does not; the
    train split's metric that decided is in results.json. Two train examples are fitted,
    thirty-two of a random tiny model are not."""
    search = dict(optimizer="esgrad", commit="mean", a_factor="pca", k=k)
    runs = {}
    for select in ("final", "average", "average_if_fit"):
        config = tiny_config(tiny_llama_dir, select=select, **search)
        runs[select] = tune(config, tmp_path / select, progress=False)
    tested = {s: load_file(str(tmp_path / s / "tuned.safetensors"))["z"] for s in runs}
    result = runs["average_if_fit"]
    server = build_server(config.server_spec())
    server.set_state(np.asarray(tested["final"]))
    assert result["train_fit"] == server.evaluate("train")
    assert result["averaged"] is fits
    assert (result["train_fit"]["accuracy"] == 1.0) is fits
    assert not np.array_equal(tested["average"], tested["final"])  # the two choices differ
    want = "average" if fits else "final"
    assert np.array_equal(tested["average_if_fit"], tested[want])
    assert result["tuned"]["test"] == runs[want]["tuned"]["test"]
    # an averaged run also reports its last state's test, read after the choice
    assert result.get("last_state") == ({"test": runs["final"]["tuned"]["test"]} if fits else None)
    assert runs["average"]["last_state"] == {"test": runs["final"]["tuned"]["test"]}
