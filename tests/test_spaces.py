"""The hydra, series, parallel and bitfit spaces score exactly what a plain HF forward with the same
weights installed gives (hooks on a stock copy of the model), like LoRA's exactness tests:
z = 0 is the unmodified model, a stacked population equals one forward per candidate,
cached equals uncached; and their bad input is one line."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dfo_lora.backbone.registry import mlp_site
from dfo_lora.config import TuneConfig, load_config
from dfo_lora.errors import UserError
from dfo_lora.server import EvaluationServer, ServerOptions, per_example_loss
from dfo_lora.spaces import (
    SPACES,
    BitfitConfig,
    DeepPromptConfig,
    HydraConfig,
    LoraSpace,
    ParallelConfig,
    PromptConfig,
    SeriesConfig,
    space_class,
    unwrap_all,
)
from dfo_lora.spaces.modules import add_to_columns
from tests.test_server_exactness import ARCHS, VERBALIZER, make_server, rel_err
from tests.tiny_models import hf_logits, random_examples, tiny_model

RTOL = 1e-4


def space_of(name: str, **overrides):
    """A space config by test name: "hydra", "series", "parallel", or a space with a fixed
    factor: hydra's A ("hydra-pca"), the adapters' down ("series-pca" / "parallel-pca")."""
    name, _, fixed = name.partition("-") if name != "deep-prompt" else (name, "", "")
    if fixed:
        overrides = {"a_factor" if name == "hydra" else "down": fixed, **overrides}
    common = dict(intrinsic_dim=40, alpha=3.0, sigma=1.0, seed=3)
    if name == "hydra":
        return HydraConfig(**{**common, "targets": ("q", "v", "o"), "rank": 4, **overrides})
    if name == "series":
        return SeriesConfig(**{**common, "size": 4, **overrides})
    if name == "bitfit":
        return BitfitConfig(**{**common, **overrides})
    if name in ("prompt", "deep-prompt"):
        kind = PromptConfig if name == "prompt" else DeepPromptConfig
        return kind(**{**common, "length": 3, **overrides})
    return ParallelConfig(**{**common, "size": 4, **overrides})


SPACE_NAMES = [
    "hydra",
    "series",
    "parallel",
    "hydra-pca",
    "series-pca",
    "parallel-pca",
    "bitfit",
    "prompt",
    "deep-prompt",
]


def run_options(name: str) -> dict:
    """The TuneConfig values of a test name: {"space": "hydra", "a_factor": "pca"}, ..."""
    space, _, fixed = name.partition("-") if name != "deep-prompt" else (name, "", "")
    if space in ("prompt", "deep-prompt"):  # a short prompt: the tiny models hold 64 tokens
        return {
            "space": space,
            "prompt_length": 3,
            **({"layers": "0"} if space == "prompt" else {}),
        }
    if not fixed:
        return {"space": space}
    return {"space": space, ("a_factor" if space == "hydra" else "adapter_down"): fixed}


def build(arch: str, name: str, options: ServerOptions | None = None, autocast=None, **overrides):
    backbone = tiny_model(arch, 0, autocast=autocast)
    splits = {
        "train": random_examples(backbone, 10, seed=1),
        "dev": random_examples(backbone, 7, seed=2),
    }
    space = space_of(name, **overrides)
    server = EvaluationServer(backbone, splits, VERBALIZER, space=space, options=options)
    return server, splits


# ---------------------------------------------------------------- the reference
def _hydra_hook(out_slice, a, b, router):
    def hook(module, args, output):
        x = args[0]
        route = torch.softmax(x @ router.T, -1)  # (B, T, N)
        delta = sum(route[..., i : i + 1] * ((x @ a.T) @ b[i].T) for i in range(b.shape[0]))
        output = output.clone()
        add_to_columns(output, out_slice, delta)
        return output

    return hook


def _bias_hook(out_slice, bias):
    def hook(module, args, output):
        output = output.clone()
        add_to_columns(output, out_slice, bias)
        return output

    return hook


def _series_hook(down, up):
    return lambda module, args, output: output + torch.tanh(output @ down.T) @ up.T


def _prompt_hook(shift):
    def hook(module, args, kwargs):
        if args:
            hidden = args[0].clone()
            hidden[:, : shift.shape[0]] += shift
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[:, : shift.shape[0]] += shift
        return args, {**kwargs, "hidden_states": hidden}

    return hook


def scored(server, examples):
    """The examples as the server scores them (a prompt space's tokens in front)."""
    config = server.space.config
    return space_class(config).prepare_examples(config, server.model, examples)


def reference_logits(server, z: np.ndarray, examples) -> torch.Tensor:
    """Stock HF forwards of a copy of the model, each layer's weights of z installed by
    plain forward hooks (one example at a time, no stacking, no cache)."""
    net = unwrap_all(copy.deepcopy(server.model))
    arch, space = server.arch, server.space
    examples = scored(server, examples)
    layers = arch.layers(net)
    for index, layer in enumerate(layers):
        if not np.any(z[index]):
            continue
        weights = space.weights(index, torch.from_numpy(z[index])[None], torch.float32)
        weights = {k: tuple(t[0] for t in group) for k, group in weights.items()}
        if space.name == "hydra":
            for target, (a, b, router) in weights.items():
                proj = arch.projection(net, target)
                module = layer.get_submodule(proj.module)
                module.register_forward_hook(_hydra_hook(proj.out_slice, a, b, router))
        elif space.name in ("prompt", "deep-prompt"):
            (shift,) = weights["prompt"]
            layer.register_forward_pre_hook(_prompt_hook(shift), with_kwargs=True)
        elif space.name == "bitfit":
            for target, (bias,) in weights.items():
                proj = arch.projection(net, target)
                module = layer.get_submodule(proj.module)
                module.register_forward_hook(_bias_hook(proj.out_slice, bias))
        elif space.name == "series":  # down searched or fixed: weights() gives both
            for target, (down, up) in weights.items():
                module = layer.get_submodule(arch.projection(net, target).module)
                module.register_forward_hook(_series_hook(down, up))
        else:  # parallel: the MLP's input, through the adapter, onto the MLP's output
            site, (down, up) = mlp_site(arch, layer), weights["mlp"]
            seen = {}

            def keep(module, args, seen=seen):
                seen["x"] = args[0]

            def add(module, args, output, seen=seen, down=down, up=up):
                return output + torch.tanh(seen["x"] @ down.T) @ up.T

            layer.get_submodule(site.reads).register_forward_pre_hook(keep)
            layer.get_submodule(site.writes).register_forward_hook(add)
    return hf_logits(net, examples, VERBALIZER)


def reference_losses(server, layer, candidates, examples):
    labels = torch.tensor([ex.label for ex in examples])
    out = []
    for cand in candidates:
        z = server.get_state()
        z[layer] = cand
        logits = reference_logits(server, z, examples)
        out.append(float(per_example_loss("ce", logits, labels).mean()))
    return np.array(out)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_zero_vector_is_the_unmodified_model(arch, name):
    server, splits = build(arch, name)
    got = server.score(1, np.zeros((1, server.dim)))["loss"][0]
    net = unwrap_all(copy.deepcopy(server.model))
    plain = hf_logits(net, scored(server, splits["train"]), VERBALIZER)
    labels = torch.tensor([ex.label for ex in splits["train"]])
    want = float(per_example_loss("ce", plain, labels).mean())
    assert abs(got - want) <= RTOL * abs(want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_score_equals_hf_forward_with_the_weights_installed(arch, name):
    server, splits = build(arch, name)
    rng = np.random.default_rng(0)
    server.commit(0, rng.normal(size=server.dim))  # committed modules below and above
    server.commit(2, rng.normal(size=server.dim))
    cands = rng.normal(size=(5, server.dim))
    layer = 0 if name == "prompt" else 1  # BBT's one prompt is at the first layer's input
    got = server.score(layer, cands)["loss"]
    want = reference_losses(server, layer, cands, splits["train"])
    # hydra's router softmax runs in fp32 on purpose; with this test's large random weights
    # its logits reach the hundreds, where fp32 rounding moves a loss by up to 2e-4 (Phi-3;
    # the same check in fp64 leaves 1e-4, from the fp32 router alone)
    rtol = 5e-4 if name.startswith("hydra") else RTOL
    assert rel_err(got, want) <= rtol, (got, want)
    assert np.ptp(got) > 1e-4  # the candidates really differ


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["prompt", "deep-prompt"])
def test_the_prompt_once_per_candidate_scores_as_the_prompt_in_front_of_every_example(arch, name):
    """The shared-prefix path (a causal model runs the prompt once per candidate, its keys
    and values read through the model's cache; sliding windows included) against the
    prompt's tokens in front of every example, over several chunks and buckets, with
    commits below and above and the cached layer inputs in use; masked LMs keep the
    latter (their prompt positions read the whole input)."""
    options = dict(max_tokens=60)
    shared, _ = build(arch, name, options=ServerOptions(**options))
    plain, _ = build(arch, name, options=ServerOptions(shared_prefix=False, **options))
    assert bool(shared._after_prefix) == shared.backbone.causal
    assert not plain._after_prefix
    rng = np.random.default_rng(5)
    layers = [0] if name == "prompt" else [0, 1, 2]
    for layer in layers:
        cands = rng.normal(size=(6, shared.dim))
        got, want = shared.score(layer, cands), plain.score(layer, cands)
        assert rel_err(got["loss"], want["loss"]) <= 1e-5, (layer, got, want)
        assert np.array_equal(got["accuracy"], want["accuracy"])
        # the candidates really differ (above layer 0 a sliding window may hide the prompt)
        assert layer > 0 or np.ptp(got["loss"]) > 1e-4
        for server in (shared, plain):
            server.commit(layer, cands[0])
    cands = rng.normal(size=(3, shared.dim))
    for server in (shared, plain):  # back below: the cached inputs above are remade
        server.commit(0, np.zeros(server.dim))
    last = layers[-1]
    assert rel_err(shared.score(last, cands)["loss"], plain.score(last, cands)["loss"]) <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_score_in_bf16_mixed_is_as_close_to_fp32_as_hf_under_autocast(arch, name):
    """Every space under bf16-mixed: within 5x (or 2%) of the stock forward's error under
    the same autocast against the fp32 truth, and not fp32's numbers (bf16 matmuls ran)."""
    server, splits = build(arch, name, autocast=torch.bfloat16)
    rng = np.random.default_rng(0)
    server.commit(0, rng.normal(size=server.dim))
    server.commit(2, rng.normal(size=server.dim))
    cands = rng.normal(size=(5, server.dim))
    layer = 0 if name == "prompt" else 1
    got = server.score(layer, cands)["loss"]
    truth = reference_losses(server, layer, cands, splits["train"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_mixed = reference_losses(server, layer, cands, splits["train"])
    assert rel_err(got, truth) <= max(5 * rel_err(hf_mixed, truth), 0.02), (got, hf_mixed)
    assert rel_err(got, truth) > 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_predict_after_commits_matches_reference(arch, name):
    server, splits = build(arch, name)
    rng = np.random.default_rng(3)
    for layer in range(server.num_layers):
        server.commit(layer, rng.normal(size=server.dim))
    got = server.predict("dev")["logits"]
    want = reference_logits(server, server.get_state(), splits["dev"])
    assert rel_err(got, want.numpy()) <= RTOL
    assert rel_err(got, reference_logits(server, 0 * server.get_state(), splits["dev"])) > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_cached_equals_uncached_and_chunked(arch, name):
    rng = np.random.default_rng(2)
    commits = {0: rng.normal(size=40), 1: rng.normal(size=40)}
    cands = rng.normal(size=(6, 40))
    results = {}
    for key, options in {
        "cached": ServerOptions(),
        "uncached": ServerOptions(prefix_cache=False),
        "chunked": ServerOptions(max_tokens=20, max_buckets=1),
    }.items():
        server, _ = build(arch, name, options=options)
        for layer, z in commits.items():
            server.commit(layer, z)
        first = server.score(2, cands)["loss"]
        server.commit(0, commits[0] * 0.5)  # invalidates the cache above layer 0
        second = server.score(1, cands)["loss"]
        results[key] = np.concatenate([first, second])
    # The same work in other shapes: fp32 rounding only. Chunked pads every example to
    # one length and cuts the population into other row counts, so the BLAS kernels (and
    # their sums' order) differ; on a 2-thread AVX2 CPU that reached 1.3e-5.
    assert rel_err(results["uncached"], results["cached"]) <= 1e-5, "uncached"
    assert rel_err(results["chunked"], results["cached"]) <= 5e-5, "chunked"


def test_hydra_heads_and_router_shapes():
    server, _ = build("gpt2", "hydra", heads=2, rank=3)
    weights = server.space.weights(0, torch.ones(4, server.dim), torch.float32)
    a, b, router = weights["q"]
    assert a.shape == (4, 3, 32) and b.shape == (4, 2, 32, 3) and router.shape == (4, 2, 32)
    assert server.space.deltas(0, np.ones(server.dim)) is None  # input-dependent: no merge
    keys = server.state_factors(np.ones((3, server.dim)))
    assert {k for k in keys if k.startswith("0.q.")} == {"0.q.A", "0.q.B", "0.q.router"}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hydra_pca_a_is_the_whitened_top_directions_of_the_projection_input(arch):
    """a_factor pca: each target's A rows are the top principal directions of the
    projection's input covariance over the real train tokens (measured here with plain
    hooks on a stock copy), unit variance along each; z moves the heads and the router
    only, and at z's first order the delta is (1/N) sum_i B_i A x, linear in z."""
    server, splits = build(arch, "hydra-pca")
    net = unwrap_all(copy.deepcopy(server.model))
    layer = server.arch.layers(net)[1]
    paths = {t: server.arch.projection(net, t).module for t in ("q", "v", "o")}
    seen: dict[str, list] = {path: [] for path in paths.values()}  # GPT-2: q, v share c_attn
    for path in seen:

        def keep(module, args, output, path=path):
            seen[path].append(args[0].detach())

        layer.get_submodule(path).register_forward_hook(keep)
    hf_logits(net, splits["train"], VERBALIZER)  # one example at a time: no padding
    fixed = server.space.fixed_a(1)
    for target, path in paths.items():
        values = seen[path]
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in values]).double()
        centred = x - x.mean(0)
        cov = centred.T @ centred / x.shape[0]
        rows = fixed[target].double()
        assert rows.shape == (4, x.shape[1])
        assert torch.allclose(rows @ cov @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-3)
        top = torch.linalg.eigh(cov)[1][:, -4:]
        assert torch.allclose(top @ (top.T @ rows.T), rows.T, atol=1e-4 * float(rows.abs().max()))
    assert len(server.space.chunk_sizes) == 3 * (3 + 1)  # per target: 3 heads, the router
    z1, z2 = torch.randn(2, server.dim, generator=torch.Generator().manual_seed(0))
    both = server.space.weights(1, torch.stack([z1, z2, z1 + z2]), torch.float32)
    for a, b, router in both.values():
        assert torch.equal(a[0], a[2]) and torch.equal(a[1], a[2])
        assert torch.allclose(b[0] + b[1], b[2], atol=1e-6)
        assert torch.allclose(router[0] + router[1], router[2], atol=1e-6)


def test_series_defaults_to_every_residual_writer():
    server, _ = build("llama", "series")
    assert sorted(server.adapted[0]) == ["down", "o"]
    server, _ = build("bert", "series", targets=("o",))
    assert sorted(server.adapted[0]) == ["o"]


def test_small_z_is_a_small_change():
    """Losses move continuously away from z = 0 (the maps are scaled from sigma_hat)."""
    for name in SPACE_NAMES:
        server, _ = build("llama", name)
        direction = np.random.default_rng(4).normal(size=server.dim)
        scales = np.array([0.0, 1e-4, 1e-2])
        layer = 0 if name == "prompt" else 1  # BBT's one prompt is at the first layer's input
        losses = server.score(layer, scales[:, None] * direction)["loss"]
        assert abs(losses[1] - losses[0]) < abs(losses[2] - losses[0]), name
        assert abs(losses[1] - losses[0]) < 1e-3, name


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("name", ["series", "parallel"])
def test_pca_down_is_the_whitened_top_directions_of_what_the_site_reads(arch, name):
    """down = "pca": each site's down rows are the top principal directions of the second
    moment of its input over the real train tokens (measured here with plain hooks on a
    stock copy), with unit second moment along each; z moves up only, linearly."""
    server, splits = build(arch, f"{name}-pca")
    net = unwrap_all(copy.deepcopy(server.model))
    layer = server.arch.layers(net)[1]
    if name == "series":
        sites = {t: (server.arch.projection(net, t).module, "out") for t in server.adapted[1]}
    else:
        sites = {"mlp": (mlp_site(server.arch, layer).reads, "in")}
    seen: dict[str, list] = {site: [] for site in sites}
    for site, (path, side) in sites.items():

        def keep(module, args, output, site=site, side=side):
            seen[site].append((args[0] if side == "in" else output).detach())

        layer.get_submodule(path).register_forward_hook(keep)
    hf_logits(net, splits["train"], VERBALIZER)  # one example at a time: no padding
    down = server.space.fixed_down(1)
    for site, values in seen.items():
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in values]).double()
        second = x.T @ x / x.shape[0]
        rows = down[site].double()
        assert rows.shape == (4, x.shape[1])
        # unit second moment along each row, and uncorrelated rows
        assert torch.allclose(rows @ second @ rows.T, torch.eye(4, dtype=torch.float64), atol=1e-3)
        top = torch.linalg.eigh(second)[1][:, -4:]  # the top 4 directions
        projected = top @ (top.T @ rows.T)
        assert torch.allclose(projected, rows.T, atol=1e-4 * float(rows.abs().max()))
    z1, z2 = torch.randn(2, server.dim, generator=torch.Generator().manual_seed(0))
    both = server.space.weights(1, torch.stack([z1, z2, z1 + z2]), torch.float32)
    for down_p, up_p in both.values():
        assert torch.equal(down_p[0], down_p[2]) and torch.equal(down_p[1], down_p[2])
        assert torch.allclose(up_p[0] + up_p[1], up_p[2], atol=1e-6)


