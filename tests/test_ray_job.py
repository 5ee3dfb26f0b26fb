"""The README's cluster recipe, really submitted: a local Ray head with its dashboard on
127.0.0.1, `experiments/ray_job.py` with a tiny sweep through the Jobs API, its
sweep.jsonl and run folders checked, the head stopped at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dfo_lora.tasks.loaders import default_data_dir

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

# One local Ray cluster at a time: under pytest-xdist these files share a worker.
pytestmark = pytest.mark.xdist_group("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` with the dashboard (ray[default]) on 127.0.0.1; stopped after.

    Token authentication on, as Ray (>= 2.5x) does for new clusters: the head and the
    job's driver read the token of ~/.ray/auth_token (made if missing); the client sends
    it as `ray job submit` would. Yields (dashboard address, token).
    """
    port, dashboard = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    made = subprocess.run(
        [RAY, "get-auth-token", "--generate"], capture_output=True, text=True, env=env
    )
    assert made.returncode == 0, made.stderr
    start = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true"]
    start += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
    started = subprocess.run(
        [*start, "--disable-usage-stats"], capture_output=True, text=True, env=env
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", made.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)


def test_sweep_submitted_as_a_ray_job(ray_head, tiny_llama_dir, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, token = ray_head

    out = tmp_path / "sweep"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "out": str(out),
                "grid": {"model": [str(tiny_llama_dir)], "task": ["sst2"], "seed": [1, 2]},
                "config": {
                    "test_limit": 20,
                    "popsize": 4,
                    "budget": 12,
                    "intrinsic_dim": 20,
                    "backend": "ray",
                    "servers": 1,
                    "cpus_per_server": 1,
                },
            }
        )
    )
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    job = client.submit_job(
        entrypoint=f"{sys.executable} {ROOT / 'experiments' / 'ray_job.py'} {sweep} --out {out}",
        runtime_env={
            "env_vars": {
                "DFO_LORA_DATA": str(default_data_dir().resolve()),
                "PYTHONPATH": str(ROOT),
            }
        },
    )
    deadline = time.monotonic() + 600
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs
    assert "sweep: 2 done, 0 skipped, 0 failed" in logs
    rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["params"]["seed"] for r in rows] == [1, 2]
    assert all(r["status"] == "done" and r["evaluations"] == 12 for r in rows)
    for row in rows:
        results = json.loads((out / row["dir"] / "results.json").read_text())
        assert results["evaluations"] == 12 and "test" in results["tuned"]
