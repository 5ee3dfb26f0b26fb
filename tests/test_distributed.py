"""The Ray backend end to end on a tiny Llama: same numbers as the local backend, a server
actor killed mid-run, a two-run sweep, one-line errors. One local Ray instance (2 CPUs)."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray  # a hard dependency: a missing install must fail, not skip
import torch
import yaml
from safetensors.numpy import load_file

from dfo_lora.config import TuneConfig
from dfo_lora.distributed.cluster import host_port
from dfo_lora.distributed.servers import chunk_candidates, plan_shares
from dfo_lora.errors import UserError
from dfo_lora.search.checkpoint import load_state
from dfo_lora.search.run import tune
from dfo_lora.server.factory import build_server

# One local Ray cluster at a time: under pytest-xdist these files share a worker.
pytestmark = pytest.mark.xdist_group("ray")

SETTINGS = dict(
    task="sst2",
    test_limit=40,
    popsize=6,
    budget=6 * 3 * 2,  # 2 rounds over 3 layers
    eval_every=12,
    intrinsic_dim=60,
    # chunks of 2, 4 and 2 candidates in 3 length buckets: shares of 4 (more, finer buckets,
    # the CPU default for train, would make the shares' unit, their lcm, exceed a population)
    max_buckets=3,
    max_tokens=500,
)


def tiny_config(model_dir, **overrides) -> TuneConfig:
    return TuneConfig(**{"model": str(model_dir), **SETTINGS, **overrides}).validate()


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tiny_llama_dir, tmp_path_factory):
    """The reference: the local backend with one torch thread, like a 1-CPU server actor."""
    out = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = tune(tiny_config(tiny_llama_dir), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, results


def assert_same_run(a: Path, b: Path, tuned_nonzero: bool = True) -> None:
    """Bitwise the same search: every generation's losses, dev/test metrics, tuned and final z."""
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for key in ("tuned", "zero_shot", "best_dev_evals", "evaluations", "rounds", "metric"):
        assert ra[key] == rb[key], key

    def lines(d):
        rows = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]

    assert lines(a) == lines(b)
    za, zb = (load_file(str(d / "tuned.safetensors"))["z"] for d in (a, b))
    assert np.array_equal(za, zb) and (np.any(za) or not tuned_nonzero)
    fa, fb = (load_state(d / "checkpoint" / "state.safetensors")["z"] for d in (a, b))
    assert np.array_equal(fa, fb) and np.any(fa)


# ------------------------------------------------------------------ scatter plan (no Ray)


def test_plan_shares_cuts_whole_units_contiguously():
    assert plan_shares(20, 1, 2) == [(0, 10), (10, 20)]
    assert plan_shares(20, 4, 2) == [(0, 12), (12, 20)]
    assert plan_shares(20, 4, 3) == [(0, 8), (8, 16), (16, 20)]
    assert plan_shares(20, 25, 4) == [(0, 20)]  # one chunk: not split
    assert plan_shares(5, 1, 8) == [(i, i + 1) for i in range(5)]
    for num, unit, parts in [(20, 3, 4), (7, 2, 2), (33, 5, 6)]:
        shares = plan_shares(num, unit, parts)
        assert shares[0][0] == 0 and shares[-1][1] == num
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:], strict=False))
        assert all(start % unit == 0 for start, _ in shares)


def test_split_population_scores_bitwise_like_whole(tiny_llama_dir):
    """Shares cut at the server's own chunk boundaries give exactly the whole's losses."""
    server = build_server(tiny_config(tiny_llama_dir).server_spec())
    assert chunk_candidates(server) == [2, 4, 2]
    unit = math.lcm(*chunk_candidates(server))
    rng = np.random.default_rng(0)
    for layer in (0, 2):
        population = rng.standard_normal((10, server.dim))
        whole = server.score(layer, population)
        for parts in (2, 3):
            shares = [server.score(layer, population[a:b]) for a, b in plan_shares(10, unit, parts)]
            for key in ("loss", "accuracy"):
                assert np.array_equal(np.concatenate([s[key] for s in shares]), whole[key])


# ------------------------------------------------------------------ end to end on Ray


def test_ray_backend_matches_local_exactly(ray_cluster, local_run, tiny_llama_dir, tmp_path):
    from dfo_lora.distributed import run_tune

    config = tiny_config(tiny_llama_dir, backend="ray", servers=2, cpus_per_server=1)
    results = run_tune(config, tmp_path / "ray", progress=False)
    assert results["server"]["backend"] == {"name": "ray", "servers": 2}
    assert results["evaluations"] == config.budget
    assert_same_run(local_run[0], tmp_path / "ray")


def test_public_tune_runs_on_the_backend_the_config_names(
    ray_cluster, local_run, tiny_llama_dir, tmp_path
):
    """`dfo_lora.tune` (the Python API) with `backend: ray` runs on server actors, as the
    CLI does, with the local backend's numbers; it used to run locally without a word."""
    import dfo_lora

    config = tiny_config(tiny_llama_dir, backend="ray", servers=1, cpus_per_server=1)
    results = dfo_lora.tune(config, tmp_path / "ray", progress=False)
    assert results["server"]["backend"] == {"name": "ray", "servers": 1}
    assert_same_run(local_run[0], tmp_path / "ray")


