"""Baselines (`dfo-lora baseline`): same data and results.json as tune, bad input, sweeps.

Tiny random Llama with the real SmolLM2 tokenizer and real task data (fast); one short
run of gradient LoRA on the real SmolLM2-135M.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfo_lora.baselines import get_method, methods, run_baseline
from dfo_lora.baselines.common import train_loss
from dfo_lora.baselines.lora import add_lora
from dfo_lora.baselines.paper import PAPER, paper_config
from dfo_lora.baselines.run import prepare_context
from dfo_lora.baselines.training import perturb
from dfo_lora.cli import main
from dfo_lora.config import TuneConfig
from dfo_lora.errors import UserError
from dfo_lora.search import tune
from dfo_lora.server.factory import build_server

ROOT = Path(__file__).resolve().parents[1]
TUNE_KEYS = {
    "tuned",
    "zero_shot",
    "calibrated_zero_shot",
    "best_dev_evals",
    "evaluations",
    "rounds",
    "wall_time_s",
    "metric",
    "peak_mem_bytes",
    "versions",
    "server",
    "notes",
}


def tiny(model_dir, **overrides) -> TuneConfig:
    values = dict(model=str(model_dir), task="sst2", test_limit=24, dtype="fp32")
    values.update(overrides)
    return TuneConfig(**values).validate()


def cli_args(model_dir, method, out, *extra) -> list[str]:
    return [
        "baseline",
        method,
        "--model",
        str(model_dir),
        "--test-limit",
        "24",
        "--dtype",
        "fp32",
        "--quiet",
        "--out",
        str(out),
        *map(str, extra),
    ]


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def read(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def assert_same_states(got: dict, expected: dict) -> None:
    """{split: {metric: value}} equal up to float rounding."""
    assert set(got) == set(expected)
    for split in expected:
        assert got[split] == pytest.approx(expected[split], rel=1e-6, abs=1e-7), split


def test_help_lists_every_method_and_option(capsys):
    with pytest.raises(SystemExit) as done:
        main(["baseline", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for name, method in methods().items():
        assert f"  {name} " in text, name
        for option in method.options:
            assert f"--{option.replace('_', '-')}" in text, (name, option)
    assert set(methods()) == {
        "zero-shot",
        "calibrated",
        "icl",
        "gradient-lora",
        "gradient",
        "subspace-gradient",
        "mezo-lora",
        "mezo",
        "c-lora",
        "f-lora",
    }


def test_option_values_are_checked():
    grad = get_method("gradient-lora")
    assert grad.resolve({"lr": "1e-3", "targets": "q,k,v"})["targets"] == ["q", "k", "v"]
    assert grad.resolve({"steps": 3.0})["steps"] == 3
    assert get_method("icl").resolve({"calibrate": "yes"})["calibrate"] is True
    for given, expected in (
        ({"rank": 0}, "gradient-lora: rank: must be positive"),
        ({"steps": "2.5"}, "steps: '2.5' is not a valid int"),
        ({"loss": "neg_acc"}, "loss: 'neg_acc' is not one of ce, hinge"),
        ({"calibrate": "maybe"}, "calibrate: 'maybe' is not a valid bool"),
        ({"stepz": 3}, "did you mean 'steps'"),
    ):
        with pytest.raises(UserError, match=expected):
            grad.resolve(given)


def test_unknown_method_exits_2_in_one_line(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "dfo_lora.cli", "baseline", "gradient-lor", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "unknown method 'gradient-lor'" in lines[0]
    assert "did you mean 'gradient-lora'" in lines[0]
    assert not out.exists()


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    out = tmp_path / "out"
    cases = [
        (["zero-shot", "--lr", "1e-3"], "zero-shot: unknown option 'lr' (it takes no options)"),
        (["icl", "--steps", "3"], "icl: unknown option 'steps'"),
        (["gradient-lora", "--rank", "0"], "gradient-lora: rank: must be positive"),
        (["gradient-lora", "--targets", "q,zz"], "targets: 'zz' is not a projection of llama"),
        (["icl", "--context", "12"], "icl: not even one demonstration fits the context of 12"),
    ]
    for (method, *extra), expected in cases:
        line = one_line_error(capsys, main(cli_args(tiny_llama_dir, method, out, *extra)))
        assert expected in line, line
        assert not out.exists(), method
    config = tmp_path / "c.yaml"
    config.write_text("test_limit: 24\nbaseline:\n  gradient-lora: {stepz: 3}\n")
    line = one_line_error(
        capsys, main(cli_args(tiny_llama_dir, "zero-shot", out, "--config", config))
    )
    assert str(config) in line and "did you mean 'steps'" in line
    config.write_text("baseline:\n  gradient-lor: {steps: 3}\n")
    line = one_line_error(
        capsys, main(cli_args(tiny_llama_dir, "zero-shot", out, "--config", config))
    )
    assert "did you mean 'gradient-lora'" in line
    # peft missing: simulated in-process (an import of a None module raises ImportError)
    monkeypatch.setitem(sys.modules, "peft", None)
    line = one_line_error(capsys, main(cli_args(tiny_llama_dir, "gradient-lora", out)))
    assert "gradient-lora needs the peft package" in line and "dfo-lora[baselines]" in line
    assert not out.exists()
    # an existing folder is kept unless --overwrite
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(capsys, main(cli_args(tiny_llama_dir, "zero-shot", out)))
    assert "exists" in line and (out / "keep.txt").read_text() == "mine"
    assert "--resume" not in line  # baselines have none


def test_prompt_baselines_match_tune(tmp_path, tiny_llama_dir, capsys):
    """zero-shot / calibrated are tune's zero state; ICL shares its data; same keys."""
    tuned = tune(
        tiny(tiny_llama_dir, popsize=6, budget=18, intrinsic_dim=60, eval_every=12),
        tmp_path / "tune",
        progress=False,
    )
    assert TUNE_KEYS <= set(tuned)
    resolved = tuned["resolved"]  # what auto and the unset fields became
    assert (resolved["dtype"], resolved["device"], resolved["targets"]) == (
        "float32",
        "cpu",
        ["q", "k"],
    )
    assert (Path(resolved["data_dir"]) / "sst2").is_dir()
    runs = {}
    for method in ("zero-shot", "calibrated", "icl"):
        assert main(cli_args(tiny_llama_dir, method, tmp_path / method)) == 0
        runs[method] = read(tmp_path / method)
        assert TUNE_KEYS | {"method", "options"} <= set(runs[method]), method
        assert runs[method]["method"] == method
        assert_same_states(runs[method]["zero_shot"], tuned["zero_shot"])
        assert_same_states(runs[method]["calibrated_zero_shot"], tuned["calibrated_zero_shot"])
    printed = capsys.readouterr().out
    assert "calibrated zero" in printed
    assert f"results in {tmp_path / 'icl'}/results.json" in printed
    assert_same_states(runs["zero-shot"]["tuned"], tuned["zero_shot"])
    assert_same_states(runs["calibrated"]["tuned"], tuned["calibrated_zero_shot"])
    # the calibrated zero state is what a server built with calibrate=True reports
    server = build_server(tiny(tiny_llama_dir, calibrate=True).server_spec())
    assert runs["calibrated"]["tuned"]["test"] == pytest.approx(server.evaluate("test"))
    assert "uncalibrated_accuracy" in runs["calibrated"]["tuned"]["test"]
    # ICL: the same examples, with 4 demonstrations per class in front of each
    icl = runs["icl"]
    assert icl["demonstrations"] == 8
    assert icl["server"]["split_sizes"] == tuned["server"]["split_sizes"]
    assert icl["server"]["train_tokens"] > tuned["server"]["train_tokens"] + 32 * 8 * 5
    assert any("8 demonstrations in every prompt" in n for n in icl["notes"])


