"""The quality benchmark's reader (experiments/quality/summarize.py) and its paper sweep."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "quality" / "summarize.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
AMX = {"cpu": "Test CPU", "cpu_flags": ["amx_bf16", "avx512_bf16", "avx512f", "avx2"]}


def load_script(name: str, path: Path):
    """An experiments/ script (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarizer = load_script("quality_summarize", SCRIPT)


def load_spaces_summarizer():
    path = ROOT / "experiments" / "quality" / "spaces" / "summarize.py"
    return load_script("spaces_summarize", path)


def run_script(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def fake_run(
    folder: Path,
    *,
    task: str,
    seed: int,
    test: float,
    optimizer: str = "cma",
    method: str | None = None,
    calibrated: float = 0.5,
    machine: dict = AMX,
    dtype: str = "bfloat16",
    machines: list | None = None,
    **config,
) -> Path:
    """A finished run folder as tune (method None) or a baseline writes it."""
    folder.mkdir(parents=True)
    values = {"model": "smollm2-135m", "task": task, "seed": seed, "k": 16}
    values.update({"optimizer": optimizer, "fwa_variant": "dynfwa", **config})
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    results = {
        "metric": "accuracy",
        "tuned": {"dev": {"accuracy": test + 0.1}, "test": {"accuracy": test}},
        "zero_shot": {"dev": {"accuracy": 0.4}, "test": {"accuracy": 0.45}},
        "calibrated_zero_shot": {"dev": {"accuracy": 0.5}, "test": {"accuracy": calibrated}},
        "evaluations": 600,
        "wall_time_s": 100.0 + seed,
        "peak_mem_bytes": 2_000_000_000,
        "versions": {"machine": "x86_64", "gpu": None, **machine},
        "server": {"device": "cpu", "dtype": dtype},
    }
    if method:
        results["method"] = method
    if machines is not None:
        results["machines"] = machines
    (folder / "results.json").write_text(json.dumps(results))
    return folder


TESTS = {  # (method, task) -> test accuracy of seeds 13 and 42
    ("cma", "sst2"): (0.70, 0.80),
    ("cma", "rte"): (0.50, 0.60),
    ("gradient-lora", "sst2"): (0.85, 0.85),
    ("gradient-lora", "rte"): (0.60, 0.70),
    ("calibrated", "sst2"): (0.74, 0.74),
}


@pytest.fixture()
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    records = []
    for (method, task), values in TESTS.items():
        for seed, test in zip((13, 42), values, strict=True):
            name = f"task={task}__seed={seed}__method={method}"
            baseline = None if method == "cma" else method
            fake_run(root / name, task=task, seed=seed, test=test, method=baseline)
            params = {"task": task, "seed": seed, "method": method}
            records.append({"run": name, "dir": name, "params": params, "status": "done"})
    records.append({"run": "x", "dir": "x", "params": {}, "status": "failed", "error": "boom"})
    (root / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def outputs(tmp_path) -> list:
    return [tmp_path / "q" / "results.jsonl", tmp_path / "q" / "table.md", tmp_path / "q" / "p.png"]


def table_rows(markdown: str) -> dict[str, list[str]]:
    """First table of the first section: method -> its cells."""
    rows = {}
    for line in markdown.split("\n\n")[2].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_table_numbers_rows_and_plot_from_a_sweep(sweep, tmp_path):
    results, table, plot = outputs(tmp_path)
    done = run_script(sweep, "--results", results, "--table", table, "--plot", plot)
    assert done.returncode == 0, done.stderr
    assert "x failed: boom" in done.stderr  # a failed run is reported, not tabulated
    text = table.read_text()
    assert text in done.stdout
    assert "### smollm2-135m, k = 16; machine: CPU amx_bf16+avx512_bf16+avx512f+avx2, bf" in text
    rows = table_rows(text)
    assert list(rows) == ["calibrated", "cma", "gradient-lora"]  # baselines first, ceiling last
    assert rows["cma"] == ["75.0 ± 5.0 (2)", "55.0 ± 5.0 (2)", "65.0"]
    assert rows["gradient-lora"] == ["85.0 ± 0.0 (2)", "65.0 ± 5.0 (2)", "75.0"]
    assert rows["calibrated"] == ["74.0 ± 0.0 (2)", "—", "—"]  # no average without every task
    gain = text.split("Test minus the calibrated zero state")[1]
    assert "| cma | 25.0 ± 5.0 (2) | 5.0 ± 5.0 (2) | 15.0 |" in gain
    assert "| gradient-lora | 4 | 128 | 2.00 |" in text  # runs, mean wall time, peak GB

    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert len(lines) == 10
    row = next(r for r in lines if (r["method"], r["task"], r["seed"]) == ("cma", "rte", 42))
    assert row["test"] == 0.60 and row["dev"] == pytest.approx(0.70)
    assert row["calibrated_test"] == 0.5 and row["zero_shot_test"] == 0.45
    assert row["cpu_flags"] == AMX["cpu_flags"] and row["dtype"] == "bfloat16"
    assert row["wall_time_s"] == 142.0 and row["peak_mem_bytes"] == 2_000_000_000
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 1000

    before = results.read_bytes()  # summarizing again changes nothing
    assert run_script(sweep, "--results", results, "--table", table, "--plot", plot).returncode == 0
    assert results.read_bytes() == before


def test_rows_merge_and_other_machines_get_their_own_table(sweep, tmp_path):
    results, table, plot = outputs(tmp_path)
    summarizer.summarize([sweep], results, table, plot)
    other = tmp_path / "avx2"
    fake_run(
        other / "r1",
        task="sst2",
        seed=13,
        test=0.61,
        machine={"cpu_flags": ["avx2"]},
        dtype="float32",
    )
    fake_run(
        other / "r2",
        task="sst2",
        seed=42,
        test=0.63,
        machine={"cpu_flags": ["avx2"]},
        dtype="float32",
    )
    out = summarizer.summarize([other], results, table, plot)
    assert out["rows"] == 12 and out["new"] == 2
    sections = table.read_text().split("### ")[1:]
    assert len(sections) == 2
    amx = next(s for s in sections if "amx_bf16" in s)
    avx2 = next(s for s in sections if "machine: CPU avx2, float32" in s)
    assert "| cma | 62.0 ± 1.0 (2) | 62.0 |" in avx2 and "62.0" not in amx
    assert "75.0 ± 5.0 (2)" in amx and "75.0" not in avx2
    assert len(out["plots"]) == 2 and all(
        p.read_bytes().startswith(PNG_SIGNATURE) for p in out["plots"]
    )
    assert [p.name for p in out["plots"]] != ["p.png", "p.png"]
    only = summarizer.summarize([], results, table, plot, machine="avx2, float32")
    assert only["markdown"].count("### ") == 1 and "62.0" in only["markdown"]

    # a later run of the same (machine, model, k, task, method, seed) replaces its row
    again = tmp_path / "again"
    fake_run(
        again / "r1",
        task="sst2",
        seed=13,
        test=0.65,
        machine={"cpu_flags": ["avx2"]},
        dtype="float32",
    )
    out = summarizer.summarize([again], results, table, plot)
    assert out["rows"] == 12
    assert "| cma | 64.0 ± 1.0 (2) | 64.0 |" in table.read_text()


def test_a_run_resumed_on_another_machine_is_marked(tmp_path):
    """It stays in the table of the machine that finished it, marked, with its machines."""
    results, table, plot = outputs(tmp_path)
    avx2 = {"cpu": "Old CPU", "cpu_flags": ["avx2"], "gpu": None}
    unknown = {"cpu": None, "cpu_flags": None, "gpu": None}
    fake_run(tmp_path / "s" / "a", task="sst2", seed=13, test=0.70, machines=[avx2, AMX])
    fake_run(tmp_path / "s" / "b", task="sst2", seed=42, test=0.80, machines=[AMX])
    fake_run(tmp_path / "s" / "c", task="rte", seed=13, test=0.50, machines=[unknown, AMX])
    fake_run(tmp_path / "s" / "d", task="sst2", seed=13, test=0.74, method="calibrated")
    out = summarizer.summarize([tmp_path / "s"], results, table, plot)
    text = out["markdown"]
    assert text.count("### ") == 1  # one machine group: the finishing machine's
    assert table_rows(text)["cma"] == ["75.0 ± 5.0 (2) ‡", "50.0 (1) ‡", "62.5"]
    assert table_rows(text)["calibrated"] == ["74.0 (1)", "—", "—"]
    assert (
        "‡ cma on sst2, seed 13: resumed, ran on Old CPU (CPU avx2), then "
        "Test CPU (CPU amx_bf16+avx512_bf16+avx512f+avx2)." in text
    )
    assert "‡ cma on rte, seed 13: resumed, ran on a machine not recorded (a checkpoint" in text
    assert text.count("‡ cma on sst2") == 1  # under the first table only
    assert "seed 42" not in text
    rows = {(r["task"], r["seed"]): r for r in map(json.loads, results.read_text().splitlines())}
    assert rows[("sst2", 42)]["ran_on"] is None and len(rows[("sst2", 13)]["ran_on"]) == 2


def test_method_name_rule(tmp_path):
    def method(folder, label=None, grid=None, **kw):
        return summarizer.read_run(fake_run(tmp_path / folder, **kw), label, grid)["method"]

    common = dict(task="sst2", seed=13, test=0.7)
    assert method("a", **common) == "cma"
    assert method("b", optimizer="fwa", **common) == "fwa"
    assert method("c", optimizer="fwa", fwa_variant="bbfwa", **common) == "fwa(bbfwa)"
    assert method("d", label="rec", **common) == "cma/rec"
    assert method("e", label="rec", method="gradient-lora", **common) == "gradient-lora"
    grid = {"task": "sst2", "seed": 13, "method": "cma", "alpha": 0.02, "targets": ["q", "v"]}
    assert method("f", grid=grid, **common) == "cma/alpha=0.02,targets=q+v"
    assert method("g", label="rec", grid=grid, **common) == "cma/rec"
    folder = fake_run(tmp_path / "i", **common)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump({**config, "label": "mine"}))
    assert summarizer.read_run(folder, "rec")["method"] == "cma/mine"  # explicit label wins


def test_bad_input_is_one_line_exit_2(sweep, tmp_path):
    results, table, plot = outputs(tmp_path)
    args = ["--results", results, "--table", table, "--plot", plot]

    def error(*extra) -> str:
        done = run_script(*extra, *args)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        return lines[0]

    assert "no such folder" in error(tmp_path / "missing")
    results.parent.mkdir()
    results.write_text('{"method": "cma"}\nnot json\n')
    assert f"{results} line 1: not a results row" in error(sweep)
    results.unlink()
    broken = tmp_path / "broken"
    (broken / "r").mkdir(parents=True)
    (broken / "r" / "results.json").write_text("{")
    assert "results.json: cannot read" in error(broken)
    assert not results.exists()  # nothing written for bad input


@pytest.fixture(scope="module")
def real_run(tiny_llama_dir, tmp_path_factory):
    """One tiny-model run through the `dfo-lora tune` command."""
    out = tmp_path_factory.mktemp("real") / "sst2-cma"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfo_lora.cli",
            "tune",
            "--model",
            str(tiny_llama_dir),
            "--task",
            "sst2",
            "--test-limit",
            "20",
            "--popsize",
            "6",
            "--budget",
            "18",
            "--intrinsic-dim",
            "60",
            "--dtype",
            "fp32",
            "--quiet",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return out


def test_a_real_tune_run_records_its_machine(real_run, tmp_path):
    results, table, plot = outputs(tmp_path)
    out = summarizer.summarize([real_run.parent], results, table, plot)
    (row,) = [json.loads(x) for x in results.read_text().splitlines()]
    saved = json.loads((real_run / "results.json").read_text())
    assert row["method"] == "cma" and row["task"] == "sst2" and row["seed"] == 42
    assert row["test"] == saved["tuned"]["test"]["accuracy"]
    assert row["calibrated_test"] == saved["calibrated_zero_shot"]["test"]["accuracy"]
    assert row["dtype"] == "float32" and row["device"] == "cpu"
    cpuinfo = Path("/proc/cpuinfo").read_text().split()
    assert row["cpu_flags"] == [
        f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in cpuinfo
    ]
    assert f"| cma | {100 * row['test']:.1f} (1) | {100 * row['test']:.1f} |" in out["markdown"]


PAPER_ROWS = ["zero-shot", "calibrated", "icl", "adapter", "lora", "bitfit", "p-tuning-v2"]
PAPER_ROWS += ["bbt", "bbtv2", "mezo-lora", "c-lora", "f-lora"]


def test_paper_sweep_on_a_tiny_model_gives_the_table_and_plot(tiny_llama_dir, tmp_path):
    """experiments/paper/table.yaml (its rows: a space and an optimizer each), shrunk: a
    tiny model, 2 tasks, 2 seeds, short budgets, local backend; the summarizer names each
    run by its row and prints the published reference rows beside ours."""
    from dfo_lora.sweep import load_sweep, run_sweep

    path = ROOT / "experiments" / "paper" / "table.yaml"
    paper = yaml.safe_load(path.read_text())
    assert paper["grid"]["task"] == [
        "sst2",
        "yelp_polarity",
        "agnews",
        "dbpedia",
        "mrpc",
        "snli",
        "rte",
    ]
    assert paper["grid"]["seed"] == [13, 21, 42, 87, 100]
    assert paper["grid"]["model"] == ["roberta-large"] and paper["config"]["budget"] == 8000
    assert paper["config"]["backend"] == "ray" and paper["grid"]["row"] == PAPER_ROWS
    runs = load_sweep(path).runs
    assert len(runs) == 7 * 5 * len(PAPER_ROWS)
    kinds = {r.params["row"]: (r.baseline or r.config.optimizer, r.config.space) for r in runs}
    assert kinds["adapter"] == ("gradient", "series") and kinds["bitfit"] == ("gradient", "bitfit")
    assert kinds["lora"] == ("gradient-lora", "lora") and kinds["c-lora"] == ("cma", "lora")
    assert kinds["bbt"] == ("cma", "prompt") and kinds["bbtv2"] == ("cma", "deep-prompt")
    assert kinds["p-tuning-v2"] == ("gradient", "deep-prompt")

    tiny = dict(paper)
    tiny["out"] = str(tmp_path / "sweep")
    tiny["grid"] = {
        **paper["grid"],
        "model": [str(tiny_llama_dir)],
        "task": ["sst2", "rte"],
        "seed": [13, 42],
    }
    short = {"steps": 2, "eval_every": 1}
    tiny["rows"] = {
        **paper["rows"],
        "icl": {"method": "icl", "options": {"demos_per_class": 1}},
        "adapter": {**paper["rows"]["adapter"], "options": short},
        "lora": {"method": "gradient-lora", "options": short},
        "bitfit": {**paper["rows"]["bitfit"], "options": short},
        # a short prompt: the tiny model holds 64 positions
        "p-tuning-v2": {**paper["rows"]["p-tuning-v2"], "prompt_length": 3, "options": short},
        "bbt": {**paper["rows"]["bbt"], "prompt_length": 3},
        "bbtv2": {**paper["rows"]["bbtv2"], "prompt_length": 3},
        "mezo-lora": {"method": "mezo-lora", "options": short},
    }
    tiny["config"] = {
        **paper["config"],
        **dict(budget=18, popsize=6, intrinsic_dim=60, eval_every=6, test_limit=16),
        **dict(dtype="fp32", backend="local", gpus_per_server=0),
    }
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(yaml.safe_dump(tiny, sort_keys=False))  # grid order = folder names
    done = run_sweep(sweep_file, echo=lambda *_: None)
    assert done["failed"] == 0 and done["done"] == 2 * 2 * len(PAPER_ROWS)

    results, table, plot = outputs(tmp_path)
    reference = ROOT / "experiments" / "paper" / "reference.jsonl"
    out = summarizer.summarize([tmp_path / "sweep"], results, table, plot, reference=reference)
    assert out["new"] == 4 * len(PAPER_ROWS) and not out["notes"]
    rows = table_rows(out["markdown"])
    bbtv2 = "BBTv2, RoBERTa-large (DFO-LoRA paper's text) (reference)"
    assert list(rows) == [*PAPER_ROWS, bbtv2]  # the paper's row order, its figures last
    assert rows[bbtv2] == ["90.3", "56.7", "73.5"]  # sst2, rte and their mean
    for method in PAPER_ROWS:  # every cell recomputed from the runs' results.json
        cells = rows[method]
        means = []
        for task, cell in zip(["sst2", "rte"], cells, strict=False):
            tests = []
            for seed in (13, 42):
                run = (
                    tmp_path
                    / "sweep"
                    / f"model=tiny-llama*__task={task}__seed={seed}__row={method}"
                )
                (folder,) = run.parent.glob(run.name)
                saved = json.loads((folder / "results.json").read_text())
                tests.append(100 * saved["tuned"]["test"]["accuracy"])
            assert cell == f"{np.mean(tests):.1f} ± {np.std(tests):.1f} (2)", (method, task)
            means.append(np.mean(tests))
        assert cells[2] == f"{np.mean(means):.1f}"
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 1000


def test_replayed_final_state_equals_a_select_final_run(tiny_llama_dir, tmp_path, capsys):
    """experiments/quality/replay_final.py scores a finished run's last state: the same
    numbers a `tune --select final` run of the same search reports (selection does not
    steer the search), and its results rows carry them under their own method name."""
    from dfo_lora.search.run import tune
    from tests.test_search import tiny_config

    replay = load_script("replay_final", ROOT / "experiments" / "quality" / "replay_final.py")

    selected = tune(tiny_config(tiny_llama_dir, select="metric"), tmp_path / "sweep" / "a")
    final = tune(tiny_config(tiny_llama_dir, select="final"), tmp_path / "b", progress=False)
    assert selected["best_dev_evals"] < selected["evaluations"]  # best and final states differ
    out, results = tmp_path / "replays.jsonl", tmp_path / "results.jsonl"
    argv = [str(tmp_path / "sweep"), "--out", str(out), "--results", str(results)]
    assert replay.main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["selected_test"] == row["selected_test_replayed"]
    assert row["selected_test"] == selected["tuned"]["test"]["accuracy"]
    assert row["final_test"] == final["tuned"]["test"]["accuracy"]
    assert row["final_dev"] == final["tuned"]["dev"]["accuracy"]
    assert replay.main(argv) == 0  # resumable: nothing replayed twice
    assert len(out.read_text().splitlines()) == 1
    (merged,) = summarizer.load_rows(results)
    assert merged["method"] == "cma/recommended+final" and merged["test"] == row["final_test"]

    # The spaces record reads the same run under both rules, reusing the replay.
    spaces = load_spaces_summarizer()
    argv = [str(tmp_path / "sweep"), "--replays", str(out), "--out", str(tmp_path)]
    assert spaces.main([*argv, "--quality-results", str(tmp_path / "none.jsonl")]) == 0
    assert len(out.read_text().splitlines()) == 1
    name = spaces.space_of(tmp_path / "sweep" / "a")
    tests = {r["method"]: r["test"] for r in summarizer.load_rows(tmp_path / "results.jsonl")}
    assert tests == {
        f"{name}/dev-selected": row["selected_test"],
        f"{name}/last": row["final_test"],
    }
    assert f"| {name}/last |" in (tmp_path / "table.md").read_text()

    # A replay that does not reproduce the run's own number is refused, not written.
    reported = json.loads((tmp_path / "sweep" / "a" / "results.json").read_text())
    reported["tuned"]["test"]["loss"] += 1e-3
    (tmp_path / "sweep" / "a" / "results.json").write_text(json.dumps(reported))
    out.unlink()
    capsys.readouterr()  # the tune runs' progress bars
    assert replay.main(argv[:1] + ["--out", str(out)]) == 2
    assert not out.exists()
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "the selected state replays at test accuracy" in message


def test_spaces_per_seed_table_puts_each_seed_on_its_line():
    spaces = load_spaces_summarizer()
    rows = [
        {"method": m, "task": t, "seed": sd, "test": test, "calibrated_test": 0.5}
        for m, t, sd, test in [
            ("hydra/last", "mr", 13, 0.49),
            ("lora/last", "mr", 13, 0.52),
            ("lora/last", "sst2", 42, 0.6),
            ("lora/dev-selected", "sst2", 42, 0.9),  # not a last state: not shown
            ("lora/last", "mr", 42, 0.5),
        ]
    ]
    lines = spaces.per_seed_table(rows).splitlines()
    assert lines[0] == "| task, seed | lora | hydra |"
    assert lines[2:] == [
        "| mr, 42 | **+0.0** |  |",
        "| mr, 13 | **+2.0** | -1.0 |",
        "| sst2, 42 | **+10.0** |  |",
    ]


@pytest.mark.parametrize(
    "config, name",
    [
        ({"space": "lora", "alpha": 0.01}, "lora"),
        ({"space": "series", "adapter_down": "pca", "alpha": 0.01}, "series-pca"),
        ({"space": "parallel", "adapter_down": "searched", "alpha": 0.1}, "parallel a=0.1"),
        ({"space": "hydra", "alpha": 0.01}, "hydra"),
        ({"space": "hydra", "a_factor": "pca", "alpha": 0.01}, "hydra-pca"),
        ({"space": "lora", "a_factor": "pca", "alpha": 0.01}, "lora"),
    ],
)
def test_spaces_record_names_each_space_from_its_config(tmp_path, config, name):
    spaces = load_spaces_summarizer()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert spaces.space_of(tmp_path) == name


def test_trajectory_averages_without_steering_the_search(tiny_llama_dir, tmp_path, monkeypatch):
    """experiments/trajectory.py --average-last scores the mean of the last K checks'
    states at each check and puts the committed state back: the trace's own numbers equal
    a trace without it, and the K = 1 average is the check's own state."""
    trajectory = load_script("trajectory", ROOT / "experiments" / "trajectory.py")
    common = ["--model", str(tiny_llama_dir), "--task", "sst2", "--test-limit", "20"]
    common += ["--popsize", "4", "--budget", "36", "--eval-every", "12", "--intrinsic-dim", "8"]
    common += ["--a-factor", "pca", "--targets", "v,o", "--commit", "mean"]
    common += ["--optimizer", "esgrad", "--select", "final"]
    rows = {}
    for name, extra in (("plain", []), ("averaged", ["--average-last", "1,2"])):
        out = tmp_path / f"{name}.jsonl"
        argv = ["trajectory.py", str(out), *extra]
        argv += ["--checkpoint", str(tmp_path / f"{name}.safetensors"), *common]
        monkeypatch.setattr(sys, "argv", argv)
        trajectory.main()
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    plain, averaged = rows["plain"], rows["averaged"]
    assert len(plain) == len(averaged) >= 3
    for a, b in zip(plain, averaged, strict=True):
        assert (a["evals"], a["train"], a["test"], a["z"]) == (
            b["evals"],
            b["train"],
            b["test"],
            b["z"],
        )
        assert b["average"]["1"]["test"] == b["test"]
    last = averaged[-1]["average"]["2"]["test"]
    assert last != averaged[-1]["test"]  # the mean of two states is another state
