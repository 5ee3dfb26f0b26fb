"""`dfo-lora export --format native` and `dfo_lora.load_tuned`: for every space, a stock HF
forward of the loaded model gives the tool's logits (a real tuning run on a tiny Llama,
and states set on a server for other families); bad input is one line, nothing half
written."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dfo_lora
from dfo_lora.errors import UserError
from dfo_lora.export import export_run
from dfo_lora.native import MANIFEST, WEIGHTS, install_state, write_native
from dfo_lora.search.checkpoint import load_state
from dfo_lora.server.factory import build_server
from dfo_lora.spaces import space_name, unwrap_all
from tests.test_cli import one_line_error, run_cli
from tests.test_export import exported_logits
from tests.test_server_exactness import VERBALIZER, make_server, rel_err
from tests.test_spaces import SPACE_NAMES, build, run_options, scored
from tests.tiny_models import hf_logits

SPACES = ["lora", *SPACE_NAMES]  # every space


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """A short fp32 `tune` per space on the tiny Llama, made on first use."""
    from dfo_lora.search.run import tune
    from tests.test_search import tiny_config

    made = {}

    def run(space: str):
        if space not in made:
            out = tmp_path_factory.mktemp(space) / "run"
            options = run_options(space)  # "series-pca": down fixed to pca
            config = tiny_config(tiny_llama_dir, budget=36, select="final", dtype="fp32", **options)
            tune(config, out, progress=False)
            made[space] = out
        return made[space]

    return run


@pytest.mark.parametrize("space", SPACES)
def test_native_export_of_a_run_gives_the_tool_logits(space, runs, tmp_path):
    from dfo_lora.search.tuned import load_tuned

    run = runs(space)
    z_best, config = load_tuned(run)
    z_final = load_state(run / "checkpoint" / "state.safetensors")["z"]
    assert np.any(z_best)
    server = build_server(config.server_spec())
    for state, z in (("best", z_best), ("final", z_final)):
        out = tmp_path / state
        if state == "best":  # the CLI once, the function once
            done = run_cli("export", run, "--format", "native", "--out", out)
            assert done.returncode == 0, done.stderr
        else:
            export_run(run, "native", out, state)
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["model"] == config.model and manifest["space"] == config.space
        assert manifest["state"] == state and manifest["format_version"] == 1
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, WEIGHTS]
        model = dfo_lora.load_tuned(out)
        server.set_state(z)
        want = server.predict("test")
        got = exported_logits(model, server, "test")
        assert rel_err(got, want["logits"]) <= 1e-4, state
        # `dfo-lora eval`'s number from the loaded model's logits (no calibration here)
        accuracy = float(np.mean(got.argmax(1) == want["labels"]))
        assert accuracy == pytest.approx(server.evaluate("test")["accuracy"])
    plain = exported_logits(unwrap_all(model), server, "test")
    assert rel_err(plain, want["logits"]) > 1e-4  # the tuned state does change the logits


def saved_base(server, folder, tokenizer_dir) -> str:
    """The server's tiny model as a stock HF folder (a tokenizer only so that it loads)."""
    from transformers import AutoTokenizer

    unwrap_all(copy.deepcopy(server.model)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("arch", ["gpt2", "roberta", "opt"])
@pytest.mark.parametrize("space", SPACES)
def test_load_tuned_on_other_families(arch, space, smollm2_dir, tmp_path):
    """A state committed on a server (layers 0 and 2; layer 1 stays at zero) loads back
    into a stock HF model of another family: fused c_attn, masked LM, OPT's fc1/fc2."""
    if space == "lora":
        server, splits = make_server(arch, ("q", "v", "o"))
    else:
        server, splits = build(arch, space)
    rng = np.random.default_rng(5)
    for layer in (0, 2):
        server.commit(layer, rng.normal(size=server.dim))
    out = tmp_path / "native"
    out.mkdir()
    base = saved_base(server, tmp_path / "base", smollm2_dir)
    tensors = server.state_factors(server.get_state())
    write_native(out, tensors, base, server.space.config, "best")
    assert json.loads((out / MANIFEST).read_text())["space"] == space_name(server.space.config)
    model = dfo_lora.load_tuned(out)
    want = server.predict("dev")["logits"]
    dev = scored(server, splits["dev"])  # a prompt space's tokens in front, as it scores
    assert rel_err(hf_logits(model, dev, VERBALIZER).numpy(), want) <= 1e-4
    plain = hf_logits(unwrap_all(model), dev, VERBALIZER).numpy()
    assert rel_err(plain, want) > 1e-3


def test_a_state_without_weights_is_the_unmodified_model():
    server, splits = build("llama", "hydra")
    net = unwrap_all(copy.deepcopy(server.model))
    want = hf_logits(net, splits["dev"], VERBALIZER)
    install_state(net, server.arch, "hydra", server.space.config, {})
    assert rel_err(hf_logits(net, splits["dev"], VERBALIZER), want) == 0


def test_native_export_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, monkeypatch):
    run = runs("hydra")
    out = tmp_path / "x"
    line = one_line_error(run_cli("export", run, "--format", "natve", "--out", out))
    assert "did you mean 'native'" in line
    line = one_line_error(run_cli("export", run, "--format", "peft", "--out", out))
    assert "a hydra run cannot be exported as peft" in line and "--format native" in line
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    line = one_line_error(run_cli("export", unfinished, "--format", "native", "--out", out))
    assert "has not finished" in line
    taken = tmp_path / "taken"
    taken.mkdir()
    assert "exists" in one_line_error(run_cli("export", run, "--format", "native", "--out", taken))
    # A run whose tuned.safetensors holds z only (tuned before exports existed).
    old = tmp_path / "old"
    old.mkdir()
    for name in ("results.json", "config.yaml"):
        (old / name).write_bytes((run / name).read_bytes())
    from safetensors import safe_open

    with safe_open(str(run / "tuned.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    z = load_file(str(run / "tuned.safetensors"))["z"]
    save_file({"z": z}, str(old / "tuned.safetensors"), metadata=meta)
    line = one_line_error(run_cli("export", old, "--format", "native", "--out", out))
    assert "re-run it: dfo-lora tune --config" in line
    # A failure while writing leaves neither the folder nor its staging copy.
    import safetensors.numpy

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError):
        export_run(run, "native", out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]


def test_load_tuned_of_something_else_is_one_line(runs, tmp_path):
    run = runs("hydra")

    def error(folder) -> str:
        with pytest.raises(UserError) as caught:
            dfo_lora.load_tuned(folder)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert MANIFEST in error(run)  # a run folder is no export
    native = export_run(run, "native", tmp_path / "native")
    (native / WEIGHTS).unlink()
    assert WEIGHTS in error(native)
    merged = export_run(runs("lora"), "merged", tmp_path / "merged")
    assert "is a merged export, not native" in error(merged)