def test_icl_drops_demonstrations_that_do_not_fit(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "icl"
    assert main(cli_args(tiny_llama_dir, "icl", out, "--context", "110")) == 0
    results = read(out)
    assert 1 <= results["demonstrations"] < 8
    assert results["context"] == 110
    assert any("demonstrations fit the context of 110 tokens" in n for n in results["notes"])
    assert (out / "baseline.yaml").is_file() and (out / "config.yaml").is_file()


def test_lora_starts_at_the_zero_state_and_trains_through_the_server(tiny_llama_dir, tmp_path):
    """Step 0 of gradient-lora evaluates exactly as zero-shot; its training forward is the
    server's; a gradient step changes what the server evaluates."""
    config = tiny(tiny_llama_dir)
    options = get_method("gradient-lora").resolve({})
    ctx = prepare_context("gradient-lora", config, options, tmp_path / "never")
    server = ctx.server
    before = {s: server.evaluate(s) for s in ("train", "dev", "test")}
    calibrated = server.evaluate("train", calibrate=True)
    params = add_lora(ctx, "gradient-lora", ["q", "v"], rank=4, lora_alpha=8.0)
    assert len(params) == 2 * 2 * 3  # (A, B) x (q, v) x 3 layers
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in params)
    for split, metrics in before.items():
        assert server.evaluate(split) == pytest.approx(metrics, abs=1e-6), split
    loss, accuracy = train_loss(server, "ce", calibrate=False)
    assert float(loss.detach()) == pytest.approx(before["train"]["loss"], abs=1e-5)
    assert accuracy == pytest.approx(before["train"]["accuracy"])
    loss_cal, _ = train_loss(server, "ce", calibrate=True)
    assert float(loss_cal.detach()) == pytest.approx(calibrated["loss"], abs=1e-5)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=1e-2)
    loss.backward()
    optimizer.step()
    after = server.evaluate("train")["loss"]
    assert after < before["train"]["loss"] - 1e-4  # LoRA is live in the server's forward
    assert not (tmp_path / "never").exists()


