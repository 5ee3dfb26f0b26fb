"""`dfo-lora bench`: the server against a naive loop, measured in the same run.

What is measured (all in one process, same model, data and dtype):

- server: one full round of the paper's schedule (every layer once, bottom-up: score
  P candidates, commit the best), wall time -> candidate evaluations/s, tokens/s; each
  layer's random maps are built first and timed apart (`maps_setup_s`): a run builds
  them once, not every round;
- naive: one plain HF forward per candidate with its factors merged into the weights
  (padded batch of the whole train set, full-vocabulary logits, like any eval script),
  `naive_per_layer` candidates at every layer; its cost does not depend on the layer,
  so this samples the same round at a fraction of its (long) wall time. The samples
  are interleaved with the server's round, layer by layer (`interleaved_round`), so
  both rates see the same load of a shared machine: the speedup is a ratio taken at
  the same moments, not of two passes a minute apart;
- FLOP/s of the server round (matmul FLOPs counted by torch's FlopCounterMode on the
  first and last layer's scoring, which brackets every layer linearly) as a fraction
  of this machine's matmul peak in the server's dtype, sampled in slices between the
  round's layers (the same load again); fp32's and bf16's peaks are measured once after;
- peak memory, each measured apart from the timed round: the RSS high-water mark above
  the starting RSS of a trimmed heap, sampled every 2 ms (CPU), or
  torch.cuda.max_memory_allocated (GPU), for one server scoring call (layer 0, which
  runs every layer), for one naive forward, for one plain inference forward (the
  decoder stack, no LM head) of the
  same stacked batch (P x N sequences) that the server scores, and for one training
  step of gradient LoRA (peft, q,v, r = 8, AdamW, the whole train split: the baseline's
  step), measured last because it adds LoRA layers to the model;
- the projected wall time of the paper's 8000-evaluation run at the round's rate.

`run_bench` measures a server built from a spec (real model and task) or one given to it
(`dfo_lora.synthetic`: a real shape with random weights, `dfo-lora bench --synthetic`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfo_lora.backbone.fusion import eager, eager_copy
from dfo_lora.errors import UserError
from dfo_lora.server import EvaluationServer, per_example_loss
from dfo_lora.server.factory import ServerSpec, build_server
from dfo_lora.spaces.lora import LoraProjection
from dfo_lora.spaces.modules import merge_delta

PAPER_BUDGET = 8000  # evaluations of one of the paper's runs
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class PeakMemory:
    bytes: int = 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library); looked up once: find_library runs
    ldconfig."""
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _trim_heap() -> None:
    """Give the C heap's freed pages back to the OS, so that RSS grows with what a block
    allocates instead of reusing what an earlier block freed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stopped next counts it (CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device):
    """Peak bytes above the starting level while the block runs (on a CPU, from a trimmed
    heap: the RSS high-water mark, sampled every 2 ms)."""
    result = PeakMemory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    _trim_heap()
    start, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result.bytes = max(peak[0], _rss()) - start


class MatmulPeak:
    """This machine's practical matmul peak for one dtype (square matmuls), measured in
    slices: sampled between the round's layers it is taken under the same load as the
    round whose FLOP/s it divides."""

    def __init__(self, dtype: torch.dtype, device: torch.device, size: int):
        self.device, self.size = device, size
        self.a = torch.randn(size, size, device=device).to(dtype)
        self.b = torch.randn(size, size, device=device).to(dtype)
        self.a @ self.b  # warm-up
        self.flops, self.seconds = 0, 0.0

    def sample(self, seconds: float, min_runs: int = 1) -> None:
        """Run square matmuls for about `seconds` (at least `min_runs`), adding to the tally.
        Each one is waited for: queued GPU work would outlast the slice by far."""
        synchronize(self.device)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or runs < min_runs:
            self.a @ self.b
            synchronize(self.device)
            runs += 1
        self.seconds += time.perf_counter() - start
        self.flops += 2 * self.size**3 * runs

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds


def peak_size(dtype: torch.dtype, device: torch.device) -> int:
    """The square size that reaches the peak without taking long: on a CPU without native
    bf16 a 2048-cube bf16 matmul takes many seconds."""
    if device.type != "cpu":
        return 8192
    return 2048 if dtype == torch.float32 else 1024


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul in one go."""
    peak = MatmulPeak(dtype, device, peak_size(dtype, device))
    peak.sample(seconds, min_runs=2)
    return peak.flops_per_s


@dataclass
class RoundTimes:
    """What `interleaved_round` measured: each side's evaluations and seconds."""

    evals: int
    seconds: float
    naive_evals: int
    naive_seconds: float