def test_registry_maps_configs_to_spaces():
    assert set(SPACES) == {"lora", "hydra", "series", "parallel", "bitfit", "prompt", "deep-prompt"}
    assert space_class(TuneConfig().space_config()) is LoraSpace
    for name in ("hydra", "series", "parallel", "bitfit", "deep-prompt"):
        config = load_config(None, {"space": name, "intrinsic_dim": 60})
        assert space_class(config.space_config()).name == name


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"space": "hydar"},
            "space: 'hydar' is not one of lora, hydra, series, parallel, bitfit, prompt, deep-prompt; did you",
        ),
        ({"space": "lora", "hydra_heads": 5}, "hydra_heads: not used by the lora space"),
        ({"space": "hydra", "adapter_size": 4}, "adapter_size: not used by the hydra space"),
        ({"space": "parallel", "targets": "o"}, "targets: not used by the parallel space"),
        ({"space": "series", "rank": 8}, "rank: not used by the series space"),
        ({"space": "hydra", "b_basis": "pca"}, "b_basis: not used by the hydra space"),
        ({"space": "series", "targets": "q,o"}, "targets: series adapters sit after"),
        ({"space": "hydra", "hydra_heads": 0}, "hydra_heads: must be a positive integer"),
        ({"space": "parallel", "adapter_size": 0}, "adapter_size: must be a positive integer"),
        ({"space": "hydra", "intrinsic_dim": 9}, "intrinsic_dim: 9 is fewer than the 10"),
        (
            {"space": "hydra", "a_factor": "pca", "intrinsic_dim": 7},
            "intrinsic_dim: 7 is fewer than the 8 weights (3 heads, router per target)",
        ),
        (
            {"space": "hydra", "a_factor": "random"},
            "a_factor: 'random' is not one of searched, pca for the hydra space",
        ),
        ({"space": "series", "adapter_down": "pac"}, "adapter_down: 'pac' is not one of"),
        ({"space": "lora", "adapter_down": "pca"}, "adapter_down: not used by the lora space"),
        (
            {"space": "series", "adapter_down": "pca", "targets": "o,down", "intrinsic_dim": 1},
            "intrinsic_dim: 1 is fewer than the 2 weights (up per target)",
        ),
        ({"space": "deep-prompt", "prompt_length": 0}, "prompt_length: must be in 1..256, got 0"),
        ({"space": "prompt", "prompt_length": 300, "layers": "0"}, "must be in 1..256, got 300"),
        ({"space": "prompt"}, "the prompt space (BBT) shifts the first layer's input only"),
        ({"space": "lora", "prompt_length": 5}, "prompt_length: not used by the lora space"),
    ],
)
def test_bad_space_options_are_one_line_errors(values, message):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_config(None, values)
    assert "\n" not in str(info.value)