def test_mezo_perturbation_returns_to_the_same_weights():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(3))]
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        perturb(params, seed=123, scale=1e-2)
        moved = [p.detach().clone() for p in params]
        perturb(params, seed=123, scale=-2e-2)
        perturb(params, seed=123, scale=1e-2)
    for p, s, m in zip(params, start, moved, strict=True):
        assert not torch.equal(m, s)
        assert torch.allclose(p, s, atol=1e-6)


def test_gradient_and_mezo_runs_on_a_tiny_model(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "grad"
    args = ["--steps", "6", "--eval-every", "3", "--lr", "1e-2"]
    assert main(cli_args(tiny_llama_dir, "gradient-lora", out, *args)) == 0
    grad = read(out)
    assert TUNE_KEYS | {"method", "options"} <= set(grad)
    assert grad["options"]["lr"] == 1e-2 and grad["options"]["targets"] == ["q", "v"]
    assert grad["evaluations"] == 6 and grad["best_dev_step"] in (0, 3, 6)
    assert grad["best_dev_evals"] == grad["best_dev_step"]
    assert grad["train_loss"]["last"] < grad["train_loss"]["first"]
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "dev"] == [0, 3, 6]
    assert [x["step"] for x in lines if x["kind"] == "generation"] == list(range(1, 7))
    dev0 = next(x for x in lines if x["kind"] == "dev")["dev"]
    assert dev0 == pytest.approx(grad["zero_shot"]["dev"], abs=1e-6)  # step 0 = zero-shot
    best = max(
        (x for x in lines if x["kind"] == "dev"),
        key=lambda x: (x["dev"]["accuracy"], -x["dev"]["loss"], -x["step"]),
    )
    assert grad["tuned"]["dev"] == best["dev"] and grad["best_dev_step"] == best["step"]
    assert (out / "lora.safetensors").is_file()
    assert "best dev at step" in capsys.readouterr().out

    out = tmp_path / "mezo"
    args = ["--steps", "4", "--eval-every", "2", "--lr", "1e-2", "--calibrate"]
    assert main(cli_args(tiny_llama_dir, "mezo-lora", out, *args)) == 0
    mezo = read(out)
    assert mezo["method"] == "mezo-lora" and mezo["options"]["calibrate"] is True
    assert mezo["evaluations"] == 8 and mezo["skipped_steps"] == 0
    assert "uncalibrated_accuracy" in mezo["tuned"]["test"]  # scored calibrated
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [x for x in steps if x["kind"] == "generation"]
    assert [x["evals"] for x in steps] == [2, 4, 6, 8]
    assert len({x["projected_grad"] for x in steps}) == 4  # a new direction every step