def interleaved_round(
    server: EvaluationServer,
    naive: NaiveScorer,
    popsize: int,
    naive_per_layer: int,
    seed: int,
    scale: float,
    peak: MatmulPeak | None = None,
    peak_slice_s: float = 0.05,
) -> RoundTimes:
    """One round of the paper's schedule (every layer once, bottom-up: score P candidates,
    commit the best) with the naive loop's samples at each layer right after the server's
    and, given `peak`, a slice of the matmul peak after them.

    Each side is timed only over its own blocks, so the rates are taken under the same
    load, which on a shared machine moves by tens of percent within a minute."""
    rng, naive_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    device = server.backbone.device
    times = RoundTimes(0, 0.0, 0, 0.0)
    for layer in range(server.num_layers):
        start = time.perf_counter()
        cands = rng.normal(scale=scale, size=(popsize, server.dim))
        losses = server.score(layer, cands)["loss"]
        server.commit(layer, cands[int(np.argmin(losses))])
        synchronize(device)  # the commit's device work belongs to the server's time
        times.seconds += time.perf_counter() - start
        times.evals += popsize
        start = time.perf_counter()
        for _ in range(naive_per_layer):
            naive.score(layer, naive_rng.normal(scale=scale, size=server.dim))
        synchronize(device)
        times.naive_seconds += time.perf_counter() - start
        times.naive_evals += naive_per_layer
        if peak is not None:
            peak.sample(peak_slice_s)
    return times


@contextmanager
def eager_attention(model: torch.nn.Module):
    """The model's attention in transformers' eager (matmul) form for the block: the same
    FLOPs as sdpa, in ops that every torch's FlopCounterMode can count."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def count_round_flops(server: EvaluationServer, popsize: int, rng) -> tuple[float, str]:
    """Matmul FLOPs of one round's scoring (first and last layer counted, linear between).

    Some torch releases (2.11) cannot count grouped-query sdpa (Llama's kv heads fewer
    than its heads); the count is then taken with eager attention, which does the same
    matmuls (and counts the masked half of causal attention too: a few % more on small
    models). Compiled layers are counted eager, graphs unused: the same matmuls. Returns the FLOPs and
    the attention form they were counted in."""
    graphs, server.graphs = server.graphs, None  # a replayed graph's kernels are not seen
    try:
        with eager(server.layers):
            try:
                return _count_round_flops(server, popsize, rng), "sdpa"
            except AssertionError:
                with eager_attention(server.model):
                    return _count_round_flops(server, popsize, rng), "eager"
    finally:
        server.graphs = graphs


def _count_round_flops(server: EvaluationServer, popsize: int, rng) -> float:
    counts = []
    for layer in (0, server.num_layers - 1):
        cands = rng.normal(size=(popsize, server.dim))
        with FlopCounterMode(display=False) as counter:
            server.score(layer, cands)
        counts.append(counter.get_total_flops())
    first, last = counts
    per_layer = (first - last) / max(1, server.num_layers - 1)
    return sum(last + per_layer * (server.num_layers - 1 - lay) for lay in range(server.num_layers))


class NaiveScorer:
    """One plain HF forward per candidate, its deltas merged into a private model copy."""

    def __init__(self, server: EvaluationServer, plain_model: torch.nn.Module):
        self.server = server
        self.model = plain_model
        self.arch = server.arch
        buckets = server.buckets["train"]
        width = max(b.length for b in buckets)
        pad = int(buckets[0].input_ids[0, -1]) if buckets else 0
        ids, mask, slots, labels = [], [], [], []
        for b in buckets:
            grow = width - b.length
            ids.append(torch.nn.functional.pad(b.input_ids, (0, grow), value=pad))
            mask.append(torch.nn.functional.pad(b.attention_mask, (0, grow), value=0))
            slots.append(b.slots)
            labels.append(b.labels)
        self.ids, self.mask = torch.cat(ids), torch.cat(mask)
        self.slots, self.labels = torch.cat(slots), torch.cat(labels)

    @torch.inference_mode()
    def score(self, layer: int, z: np.ndarray) -> float:
        layers = self.arch.layers(self.model)
        deltas = self.server.space.deltas(layer, z)
        merged = []
        for target, delta in deltas.items():
            proj = self.arch.projection(self.model, target)
            module = layers[layer].get_submodule(proj.module)
            merge_delta(module, delta, proj.out_slice)
            merged.append((module, delta, proj.out_slice))
        try:
            with self.server.backbone.compute():
                logits = self.model(input_ids=self.ids, attention_mask=self.mask).logits
            rows = logits[torch.arange(len(self.slots)), self.slots][:, self.server.verbalizer]
            return float(per_example_loss("ce", rows, self.labels).mean())
        finally:
            for module, delta, out_slice in merged:
                merge_delta(module, -delta, out_slice)


def plain_model_copy(server: EvaluationServer) -> torch.nn.Module:
    """A copy of the backbone with the adapter wrappers removed: the stock HF model."""
    net = eager_copy(server.model, server.layers)
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoraProjection):
                setattr(module, child_name, child.base)
    return net


@torch.inference_mode()
def plain_stacked_forward(server: EvaluationServer, popsize: int) -> None:
    """One plain decoder-stack forward of the P x N stacked, padded train batch."""
    buckets = server.buckets["train"]
    width = max(b.length for b in buckets)
    ids = torch.cat(
        [torch.nn.functional.pad(b.input_ids, (0, width - b.length)) for b in buckets]
    ).repeat(popsize, 1)
    mask = torch.cat(
        [torch.nn.functional.pad(b.attention_mask, (0, width - b.length)) for b in buckets]
    ).repeat(popsize, 1)
    body = server.model.base_model
    with server.backbone.compute():
        body(input_ids=ids, attention_mask=mask)


def gradient_step(server: EvaluationServer, seed: int) -> dict | None:
    """Peak memory and time of one gradient-LoRA training step (the baseline's: peft LoRA
    on q,v with r = 8, AdamW, the whole train split); None without peft. Adds LoRA
    layers to the server's model, so it runs last."""
    from types import SimpleNamespace

    from dfo_lora.baselines.common import train_loss
    from dfo_lora.baselines.lora import add_lora
    from dfo_lora.extras import require_peft

    try:
        require_peft("bench")
    except UserError:
        return None
    device = server.backbone.device
    ctx = SimpleNamespace(server=server, notes=[], config=SimpleNamespace(seed=seed))
    params = add_lora(ctx, "gradient-lora", ["q", "v"], 8, 8.0)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=5e-4)
    with peak_memory(device) as mem:
        start = time.perf_counter()
        loss, _ = train_loss(server, server.loss_name, False)
        loss.backward()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"peak_mem_bytes": mem.bytes, "time_s": seconds}


