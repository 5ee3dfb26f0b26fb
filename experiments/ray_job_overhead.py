"""What a sweep pays for going through `ray job submit` (BENCHMARKS.md "Ray backend").

Runs the same small sweep (a tiny random Llama with SmolLM2's tokenizer, sst2, RUNS seeds)
three ways and prints the wall time per run of each:
- in-process: `dfo-lora sweep` with the local backend (one process, no Ray);
- in-process on Ray: the same sweep with `backend: ray` from this process (a local Ray);
- submitted: `experiments/ray_job.py` through the Jobs API to a `ray start --head` node
  with its dashboard on 127.0.0.1 (as the README's cluster recipe), timed from
  submission to SUCCEEDED, the head's start excluded.

    .venv/bin/python experiments/ray_job_overhead.py [--runs 4] [--budget 60]

Run it on an otherwise idle machine: actor start-up and model loading dominate small runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama with SmolLM2's tokenizer (tests/tiny_models.py)."""
    from dfo_lora.backbone.loading import converted_gguf_folder, preset_gguf

    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import save_tiny_llama

    return save_tiny_llama(
        folder, converted_gguf_folder(preset_gguf("smollm2-135m"), "smollm2-135m")
    )


def sweep_file(path: Path, model: Path, out: Path, runs: int, budget: int, backend: str) -> Path:
    config = {"test_limit": 40, "popsize": 6, "budget": budget, "intrinsic_dim": 20}
    if backend == "ray":
        config.update(backend="ray", servers=1, cpus_per_server=1)
    grid = {"model": [str(model)], "task": ["sst2"], "seed": list(range(1, runs + 1))}
    path.write_text(yaml.safe_dump({"out": str(out), "grid": grid, "config": config}))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--budget", type=int, default=60)
    args = parser.parse_args()
    from dfo_lora.sweep import run_sweep
    from dfo_lora.tasks.loaders import default_data_dir

    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    model = tiny_model(work / "tiny")
    times = {}
    for name, backend in (("in-process, local backend", "local"), ("in-process, Ray", "ray")):
        sweep = sweep_file(
            work / f"{backend}.yaml", model, work / backend, args.runs, args.budget, backend
        )
        start = time.perf_counter()
        summary = run_sweep(sweep, echo=lambda _: None)
        times[name] = time.perf_counter() - start
        print(f"{name}: {times[name]:.1f} s", file=sys.stderr, flush=True)
        assert summary["done"] == args.runs, summary
        if backend == "ray":
            import ray

            ray.shutdown()

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "token"
    token = (
        subprocess.run(
            [RAY, "get-auth-token", "--generate"],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    start_head = [RAY, "start", "--head", "--port=6390", "--num-cpus=2", "--include-dashboard=true"]
    start_head += ["--dashboard-host=127.0.0.1", "--dashboard-port=8299", "--disable-usage-stats"]
    subprocess.run(start_head, capture_output=True, env=env, check=True)
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(
            "http://127.0.0.1:8299", headers={"Authorization": f"Bearer {token}"}
        )
        sweep = sweep_file(work / "job.yaml", model, work / "job", args.runs, args.budget, "ray")
        data = str(default_data_dir().resolve())
        start = time.perf_counter()
        job = client.submit_job(
            entrypoint=f"{sys.executable} {ROOT / 'experiments' / 'ray_job.py'} {sweep} "
            f"--out {work / 'job'}",
            runtime_env={"env_vars": {"DFO_LORA_DATA": data, "PYTHONPATH": str(ROOT)}},
        )
        deadline = time.monotonic() + 1800
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
            if time.monotonic() > deadline:
                raise SystemExit(f"job did not finish in 30 min:\n{client.get_job_logs(job)}")
            time.sleep(0.5)
        times["submitted job, Ray"] = time.perf_counter() - start
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_logs(job)
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(work, ignore_errors=True)
    base = times["in-process, local backend"] / args.runs
    for name, seconds in times.items():
        per_run = seconds / args.runs
        print(f"{name:28s} {seconds:7.1f} s  {per_run:6.1f} s/run  (+{per_run - base:5.1f} s/run)")
    print(json.dumps({"runs": args.runs, "budget": args.budget, "seconds": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