def test_paper_methods_use_the_paper_settings(tmp_path, tiny_llama_dir, capsys):
    paper = yaml.safe_load((ROOT / "experiments/configs/paper_default.yaml").read_text())
    for key, value in paper.items():
        if key in PAPER:
            assert PAPER[key] == value, key
    base = tiny(tiny_llama_dir, targets=["v"], alpha=0.05, layers="top:1")
    f_lora = paper_config(base, "fwa", get_method("f-lora").resolve({"budget": 60}))
    assert (f_lora.optimizer, f_lora.fwa_variant, f_lora.targets) == ("fwa", "dynfwa", ["q", "k"])
    assert (f_lora.alpha, f_lora.sigma, f_lora.layers, f_lora.budget) == (1.0, 1.0, "all", 60)
    out = tmp_path / "c-lora"
    assert (
        main(cli_args(tiny_llama_dir, "c-lora", out, "--budget", "60", "--eval-every", "20")) == 0
    )
    results = read(out)
    assert results["method"] == "c-lora" and results["evaluations"] == 60
    assert TUNE_KEYS <= set(results)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optimizer"], saved["targets"], saved["intrinsic_dim"]) == (
        "cma",
        ["q", "k"],
        500,
    )
    assert (out / "tuned.safetensors").is_file()


def test_sweep_runs_baselines_and_skips_them_when_done(tmp_path, tiny_llama_dir):
    from dfo_lora.sweep import load_sweep, run_sweep

    sweep = tmp_path / "sweep.yaml"
    spec = {
        "out": str(tmp_path / "runs"),
        "grid": {"method": ["calibrated", "gradient-lora"]},
        "config": {
            "model": str(tiny_llama_dir),
            "test_limit": 24,
            "dtype": "fp32",
            "baseline": {"gradient-lora": {"steps": 2, "eval_every": 1}},
        },
    }
    sweep.write_text(yaml.safe_dump(spec))
    loaded = load_sweep(sweep)
    assert [(r.baseline, r.config.backend) for r in loaded.runs] == [
        ("calibrated", "local"),
        ("gradient-lora", "local"),
    ]
    assert loaded.runs[1].options == {"steps": 2, "eval_every": 1}
    summary = run_sweep(sweep, echo=lambda *_: None)
    assert (summary["done"], summary["failed"]) == (2, 0)
    records = [json.loads(x) for x in Path(summary["jsonl"]).read_text().splitlines()]
    assert [r["params"]["method"] for r in records] == ["calibrated", "gradient-lora"]
    calibrated = read(tmp_path / "runs" / records[0]["dir"])
    assert records[0]["test"] == calibrated["tuned"]["test"]["accuracy"]
    assert records[0]["calibrated_zero_shot_test"] == records[0]["test"]
    assert read(tmp_path / "runs" / records[1]["dir"])["steps"] == 2
    again = run_sweep(sweep, echo=lambda *_: None)
    assert (again["done"], again["skipped"]) == (0, 2)
    spec["config"]["baseline"] = {"mezo-lora": {"epz": 1}}
    sweep.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="did you mean 'eps'"):
        load_sweep(sweep)