def run_bench(
    spec: ServerSpec,
    popsize: int = 20,
    naive_per_layer: int = 1,
    candidate_scale: float = 1.0,
    seed: int = 0,
    server: EvaluationServer | None = None,
    task_label: str | None = None,
) -> dict:
    """All figures of `dfo-lora bench` as one dict (of `server` when given, else of the
    server that `spec` builds)."""
    server = server or build_server(spec)
    device = server.backbone.device
    info = server.info()

    start = time.perf_counter()
    for layer in range(server.num_layers):  # each layer's maps, built once per run
        server.space.factors(layer, torch.zeros(1, server.dim), server.backbone.dtype)
    setup_time = time.perf_counter() - start
    start = time.perf_counter()
    if server.options.compile:  # the one-time compile (every bucket's shapes), timed apart
        server.score(0, np.zeros((popsize, server.dim)))
    compile_time = time.perf_counter() - start
    dtype = server.backbone.autocast or server.backbone.dtype  # the matmuls' dtype
    dtype_name = DTYPE_NAMES[dtype]
    peak = MatmulPeak(dtype, device, peak_size(dtype, device))
    naive = NaiveScorer(server, plain_model_copy(server))
    # Memory of one call of each, apart from the timed round: a layer-0 score runs every
    # layer, and a call's transient memory is the same at every layer.
    with peak_memory(device) as server_mem:
        server.score(0, np.zeros((popsize, server.dim)))
    with peak_memory(device) as naive_mem:
        naive.score(0, np.zeros(server.dim))
    if server.graphs is not None:  # a run captures each layer once per round: so does this one
        server.graphs.invalidate()
    times = interleaved_round(server, naive, popsize, naive_per_layer, seed, candidate_scale, peak)
    del naive
    evals, server_time = times.evals, times.seconds
    naive_evals, naive_time = times.naive_evals, times.naive_seconds
    flops, counted_as = count_round_flops(server, popsize, np.random.default_rng(seed + 2))

    with peak_memory(device) as plain_mem:
        plain_stacked_forward(server, popsize)

    peaks = {dtype_name: peak.flops_per_s}
    for other in (torch.float32, torch.bfloat16):  # reported beside it, measured once
        if DTYPE_NAMES[other] not in peaks:
            peaks[DTYPE_NAMES[other]] = matmul_peak(other, device)
    try:  # an optional figure: a failure here must not lose the others
        with eager(server.layers):
            step, step_error = gradient_step(server, seed), None
    except Exception as exc:  # noqa: BLE001
        step, step_error = None, f"{type(exc).__name__}: {exc}"
    achieved = flops / server_time
    evals_per_s = evals / server_time
    naive_evals_per_s = naive_evals / naive_time
    return {
        "model": info["model"],
        "task": task_label or spec.task,
        "dtype": dtype_name + ("-mixed" if server.backbone.autocast else ""),
        "device": info["device"],
        "popsize": popsize,
        "n_train": info["split_sizes"]["train"],
        "num_layers": info["num_layers"],
        "train_tokens": info["train_tokens"],
        "train_padded_tokens": info["train_padded_tokens"],
        "evaluations": evals,
        "server_time_s": server_time,
        "evals_per_s": evals_per_s,
        "tokens_per_s": evals_per_s * info["train_tokens"],
        "naive_evaluations": naive_evals,
        "naive_time_s": naive_time,
        "naive_evals_per_s": naive_evals_per_s,
        "naive_tokens_per_s": naive_evals_per_s * info["train_tokens"],
        "speedup": evals_per_s / naive_evals_per_s,
        "round_flops": flops,
        "flops_counted_with": counted_as,
        "achieved_flops_per_s": achieved,
        "matmul_peak_flops_per_s": peaks,
        "peak_fraction": achieved / peak.flops_per_s,
        "peak_sampled_with_round": dtype_name,
        "peak_mem_bytes": server_mem.bytes,
        "naive_peak_mem_bytes": naive_mem.bytes,
        "plain_stacked_forward_peak_mem_bytes": plain_mem.bytes,
        "mem_vs_plain_stacked": server_mem.bytes / max(1, plain_mem.bytes),
        "gradient_step_peak_mem_bytes": step and step["peak_mem_bytes"],
        "gradient_step_time_s": step and step["time_s"],
        "gradient_step_error": step_error,
        "chunk_tokens": server.chunk_tokens,
        "maps_setup_s": setup_time,
        "compile": server.options.compile,
        "compile_s": compile_time,
        "cuda_graphs": bool(server.options.cuda_graphs),
        "graph_captures": server.graphs.captures if server.graphs is not None else 0,
        "projected_8000_evals_s": setup_time + compile_time + PAPER_BUDGET / evals_per_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_report(result: dict) -> str:
    """Human-readable lines for the terminal."""
    gib = 2**30
    peaks = result["matmul_peak_flops_per_s"]
    lines = [
        f"model {result['model']}  task {result['task']}  dtype {result['dtype']}  "
        f"device {result['device']}  P={result['popsize']}  N={result['n_train']}  "
        f"L={result['num_layers']}",
        f"server : {result['evals_per_s']:.2f} evals/s  {result['tokens_per_s']:.0f} tokens/s  "
        f"({result['evaluations']} evals, one full round, {result['server_time_s']:.1f} s)",
        f"naive  : {result['naive_evals_per_s']:.2f} evals/s  "
        f"{result['naive_tokens_per_s']:.0f} tokens/s  ({result['naive_evaluations']} evals)",
        f"speedup: {result['speedup']:.2f}x",
        f"FLOP/s : {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
        f"{100 * result['peak_fraction']:.0f}% of {result['dtype']} matmul peak "
        f"(fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s)",
        f"memory : server {result['peak_mem_bytes'] / gib:.2f} GiB, naive "
        f"{result['naive_peak_mem_bytes'] / gib:.2f} GiB, plain stacked forward "
        f"{result['plain_stacked_forward_peak_mem_bytes'] / gib:.2f} GiB "
        f"(ratio {result['mem_vs_plain_stacked']:.2f})"
        + (
            f", one gradient-LoRA step {result['gradient_step_peak_mem_bytes'] / gib:.2f} GiB "
            f"({result['gradient_step_time_s']:.2f} s)"
            if result["gradient_step_peak_mem_bytes"] is not None
            else ""
        ),
        f"paper  : {PAPER_BUDGET} evaluations (the paper's run) would take "
        f"{result['projected_8000_evals_s']:.1f} s at this rate (with the "
        f"{result['maps_setup_s']:.1f} s of building the projection maps once"
        + (f", {result['compile_s']:.1f} s of compiling)" if result["compile"] else ")"),
    ]
    return "\n".join(lines)


def main_json(result: dict) -> str:
    return json.dumps(result, sort_keys=True)