def test_a_prompt_longer_than_the_context_allows_is_refused():
    with pytest.raises(UserError, match=r"prompt_length: 60 prompt tokens and the longest"):
        build("llama", "deep-prompt", length=60)  # the tiny models hold 64 positions


def test_series_target_that_does_not_write_the_residual_is_refused():
    with pytest.raises(UserError, match=r"gate does not \(choose from o, down\)"):
        build("llama", "series", targets=("o", "gate"))


def test_space_is_a_sweep_grid_key(tmp_path):
    from dfo_lora.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(
        "out: runs\n"
        "config: {model: tiny, task: sst2, intrinsic_dim: 60}\n"
        "grid: {space: [lora, hydra, series, parallel]}\n"
    )
    sweep = load_sweep(path)
    assert [run.config.space for run in sweep.runs] == ["lora", "hydra", "series", "parallel"]
    assert len({run.group_key for run in sweep.runs}) == 4  # one server group per space


def test_lora_space_is_the_server_default():
    server, _ = make_server("llama")
    assert isinstance(server.space, LoraSpace) and server.info()["space"] == "lora"
    assert server.info()["space_state"]["seed"] == 3


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", SPACE_NAMES)
def test_tune_end_to_end(name, tiny_llama_dir, tmp_path):
    """A short `tune` per space on a tiny Llama with the real tokenizer and data; `eval`
    rebuilds the same space from the run's config and gets the tuned dev metric back."""
    import json

    from dfo_lora.search.run import tune
    from dfo_lora.search.tuned import load_tuned
    from dfo_lora.server.factory import build_server
    from tests.test_search import tiny_config

    options = run_options(name)
    name = options["space"]
    config = tiny_config(tiny_llama_dir, budget=6 * 3 * 2, select="final", **options)
    results = tune(config, tmp_path / "run", progress=False)
    assert results["evaluations"] == 36
    assert results["server"]["space"] == name
    z, saved = load_tuned(tmp_path / "run")
    assert saved.space == name and np.any(z)
    server = build_server(saved.server_spec())
    server.set_state(z)
    assert server.evaluate("dev")["accuracy"] == pytest.approx(results["tuned"]["dev"]["accuracy"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "tuned.safetensors"), framework="numpy") as f:
        state = json.loads(f.metadata()["space"])
    assert state["space"] == name and len(state["sigma_hat"]) == 3