def test_in_process_tune_refuses_a_ray_config(tiny_llama_dir, tmp_path):
    """`search.run.tune` builds no actors: a ray config without a server is an error
    naming `dfo_lora.tune`, before anything is loaded or written."""
    with pytest.raises(UserError, match=r"backend: 'ray' .* call dfo_lora\.tune"):
        tune(tiny_config(tiny_llama_dir, backend="ray"), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_ray_elitist_search_of_a_layer_subset_matches_local(ray_cluster, tiny_llama_dir, tmp_path):
    """--elitist adds the current z to a population that the proxy splits across actors."""
    from dfo_lora.distributed import run_tune

    options = {"elitist": True, "layers": "1-2", "budget": 2 * 2 * (SETTINGS["popsize"] + 1)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tune(tiny_config(tiny_llama_dir, **options), tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(threads)
    config = tiny_config(tiny_llama_dir, backend="ray", servers=2, cpus_per_server=1, **options)
    run_tune(config, tmp_path / "ray", progress=False)
    assert_same_run(tmp_path / "local", tmp_path / "ray", tuned_nonzero=False)


def test_killed_server_actor_changes_nothing(
    ray_cluster, local_run, tiny_llama_dir, tmp_path, monkeypatch
):
    """ray.kill a server actor while its share is in flight (twice): the share is re-scored
    elsewhere, the restarted actor is re-sent the committed state, and the run ends with
    exactly the undisturbed result; every evaluation counted once."""
    # A restarted actor reloads its model; on a loaded 2-core machine that took over the
    # default 120 s once. The wait is not what this test checks, so give it room.
    monkeypatch.setenv("DFO_LORA_RAY_TIMEOUT_S", "900")
    from dfo_lora.distributed.optimizers import RemoteOptimizers
    from dfo_lora.distributed.servers import RemoteServer, ServerGroup

    config = tiny_config(tiny_llama_dir)
    group = ServerGroup.start(config.server_spec(), servers=2, score_delay_s=0.3)
    killed = []

    def kill_in_flight(call: int, replicas: list[int]) -> None:
        if call in (2, 4):  # generations 2 and 4
            victim = replicas[-1]
            ray.kill(group.replicas[victim].handle, no_restart=False)
            killed.append(victim)

    try:
        server = RemoteServer(group)
        server.on_submit = kill_in_flight
        optimizers = RemoteOptimizers()
        try:
            results = tune(
                config, tmp_path / "run", progress=False, server=server, optimizers=optimizers
            )
        finally:
            optimizers.close()
        stats = group.stats
    finally:
        group.shutdown()
    assert len(killed) == 2
    assert stats.failed_calls >= 2  # the two shares in flight were lost and re-scored
    assert stats.resyncs >= 1  # a restarted replica got the committed state back
    assert results["evaluations"] == config.budget
    assert_same_run(local_run[0], tmp_path / "run")


def test_interrupted_ray_run_resumes_exactly(ray_cluster, local_run, tiny_llama_dir):
    """The optimizer pool's state leaves the actor only through checkpoints: stop a run
    after its 4th generation, resume from the last checkpoint on a fresh pool."""
    from dfo_lora.distributed.optimizers import RemoteOptimizers
    from dfo_lora.distributed.servers import RemoteServer, ServerGroup
    from dfo_lora.search.callbacks import Callback
    from dfo_lora.search.loop import LayerwiseSearch

    class Stop(Exception):
        pass

    class StopAfter(Callback):
        def on_generation(self, record):
            if record["evals"] == 4 * 6:
                raise Stop

    config = tiny_config(tiny_llama_dir)
    group = ServerGroup.start(config.server_spec(), servers=2)
    saved = []
    try:
        first = RemoteOptimizers()
        search = LayerwiseSearch(
            RemoteServer(group),
            config,
            "accuracy",
            callbacks=[StopAfter()],
            checkpoint=saved.append,
            optimizers=first,
        )
        with pytest.raises(Stop):
            search.run()
        first.close()  # the first pool is gone: only the checkpoint carries its state
        assert saved[-1]["position"]["evals"] == 3 * 6
        second = RemoteOptimizers()
        resumed = LayerwiseSearch(RemoteServer(group), config, "accuracy", optimizers=second)
        resumed.load_state_dict(saved[-1])
        results = resumed.run()
        second.close()
    finally:
        group.shutdown()
    reference = local_run[1]
    for key in ("tuned", "zero_shot", "best_dev_evals", "evaluations"):
        assert results[key] == reference[key], key


def test_two_run_sweep_shares_a_server_and_skips_finished(
    ray_cluster, local_run, tiny_llama_dir, tmp_path
):
    from dfo_lora.sweep import run_sweep

    sweep_file = tmp_path / "sweep.yaml"
    config = {k: v for k, v in SETTINGS.items() if k != "task"}
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "sweep"),
                "concurrency": 2,
                "grid": {
                    "model": [str(tiny_llama_dir)],
                    "task": ["sst2"],
                    "method": ["cma", "dynfwa"],
                },
                "config": {**config, "servers": 1, "cpus_per_server": 1},
            }
        )
    )
    messages = []
    summary = run_sweep(sweep_file, echo=messages.append)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 0, 0), messages
    rows = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [r["params"]["method"] for r in rows] == ["cma", "dynfwa"]
    assert all(r["status"] == "done" and r["evaluations"] == 36 for r in rows)
    # Two runs interleaved on one replica (state swapped per call): numbers unchanged.
    assert_same_run(local_run[0], tmp_path / "sweep" / rows[0]["dir"])

    again = run_sweep(sweep_file, echo=messages.append)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 2, 0)
    rows2 = [json.loads(x) for x in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows2] == ["skipped", "skipped"]
    assert [r["test"] for r in rows2] == [r["test"] for r in rows]


