"""The command line: help, tasks, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dfo_lora.cli import main


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dfo_lora.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("error: ")
    return lines[0]


def test_tune_help_explains_every_option():
    out = run_cli("tune", "--help")
    assert out.returncode == 0
    for flag in (
        "--model",
        "--task",
        "--data-dir",
        "--seed",
        "--k",
        "--budget",
        "--popsize",
        "--optimizer",
        "--rank",
        "--intrinsic-dim",
        "--targets",
        "--loss",
        "--sigma",
        "--alpha",
        "--dtype",
        "--device",
        "--out",
        "--resume",
        "--overwrite",
        "--config",
    ):
        assert flag in out.stdout, flag
    text = " ".join(out.stdout.split())
    assert (
        "(default: 8000)" in text
        and "lora, hydra: projections adapted in every layer [q,k]" in text
    )


def test_tasks_lists_every_task(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = {row["name"] for row in rows}
    assert {
        "sst2",
        "yelp_polarity",
        "agnews",
        "dbpedia",
        "mrpc",
        "snli",
        "rte",
        "sst5",
        "trec",
        "mr",
    } <= names
    sst2 = next(r for r in rows if r["name"] == "sst2")
    assert sst2["verbalizer"] == ["bad", "great"]


@pytest.fixture()
def base_args(tiny_llama_dir):
    return ["tune", "--model", tiny_llama_dir, "--task", "sst2", "--test-limit", "20", "--quiet"]


def test_bad_config_values(tmp_path, base_args, capsys):
    """In this process (cli.main, as the installed command runs it): one line, exit 2,
    no traceback, and no --out folder left behind."""
    cases = {
        ("--popsize", "abc"): "popsize: 'abc' is not a valid int",
        ("--popsize", "0"): "popsize: must be",
        ("--rank", "-1"): "rank: must be a positive integer",
        ("--intrinsic-dim", "0"): "intrinsic_dim: must be a positive integer",
        ("--optimizer", "cmaa"): "did you mean 'cma'",
        ("--loss", "mse"): "loss: 'mse' is not one of",
        ("--budget", "50"): "budget: 50 is smaller than one round",
        ("--targets", "q,zz"): "targets: 'zz' is not a projection of llama",
        ("--task", "sst3"): "sst3",
        ("--sigma", "0"): "sigma: must be a finite positive number",
        ("--alpha", "inf"): "alpha: must be a finite positive number, got inf",
        ("--z-penalty", "nan"): "z_penalty: must be a finite number >= 0, got nan",
        ("--fwa-variant", "dynfw"): "did you mean 'dynfwa'",
        ("--layers", "top:x"): "layers: 'top:x' is not all, top:N, bottom:N",
        ("--layers", "0,99"): "layers: layer 99 does not exist",
        (
            "--optimizer",
            "fwa",
            "--optimizer-options",
            "n_fireworks=30",
        ): "n_fireworks: 30 is more than",
        (
            "--optimizer",
            "fwa",
            "--optimizer-options",
            "amplitude=-1",
        ): "amplitude: -1.0 must be > 0",
        (
            "--optimizer-options",
            "n_fireworks=3",
        ): "cma.n_fireworks: unknown option for optimizer 'cma'",
        ("--optimizer-options", "bogus"): "optimizer_options: 'bogus' is not a valid dict",
        ("--optimizer", "esgrad"): "commit: esgrad steps its mean, so it needs commit: mean",
        (
            "--optimizer",
            "esgrad",
            "--commit",
            "mean",
            "--elitist",
            "true",
        ): "elitist: esgrad steps its mean",
        (
            "--optimizer",
            "esgrad",
            "--commit",
            "mean",
            "--popsize",
            "7",
        ): "esgrad.popsize: 7 must be even",
    }
    for extra, expected in cases.items():
        out = tmp_path / ("out-" + "-".join(e.strip("-") for e in extra))
        code = main([str(a) for a in (*base_args, *extra, "--out", out)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (extra, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (extra, err)
        assert expected in lines[0], (extra, lines[0])
        assert not out.exists(), extra


def test_unknown_yaml_key_gets_did_you_mean(tmp_path, base_args):
    config = tmp_path / "c.yaml"
    config.write_text("popsize: 10\nbudjet: 600\n")
    line = one_line_error(run_cli(*base_args, "--config", config, "--out", tmp_path / "o"))
    assert "unknown config key 'budjet'" in line and "did you mean 'budget'" in line
    assert str(config) in line
    config.write_text("popsize: [1, 2\n")
    line = one_line_error(run_cli(*base_args, "--config", config, "--out", tmp_path / "o"))
    assert "invalid YAML" in line and "line" in line


def test_missing_model_and_data(tmp_path, base_args):
    line = one_line_error(run_cli("tune", "--model", tmp_path / "nope", "--out", tmp_path / "o"))
    assert "nope" in line and "does not exist" in line
    line = one_line_error(
        run_cli(*base_args, "--data-dir", tmp_path / "empty", "--out", tmp_path / "o")
    )
    assert "empty" in line
    line = one_line_error(run_cli(*base_args, "--k", "100000", "--out", tmp_path / "o"))
    assert "k" in line


def test_existing_output_folder_is_not_overwritten(tmp_path, base_args):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = one_line_error(run_cli(*base_args, "--budget", "18", "--popsize", "6", "--out", out))
    assert "exists" in line and "--overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"


def test_resume_errors(tmp_path, base_args):
    out = tmp_path / "run"
    args = [*base_args, "--budget", "18", "--popsize", "6", "--intrinsic-dim", "60", "--out", out]
    assert run_cli(*args).returncode == 0
    line = one_line_error(run_cli("tune", "--resume", out, "--popsize", "8", "--quiet"))
    assert "config differs" in line and "popsize" in line
    line = one_line_error(run_cli("tune", "--resume", tmp_path / "missing", "--quiet"))
    assert "nothing to resume" in line
    (out / "checkpoint" / "state.safetensors").write_bytes(b"garbage")
    line = one_line_error(run_cli("tune", "--resume", out, "--quiet"))
    assert "corrupt" in line and "state.safetensors" in line


def test_calibrated_run_reports_the_plain_prompt_too(tmp_path, base_args):
    out = tmp_path / "run"
    args = [*base_args, "--budget", "18", "--popsize", "6", "--intrinsic-dim", "60"]
    done = run_cli(*args, "--calibrate", "true", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    zero = json.loads((out / "results.json").read_text())["zero_shot"]["test"]
    assert 0 <= zero["uncalibrated_accuracy"] <= 1
    prompt_line, calibrated_line, tuned_line = done.stdout.splitlines()[:3]
    assert prompt_line.startswith("plain prompt")
    assert f"test accuracy {zero['uncalibrated_accuracy']:.4f}" in prompt_line
    assert calibrated_line.startswith("calibrated zero state")
    assert f"test accuracy {zero['accuracy']:.4f}" in calibrated_line
    assert tuned_line.startswith("tuned")


def test_eval_scores_a_finished_run(tmp_path, base_args):
    out = tmp_path / "run"
    args = [*base_args, "--budget", "18", "--popsize", "6", "--intrinsic-dim", "60", "--out", out]
    assert run_cli(*args).returncode == 0
    results = json.loads((out / "results.json").read_text())
    evaluated = run_cli("eval", out, "--split", "test")
    assert evaluated.returncode == 0, evaluated.stderr
    got = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert got["accuracy"] == pytest.approx(results["tuned"]["test"]["accuracy"])
    zero = json.loads(run_cli("eval", out, "--zero-shot").stdout.strip().splitlines()[-1])
    assert zero["accuracy"] == pytest.approx(results["zero_shot"]["test"]["accuracy"])
    line = one_line_error(run_cli("eval", tmp_path / "none"))
    assert "tuned.safetensors" in line


def test_tune_on_an_unknown_model_type_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not_a_model"}')
    line = one_line_error(run_cli("tune", "--model", tmp_path, "--out", tmp_path / "run"))
    assert "not_a_model" in line and "config.json" in line
    assert not (tmp_path / "run").exists()


def test_summary_says_which_state_was_tested(tmp_path):
    """The tuned line names the rule: the dev-selected state, the last one or the mean of
    the path (and for average_if_fit, why)."""
    from dfo_lora.cli import summary

    split = {"accuracy": 0.5, "loss": 0.7}
    results = {
        "metric": "accuracy",
        "zero_shot": {"dev": split, "test": split},
        "tuned": {"dev": split, "test": split},
        "best_dev_evals": 600,
        "evaluations": 1200,
        "wall_time_s": 3.0,
    }
    assert "(best dev after 600 of 1200 evaluations" in summary(results, tmp_path)
    final = summary({**results, "select": "final"}, tmp_path)
    assert "(the last state, after 1200 evaluations, 3 s)" in final
    average = summary({**results, "select": "average"}, tmp_path)
    assert "(the mean of the round-end states, 1200 evaluations, 3 s)" in average
    fit = {**results, "select": "average_if_fit", "train_fit": {"accuracy": 1.0, "loss": 0.1}}
    averaged = summary({**fit, "averaged": True}, tmp_path)
    assert "round-end states, 1200 evaluations: the last state fitted train, 3 s)" in averaged
    kept = summary({**fit, "averaged": False, "train_fit": {"accuracy": 0.75}}, tmp_path)
    assert "(the last state, after 1200 evaluations: train accuracy 0.7500 < 1" in kept


def test_out_under_a_file_is_one_line(tmp_path, base_args):
    """A file-system fault (here a file where a folder is needed) is one line naming the
    path, exit 2, no traceback, for a tune and for the plot it would feed."""
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    line = one_line_error(run_cli(*base_args, "--budget", "18", "--out", blocker / "run"))
    assert str(blocker / "run") in line or str(blocker) in line, line
    assert blocker.read_text() == "mine"


def test_help_shows_the_real_defaults():
    text = run_cli("tune", "--help").stdout
    assert "(default: None)" not in text
    assert "(default: the whole split)" in text and "(default: auto)" in text
    sweep = run_cli("sweep", "--help").stdout
    assert "backend: local" in sweep and "grid:" in sweep


def test_every_run_option_is_an_option_like_the_baselines():
    """The run config's fields and the baselines' options are one type (`dfo_lora.options`):
    each field carries its Option, whose default is the field's and whose help the CLI
    prints."""
    import dataclasses

    from dfo_lora.baselines import get_method
    from dfo_lora.cli import build_parser
    from dfo_lora.config import TuneConfig
    from dfo_lora.options import Option

    defaults = TuneConfig()
    for f in dataclasses.fields(TuneConfig):
        option = f.metadata["option"]
        assert isinstance(option, Option) and option.help, f.name
        assert option.default == getattr(defaults, f.name), f.name
    assert all(isinstance(o, Option) for o in get_method("gradient-lora").options.values())
    tune_help = build_parser()._subparsers._group_actions[0].choices["tune"].format_help()
    assert "torch.compile each layer's norms and MLP" in " ".join(tune_help.split())


def test_class_dim_grows_the_space_with_the_tasks_classes(tmp_path):
    """class_dim sets d = class_dim * (C - 1) from the task (registered or a YAML file);
    the resolved config validates again to the same d (a resumed run), and an
    intrinsic_dim that disagrees, or a class_dim <= 0, is one clear error."""
    from dfo_lora.config import load_config
    from dfo_lora.errors import UserError

    dims = {
        t: load_config(None, {"task": t, "class_dim": 8}).intrinsic_dim
        for t in ("sst2", "agnews", "trec")
    }
    assert dims == {"sst2": 8, "agnews": 24, "trec": 40}
    task = tmp_path / "three.yaml"
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 0}\n')
    task.write_text(
        "name: three\nlabels: [a, b, c]\nverbalizer: [x, y, w]\n"
        'templates:\n  clm: "{text_a} :"\ndata:\n  train: t.jsonl\n  text_a: text\n  label: label\n'
    )
    config = load_config(None, {"task": str(task), "class_dim": 5})
    assert config.intrinsic_dim == 10
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml())
    assert load_config(saved).intrinsic_dim == 10
    assert (
        load_config(None, {"task": "trec", "class_dim": 8, "intrinsic_dim": 40}).intrinsic_dim == 40
    )
    with pytest.raises(
        UserError, match=r"^intrinsic_dim: 8 and class_dim: 8 \(d = 40 for the 6 classes of trec\)"
    ):
        load_config(None, {"task": "trec", "class_dim": 8, "intrinsic_dim": 8})
    with pytest.raises(UserError, match=r"^class_dim: must be a positive integer, got 0$"):
        load_config(None, {"class_dim": 0})
    with pytest.raises(UserError, match="class_dim"):
        load_config(None, {"class_dim": "many"})