def test_export_of_a_hydra_run_is_a_one_line_error(tiny_llama_dir, tmp_path):
    from dfo_lora.search.run import tune
    from tests.test_cli import one_line_error, run_cli
    from tests.test_search import tiny_config

    config = tiny_config(tiny_llama_dir, space="hydra", budget=6 * 3, select="final")
    tune(config, tmp_path / "run", progress=False)
    for fmt in ("peft", "merged"):
        out = tmp_path / fmt
        line = one_line_error(run_cli("export", tmp_path / "run", "--format", fmt, "--out", out))
        assert f"a hydra run cannot be exported as {fmt}" in line
        assert not out.exists()


def test_tune_cli_space_errors_are_one_line(tiny_llama_dir, tmp_path):
    from tests.test_cli import one_line_error, run_cli

    base = ["tune", "--model", tiny_llama_dir, "--task", "sst2", "--test-limit", "20", "--quiet"]
    cases = {
        ("--space", "paralel"): "did you mean 'parallel'",
        ("--space", "lora", "--adapter-size", "4"): "adapter_size: not used by the lora space",
        ("--space", "series", "--targets", "o,up"): "up does not (choose from o, down)",
    }
    for extra, expected in cases.items():
        out = tmp_path / ("out-" + "-".join(e.strip("-") for e in extra))
        line = one_line_error(run_cli(*base, *extra, "--out", out))
        assert expected in line, (extra, line)
        assert not (out / "results.json").exists()


