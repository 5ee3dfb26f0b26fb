"""Bad input is one line `error: ...`, exit code 2, no traceback, nothing written (issue 23).

Broken model folders (no weights, no tokenizer, cut files) are real tiny Llama folders with
files removed or truncated; the data is the real shared/data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dfo_lora.backbone import load_backbone
from dfo_lora.cli import main
from dfo_lora.errors import UserError
from dfo_lora.tasks import default_data_dir
from tests.test_tasks import user_error as one_line


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process: exit code 2 and exactly one `error:` line on stderr."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err  # no traceback, no notes
    return err[0]


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return default_data_dir().resolve()
    except UserError:
        beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data"
        if beside_repo.is_dir():  # pytest started from another folder
            return beside_repo
        pytest.fail("shared/data not found beside the repository (it is required)")


# ---------------------------------------------------------------- model folders


def _copy(tiny_llama_dir: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_llama_dir, folder)
    return folder


def _cut(path: Path, keep: int) -> None:
    """Keep the first `keep` bytes (negative: drop that many from the end)."""
    path.write_bytes(path.read_bytes()[:keep])


def test_model_folder_without_weights_names_the_files(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path, "noweights")
    (folder / "model.safetensors").unlink()
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert f"folder {folder} has no weights" in message and "model.safetensors" in message


@pytest.mark.parametrize("keep", [-1, 5, 0])
def test_truncated_safetensors_names_the_file(tiny_llama_dir, tmp_path, keep):
    folder = _copy(tiny_llama_dir, tmp_path, "cut")
    _cut(folder / "model.safetensors", keep)  # one byte short, a cut header, empty
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert f"{folder / 'model.safetensors'} is not a readable safetensors file" in message
    assert "truncated" in message


def test_missing_shard_and_cut_pytorch_checkpoint(tiny_llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = _copy(tiny_llama_dir, tmp_path, "sharded")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    shards = {name: f"model-0000{i % 2 + 1}-of-00002.safetensors" for i, name in enumerate(weights)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": shards}))
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert str(folder / "model-00001-of-00002.safetensors") in message and "missing" in message

    folder = _copy(tiny_llama_dir, tmp_path, "bin")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    assert load_backbone(str(folder), "fp32", "cpu").num_layers == 3  # a whole .bin loads
    _cut(folder / "pytorch_model.bin", -10)
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert f"{folder / 'pytorch_model.bin'} is not a complete PyTorch checkpoint" in message


def test_model_folder_without_tokenizer_or_with_a_cut_one(tiny_llama_dir, tmp_path):
    folder = _copy(tiny_llama_dir, tmp_path, "notok")
    (folder / "tokenizer.json").unlink()
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert f"folder {folder} has no tokenizer" in message and "tokenizer.json" in message
    (folder / "tokenizer_config.json").unlink()
    assert f"folder {folder} has no tokenizer" in one_line(load_backbone, str(folder))

    folder = _copy(tiny_llama_dir, tmp_path, "cuttok")
    _cut(folder / "tokenizer.json", 1000)
    message = one_line(load_backbone, str(folder), "fp32", "cpu")
    assert f"{folder / 'tokenizer.json'} is not valid JSON" in message


def test_tune_on_a_broken_model_writes_nothing(tiny_llama_dir, tmp_path, capsys, data_dir):
    folder = _copy(tiny_llama_dir, tmp_path, "broken")
    _cut(folder / "model.safetensors", 100)
    out = tmp_path / "run"
    line = cli_error(
        capsys,
        *("tune", "--model", folder, "--task", "sst2", "--data-dir", data_dir),
        *("--test-limit", "20", "--quiet", "--out", out),
    )
    assert str(folder / "model.safetensors") in line
    assert not out.exists()  # the lock's folder is gone again: nothing was written
    out.mkdir()
    (folder / "model.safetensors").unlink()
    line = cli_error(
        capsys, "tune", "--model", folder, "--data-dir", data_dir, "--quiet", "--out", out
    )
    assert "has no weights" in line and list(out.iterdir()) == []


# ---------------------------------------------------------------- task templates

TASK_YAML = """\
name: reviews
labels: [bad, good]
verbalizer: [terrible, great]
templates:
  clm: "{clm}"
data:
  train: train.jsonl
  text_a: text
  label: label