@pytest.fixture
def two_by_two_sweep(tmp_path, tiny_llama_dir) -> Path:
    """A 2 x 2 grid (method x seed) of cheap baselines, written out in a sweep file."""
    sweep = tmp_path / "sweep.yaml"
    spec = {
        "out": str(tmp_path / "runs"),
        "grid": {"method": ["zero-shot", "calibrated"], "seed": [1, 2]},
        "config": {"model": str(tiny_llama_dir), "test_limit": 16, "dtype": "fp32"},
    }
    sweep.write_text(yaml.safe_dump(spec))
    return sweep


def test_sweep_only_runs_part_of_the_grid_into_the_whole_sweeps_folders(tmp_path, two_by_two_sweep):
    from dfo_lora.sweep import run_sweep

    sweep = two_by_two_sweep
    quiet = {"echo": lambda *_: None}

    def lines() -> list[str]:
        return [json.loads(x)["dir"] for x in (tmp_path / "runs" / "sweep.jsonl").open()]

    part = run_sweep(sweep, only=["method=calibrated", "seed=2"], **quiet)
    assert (part["done"], part["skipped"]) == (1, 0)
    finished = [p.parent.name for p in (tmp_path / "runs").glob("*/results.json")]
    assert finished == ["method=calibrated__seed=2"]  # the others not even started
    assert [p.name for p in (tmp_path / "runs").iterdir() if p.is_dir()] == [finished[0]]
    assert lines() == ["method=calibrated__seed=2"]
    part = run_sweep(sweep, only=["seed=1", "method=zero-shot,calibrated"], **quiet)
    assert (part["done"], part["skipped"]) == (2, 1)  # the finished run is read back, not run
    assert lines() == [
        "method=zero-shot__seed=1",
        "method=calibrated__seed=1",
        "method=calibrated__seed=2",
    ]  # grid order, every finished run
    kept = read(tmp_path / "runs" / "method=calibrated__seed=2")
    whole = run_sweep(sweep, **quiet)
    assert (whole["done"], whole["skipped"]) == (1, 3)
    assert read(tmp_path / "runs" / "method=calibrated__seed=2") == kept
    assert len(lines()) == 4
    apart = run_sweep(sweep, out=tmp_path / "apart", **quiet)  # the whole grid in one go
    assert apart["done"] == 4
    for name in lines():  # the runs made part by part read as the whole sweep's
        alone, together = read(tmp_path / "runs" / name), read(tmp_path / "apart" / name)
        assert alone["tuned"] == together["tuned"] and alone["zero_shot"] == together["zero_shot"]