# ------------------------------------------------------------------ bad input


def test_more_gpus_than_the_cluster_has_fails_at_once(ray_cluster, tiny_llama_dir):
    from dfo_lora.distributed.servers import ServerGroup

    spec = tiny_config(tiny_llama_dir).server_spec()
    with pytest.raises(UserError, match=r"gpus_per_server: 2 server\(s\) x 1 GPU .* has 0 GPUs"):
        ServerGroup.start(spec, servers=2, gpus_per_server=1)
    with pytest.raises(UserError, match=r"cpus_per_server: 3 server\(s\) x 1 CPU .* has 2 CPUs"):
        ServerGroup.start(spec, servers=3)


def test_resources_held_elsewhere_time_out_with_the_reason(ray_cluster, tiny_llama_dir):
    from ray.util.placement_group import placement_group, remove_placement_group

    from dfo_lora.distributed.servers import ServerGroup

    hog = placement_group([{"CPU": 2}])
    ray.get(hog.ready())
    try:
        with pytest.raises(UserError, match=r"could not be placed within 1 s.*DFO_LORA_RAY"):
            ServerGroup.start(tiny_config(tiny_llama_dir).server_spec(), timeout_s=1)
    finally:
        remove_placement_group(hog)


def test_addresses_are_parsed_and_probed():
    assert host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert host_port("ray://head") == ("head", 10001)
    assert host_port("head") == ("head", 6379)
    with pytest.raises(UserError, match="address: 'ftp://x:1' is not"):
        host_port("ftp://x:1")
    with pytest.raises(UserError, match="address: 'head:port' is not"):
        host_port("head:port")


def test_cli_unreachable_address_is_one_line_exit_2(tiny_llama_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dfo_lora.cli", "tune", "--model", str(tiny_llama_dir)]
        + ["--backend", "ray", "--address", "127.0.0.1:1", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: address: cannot reach a Ray cluster at 127.0.0.1:1 (Connection refused); "
        "is `ray start --head` running there and the port open?"
    ]
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.parametrize(
    "content, message",
    [
        ({"grdi": {}}, r"unknown sweep key 'grdi'.*did you mean 'grid'"),
        (
            {"grid": {"modle": ["a"]}},
            r"grid: unknown config key 'modle'.*did you mean 'model'",
        ),
        ({"config": {"servers": 0}}, r"run run: servers: must be a positive integer, got 0"),
        ({"grid": {"seed": []}}, r"grid: seed: empty list"),
        ({"config": {"gpus_per_server": 1.5}}, r"gpus_per_server: must be a fraction"),
        ({}, r"sweep.yaml: no runs: give grid .* and/or config"),
        ({"out": "x", "grid": {}}, r"no runs"),
        (
            {"rows": {"lora": {"method": "gradient-lora"}}, "grid": {"row": ["lroa"]}},
            r"grid: row: 'lroa' is not a row \(rows: lora\); did you mean 'lora'",
        ),
        ({"rows": {"c": {"method": "cma"}}, "grid": {"seed": [1]}}, r"rows: given, but the grid"),
        (
            {"rows": {"c": {"method": "cma", "options": {"lr": 1}}}, "grid": {"row": ["c"]}},
            r"rows: c: options are for baselines only",
        ),
        (
            {
                "rows": {"g": {"method": "gradient", "options": {"stepz": 1}}},
                "grid": {"row": ["g"]},
            },
            r"rows: g: gradient: unknown option 'stepz'.*did you mean 'steps'",
        ),
        ({"rows": {"g": {"metod": "gradient"}}, "grid": {"row": ["g"]}}, r"rows: g: .*'metod'"),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, monkeypatch, content, message):
    from dfo_lora.cli import main
    from dfo_lora.sweep import load_sweep

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(UserError, match=message):
        load_sweep(path)
    assert main(["sweep", str(path)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # nothing written
