"""The docs stay in step with the code: README options, notebook code."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dfo_lora.config import TuneConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_tune_option_and_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    for f in fields(TuneConfig):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in readme, flag


def test_notebook_code_cells_compile():
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code
    for i, cell in enumerate(code):
        compile("".join(cell["source"]), f"quickstart.ipynb cell {i}", "exec")


def test_quality_sweep_runs_the_recommended_search():
    """experiments/quality/quality.yaml repeats recommended.yaml's values (a sweep file
    cannot include another file); they must not drift apart."""
    import yaml

    recommended = yaml.safe_load((ROOT / "experiments/configs/recommended.yaml").read_text())
    sweep = yaml.safe_load((ROOT / "experiments/quality/quality.yaml").read_text())
    assert {k: sweep["config"][k] for k in recommended} == recommended
    assert recommended["optimizer"] in sweep["grid"]["method"]
    assert "recommended.yaml" in (ROOT / "Makefile").read_text()  # make demo uses it
    # The sweep that measures it (rows esgrad/fitavg-1800): its grid's optimizer and config.
    lever = yaml.safe_load((ROOT / "experiments/quality/levers/esgrad-fitavg.yaml").read_text())
    values = {**lever["config"], "optimizer": lever["grid"]["optimizer"][0]}
    assert {k: values.get(k) for k in recommended} == recommended


def test_quickstart_notebook_runs_end_to_end(monkeypatch, tmp_path):
    """Every code cell of the notebook, in order, on the real SmolLM2 with a short budget
    (as Jupyter would: started in notebooks/); it prints the three numbers and draws the
    training curve."""
    import contextlib
    import io

    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    work = tmp_path / "notebooks"
    work.mkdir()
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    monkeypatch.chdir(work)
    monkeypatch.setenv("QUICKSTART_BUDGET", "60")  # one round: 30 layers x popsize 2
    monkeypatch.setenv("QUICKSTART_POPSIZE", "2")
    monkeypatch.setenv("QUICKSTART_TEST_LIMIT", "40")
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
    printed = out.getvalue()
    for name in ("plain prompt", "calibrated zero state", "tuned "):
        assert name in printed
    assert namespace["results"]["evaluations"] == 60
    png = work / "runs" / "notebook-mr" / "curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_experiment_sweep_file_loads():
    """The sweep files under experiments/quality (benchmark, levers, spaces) and
    experiments/paper are valid:
    each expands to runs whose configs pass validation, so a user can resume any of them."""
    from dfo_lora.config import load_config
    from dfo_lora.sweep import load_sweep

    files = sorted((ROOT / "experiments" / "quality").rglob("*.yaml"))
    files += sorted((ROOT / "experiments" / "paper").rglob("*.yaml"))
    # A cut-off run's folder kept between sessions (e.g. mezo-cells/) holds a run's
    # config.yaml and baseline.yaml, not sweep files: its config must load as a run's.
    kept = [f for f in files if (f.parent / "log.jsonl").is_file()]
    for path in kept:
        if path.name == "config.yaml":
            load_config(path).validate()
    files = [f for f in files if f not in kept]
    assert len(files) >= 6
    for path in files:
        sweep = load_sweep(path)
        assert sweep.runs, path
        for run in sweep.runs:
            run.config.validate()