@pytest.mark.parametrize(
    "only, message",
    [
        (["seed"], r"sweep.yaml: --only 'seed': expected KEY=VALUE\[,VALUE...\]$"),
        (["seed=1,"], r"--only 'seed=1,': expected KEY=VALUE"),
        (
            ["sed=1"],
            r"--only sed=1: 'sed' is not a grid axis \(axes: method, seed\); did you mean 'seed'",
        ),
        (["seed=3"], r"--only seed=3: '3' is not in the grid's seed \(1, 2\)$"),
        (["method=calibrated,icl"], r"'icl' is not in the grid's method \(zero-shot, calibrated\)"),
    ],
)
def test_sweep_only_bad_values_are_one_line_exit_2(
    tmp_path, two_by_two_sweep, capsys, only, message
):
    from dfo_lora.sweep import load_sweep

    sweep = two_by_two_sweep
    with pytest.raises(UserError, match=message):
        load_sweep(sweep, only=only)
    capsys.readouterr()
    args = [x for value in only for x in ("--only", value)]
    assert main(["sweep", str(sweep), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only" in err[0]
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.fixture
def one_torch_thread():
    """This process on one torch thread, as each sweep worker under OMP_NUM_THREADS=1:
    the thread count changes fp32 GEMM rounding on some CPUs (AVX-512 without AMX)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_local_sweep_runs_cells_in_worker_processes_with_the_same_results(
    tmp_path, tiny_llama_dir, monkeypatch, one_torch_thread
):
    """`concurrency: 2` with backend local runs two cells at a time, each in its own
    process; the cells' results and tuned tensors equal those of the one-at-a-time
    sweep, and a failing cell is reported in its line without stopping the others."""
    from safetensors.torch import load_file

    from dfo_lora.sweep import local_threads, run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert local_threads(2) == 1
    spec = {
        "grid": {"method": ["calibrated", "esgrad"], "seed": [3]},
        "config": {
            "model": str(tiny_llama_dir),
            "test_limit": 16,
            "dtype": "fp32",
            "budget": 12,
            "popsize": 4,
            "intrinsic_dim": 8,
            "commit": "mean",
            "backend": "local",  # a sweep's default is Ray
        },
    }
    summaries = {}
    for concurrency in (1, 2):
        spec["out"] = str(tmp_path / f"runs{concurrency}")
        spec["concurrency"] = concurrency
        sweep = tmp_path / f"sweep{concurrency}.yaml"
        sweep.write_text(yaml.safe_dump(spec))
        summaries[concurrency] = run_sweep(sweep, echo=lambda *_: None)
        assert (summaries[concurrency]["done"], summaries[concurrency]["failed"]) == (2, 0)
    lines = {
        c: [json.loads(x) for x in Path(s["jsonl"]).read_text().splitlines()]
        for c, s in summaries.items()
    }
    assert [r["test"] for r in lines[1]] == [r["test"] for r in lines[2]]
    for one, two in zip(lines[1], lines[2], strict=True):
        first, second = tmp_path / "runs1" / one["dir"], tmp_path / "runs2" / two["dir"]
        assert read(first)["tuned"] == read(second)["tuned"]
        if (first / "tuned.safetensors").is_file():
            a, b = load_file(first / "tuned.safetensors"), load_file(second / "tuned.safetensors")
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spec["out"] = str(tmp_path / "runs-bad")
    spec["config"]["model"] = str(tmp_path / "no-such-model")
    sweep = tmp_path / "sweep-bad.yaml"
    sweep.write_text(yaml.safe_dump(spec))
    bad = run_sweep(sweep, echo=lambda *_: None)
    assert (bad["done"], bad["failed"]) == (0, 2)
    errors = [json.loads(x)["error"] for x in Path(bad["jsonl"]).read_text().splitlines()]
    assert all("no-such-model" in e and "\n" not in e for e in errors), errors


@pytest.mark.integration
def test_gradient_lora_on_smollm2_lowers_train_loss(tmp_path):
    config = TuneConfig(model="smollm2-135m", task="sst2", seed=42, test_limit=50).validate()
    options = {"steps": 2, "eval_every": 2, "lr": 1e-3}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on 2 shared, busy cores ran this ~10x slower
    try:
        results = run_baseline("gradient-lora", config, options, tmp_path / "run", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert TUNE_KEYS | {"method", "options", "steps", "train_loss"} <= set(read(tmp_path / "run"))
    assert results["train_loss"]["last"] < results["train_loss"]["first"]
    assert results["peak_mem_bytes"] > 0 and results["wall_time_s"] > 0
    assert results["server"]["split_sizes"] == {"train": 32, "dev": 32, "test": 50}


def test_readme_documents_every_method_and_option():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Baselines") :]
    for name, method in methods().items():
        assert f"`{name}`" in section, name
        for option in method.options:
            assert f"`--{option.replace('_', '-')}`" in section, (name, option)


def test_a_sweep_of_baselines_beside_a_search_with_optimizer_options(tmp_path):
    """A baseline in the grid keeps the config's search settings (here esgrad's step
    length), so a sweep can run baselines beside a search whose optimizer has options."""
    from dfo_lora.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(
        "out: runs\n"
        "config: {model: tiny, optimizer: esgrad, commit: mean, optimizer_options: {lr: 0.4}}\n"
        "grid: {method: [zero-shot, esgrad]}\n"
    )
    runs = load_sweep(path).runs
    assert [run.baseline for run in runs] == ["zero-shot", None]
    assert [run.config.optimizer for run in runs] == ["esgrad", "esgrad"]
    assert runs[0].config.optimizer_options == {"lr": 0.4}