def test_paper_baselines_run_the_lora_space():
    from dfo_lora.baselines.paper import paper_config

    config = load_config(None, {"space": "series", "intrinsic_dim": 60})
    assert paper_config(config, "cma", {}).space == "lora"


SHARED_SPACE_MODULES = ("base", "statistics", "projection", "modules")


def test_space_imports_run_from_the_shared_modules_to_the_space_folders():
    """The shared modules (interface, statistics, projection, module helpers) import no
    space folder; a space folder imports no other space folder (except the paper's default
    targets, which hydra shares with lora); nothing under spaces/ imports the server."""
    import ast

    root = Path(__file__).resolve().parents[1] / "dfo_lora" / "spaces"
    imported: dict[str, set[str]] = {}  # "lora" or "statistics" -> dfo_lora modules it imports
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        owner = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        tree = ast.parse(path.read_text())
        found = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dfo_lora")
        }
        imported.setdefault(owner, set()).update(found)
    folders = {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    assert {"lora", "hydra", "adapters", "bitfit", "prompt"} <= folders
    for shared in SHARED_SPACE_MODULES:
        spaces_used = {m.split(".")[2] for m in imported[shared] if m.count(".") >= 2}
        assert not spaces_used & folders, (shared, spaces_used & folders)
    for folder in folders:
        others = {
            m
            for m in imported[folder]
            if m.startswith("dfo_lora.spaces.") and m.split(".")[2] in folders - {folder}
        }
        allowed = {"dfo_lora.spaces.lora.config"} if folder == "hydra" else set()
        assert others <= allowed, (folder, others)
    assert not any(m.startswith("dfo_lora.server") for ms in imported.values() for m in ms)


def test_each_space_declares_the_run_keys_it_reads():
    """A space config's fields are set from the run config's keys of the same name, or the
    one its RUN_KEYS names; the config refuses a key of another space from those lists."""
    from dataclasses import fields

    from dfo_lora.config import SPACE_OPTIONS
    from dfo_lora.spaces import SPACES, run_keys

    known = {f.name for f in fields(TuneConfig)}
    for name, (config_class, _) in SPACES.items():
        assert set(run_keys(config_class).values()) <= known, name
    assert run_keys(SPACES["hydra"][0])["heads"] == "hydra_heads"
    assert SPACE_OPTIONS["hydra_heads"] == ("hydra",)
    assert SPACE_OPTIONS["prompt_length"] == ("prompt", "deep-prompt")
    assert "intrinsic_dim" not in SPACE_OPTIONS  # every space reads it
    config = TuneConfig(space="hydra", hydra_heads=5, targets=["v", "o"], seed=7)
    assert config.space_config() == SPACES["hydra"][0](
        targets=("v", "o"), heads=5, seed=7, intrinsic_dim=500
    )
    with pytest.raises(UserError, match="hydra_heads: not used by the lora space"):
        TuneConfig(hydra_heads=5).validate()


def test_each_space_declares_its_options_and_the_cli_groups_them():
    """Every run key that only some spaces read is declared (help, default, checks) by
    each of them, with the config field's default; the run config's help and the CLI's
    option groups come from those declarations, and their checks name the run key."""
    from dataclasses import MISSING, fields

    from dfo_lora.cli import build_parser, config_groups
    from dfo_lora.config import SPACE_OPTIONS
    from dfo_lora.spaces import SPACES, option_help, run_keys, space_options

    for name, (config_class, _) in SPACES.items():
        keys = run_keys(config_class)
        declared = {keys[f] for f in config_class.OPTIONS}
        assert declared == {k for k in keys.values() if k in SPACE_OPTIONS}, name
        defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
        for field_name, option in config_class.OPTIONS.items():
            assert option.default == defaults[field_name], (name, field_name)
    run_defaults = TuneConfig()
    for key in SPACE_OPTIONS:
        field = next(f for f in fields(TuneConfig) if f.name == key)
        assert field.metadata["option"].help == option_help(key)
        for option in space_options(key).values():
            assert getattr(run_defaults, key) in (None, option.default), key
    assert option_help("hydra_heads") == SPACES["hydra"][0].OPTIONS["heads"].help
    assert "series: projections writing the residual stream" in option_help("targets")
    groups = config_groups()
    assert groups["hydra options"] == ["hydra_heads"]
    assert groups["series, parallel options"] == ["adapter_size", "adapter_down"]
    assert list(groups).index("search space") + 1 == list(groups).index(
        "lora, hydra, series, bitfit options"
    )
    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    titles = {g.title: [a.dest for a in g._group_actions] for g in tune._action_groups}
    assert titles["prompt, deep-prompt options"] == ["prompt_length"]
    with pytest.raises(UserError, match=r"^b_basis: 'pac' is not one of random, pca, verbalizer"):
        load_config(None, {"b_basis": "pac"})
    with pytest.raises(UserError, match=r"^rank: must be a positive integer, got 0$"):
        load_config(None, {"space": "hydra", "rank": 0})


def test_each_space_declares_its_tensors_and_export_formats():
    """The shapes tuned.safetensors is checked against and the export formats come from
    the space classes: every tensor has its shape, and a space that cannot be merged says
    why in its own words."""
    from dfo_lora.export import check_mergeable
    from dfo_lora.spaces import SPACES, SearchSpace

    for name, (_, kind) in SPACES.items():
        assert set(kind.tensor_shapes) == set(kind.tensor_names), name
        for fmt in ("peft", "merged"):
            if kind.mergeable:
                check_mergeable(name, fmt)
            else:
                assert kind.not_mergeable_because != SearchSpace.not_mergeable_because, name
                with pytest.raises(UserError, match=re.escape(kind.not_mergeable_because)):
                    check_mergeable(name, fmt)
        check_mergeable(name, "native")
    assert [n for n, (_, k) in SPACES.items() if k.mergeable] == ["lora"]