"""


def _task_file(tmp_path: Path, clm: str) -> Path:
    rows = [json.dumps({"text": f"review {i}", "label": i % 2}) for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    path = tmp_path / "task.yaml"
    path.write_text(TASK_YAML.replace("{clm}", clm))
    return path


@pytest.mark.parametrize(
    "clm, expected",
    [
        ("{txt} . It was", "unknown placeholder {txt}"),
        ("{text_a} . It was {label}", "unknown placeholder {label}"),
        ("{text_a . It was", "unclosed brace at character 1"),
        ("{text_a} . It {was", "unclosed brace at character 15"),
        ("{text_a} . It was }", "'}' without an opening brace at character 19"),
        ("{} {text_a}", "unknown placeholder {}"),
    ],
)
def test_task_file_template_with_a_bad_brace_is_refused(tmp_path, clm, expected):
    from dfo_lora.tasks import load_task_file

    path = _task_file(tmp_path, clm)
    message = one_line(load_task_file, path)
    assert message.startswith(f"{path}: field 'templates.clm': {expected}; use {{text_a}}")
    assert "{{ and }} for a literal brace" in message


def test_builtin_templates_are_checked_the_same_way():
    import dataclasses

    from dfo_lora.tasks import get_task
    from dfo_lora.tasks.spec import validate_spec

    spec = dataclasses.replace(get_task("sst2"), mlm_template="{text_a} . It was {mask} {x}")
    message = one_line(validate_spec, spec, "built-in task sst2")
    assert message.startswith("built-in task sst2: field 'mlm_template': unknown placeholder {x}")


def test_doubled_braces_are_literal_braces(tmp_path):
    from dfo_lora.tasks import load_task_file, render

    path = _task_file(tmp_path, "{{text_a}} {{ {text_a} }} . It was")
    spec = load_task_file(path)  # {{text_a}} is literal text, not a second {text_a}
    assert not spec.is_pair
    assert render(spec.clm_template, "nice", None) == "{text_a} { nice } . It was"
    assert render(spec.clm_template, "{text_b}", None) == "{text_a} { {text_b} } . It was"
    pair = "{text_a} {{text_b}} ? {text_b}"
    assert render(pair, "a", "b") == "a {text_b} ? b"


def test_tune_with_a_bad_template_writes_nothing(tiny_llama_dir, tmp_path, capsys):
    path = _task_file(tmp_path, "{text_a} . It was {txt}")
    out = tmp_path / "run"
    line = cli_error(
        capsys, "tune", "--model", tiny_llama_dir, "--task", path, "--quiet", "--out", out
    )
    assert f"{path}: field 'templates.clm': unknown placeholder {{txt}}" in line
    assert not out.exists()


# ---------------------------------------------------------------- data folder


def test_tune_elsewhere_names_the_folders_tried(
    tiny_llama_dir, tmp_path, monkeypatch, capsys, no_network
):
    monkeypatch.delenv("DFO_LORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no shared/data here nor one level up
    out = tmp_path / "run"
    line = cli_error(capsys, "tune", "--model", tiny_llama_dir, "--quiet", "--out", out)
    assert f"looked for ./shared/data and ../shared/data in {tmp_path}" in line
    assert "--data-dir DIR, or --data-dir hf" in line and line.startswith("error: task sst2: ")
    assert no_network == [] and not out.exists()

    (tmp_path / "shared" / "data").mkdir(parents=True)  # found, but it holds no trec/
    line = cli_error(
        capsys, "tune", "--model", tiny_llama_dir, "--task", "trec", "--quiet", "--out", out
    )
    assert "shared/data/trec/train.jsonl: no such file (task trec" in line
    assert f"the first of ./shared/data, ../shared/data in {tmp_path}" in line
    assert "--data-dir DIR, or --data-dir hf" in line
    assert no_network == [] and not out.exists()


def test_default_data_folder_error_without_a_task(tmp_path, monkeypatch):
    monkeypatch.delenv("DFO_LORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    message = one_line(default_data_dir)
    assert f"in {tmp_path} ($DFO_LORA_DATA is not set)" in message and "--data-dir hf" in message
    monkeypatch.setenv("DFO_LORA_DATA", str(tmp_path / "nowhere"))
    message = one_line(default_data_dir)
    assert f"$DFO_LORA_DATA={tmp_path / 'nowhere'}: no such directory" in message
    assert "--data-dir DIR" in message


# ---------------------------------------------------------------- max_length


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("task", ["sst2", "mrpc"])
def test_max_length_must_leave_room_for_the_text(smol_tokenizer, task):
    from dfo_lora.tasks import Example, encode, get_task, render

    spec = get_task(task)
    pair = spec.is_pair
    template = len(smol_tokenizer(render(spec.clm_template, "", "").rstrip())["input_ids"])
    minimum = template + (2 if pair else 1)
    examples = [
        Example(f"{word} film , truly {word}", f"second {word} text" if pair else None, 0)
        for word in ("great", "awful", "odd")
    ]
    message = one_line(encode, spec, examples, smol_tokenizer, True, minimum - 1)
    assert f"max_length={minimum - 1} leaves no room for the text" in message
    assert f"template takes {template} tokens" in message
    assert f"the minimum that works is {minimum}" in message
    encoded = encode(spec, examples, smol_tokenizer, True, minimum)  # the minimum works:
    assert all(len(e.input_ids) <= minimum for e in encoded)
    assert len({tuple(e.input_ids) for e in encoded}) == len(examples)  # prompts differ
    if pair:  # one token of each text survives
        text = smol_tokenizer.decode(encoded[0].input_ids)
        assert text.startswith("great") and "Question: second" in text


def test_tune_with_max_length_3_writes_nothing(tiny_llama_dir, tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    line = cli_error(
        capsys,
        *("tune", "--model", tiny_llama_dir, "--data-dir", data_dir, "--max-length", "3"),
        *("--quiet", "--out", out),
    )
    assert "max_length=3 leaves no room for the text: task sst2's causal-LM template" in line
    assert "the minimum that works is" in line and not out.exists()
