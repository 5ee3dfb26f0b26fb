"""Replaying the layers above the searched one from captured graphs (`cuda_graphs`).

Why: on a GPU a round at the paper's shapes is bound by kernel launches and Python, not
by FLOPs (BENCHMARKS.md "Real shapes on one GPU": a layer of 20 x 32 short sequences is
~0.1 ms of matmuls, its HF forward ~15 launches and Python take longer). While layer l
is searched, every layer above it holds only its committed weights, and the stacked
shape of one bucket (P candidates x n sequences, T tokens) repeats every generation. So
each such layer's forward is captured once per (layer, bucket, rows) and replayed: one
launch per layer instead of its Python and kernels.

What a graph holds: the kernels it recorded, reading the memory of its static input, of
the tensors its inputs closed over (the bucket's repeated masks and rotary tables, kept
alive by the graph) and of the layer's weights as they were at capture. So any change of
a layer's committed state must drop that layer's graphs: the server calls `invalidate`
on `commit`, `install_weights` and `set_state`. The first use of a shape captures it
(after a warm-up run on a side stream, as CUDA requires); a replay copies the hidden
state into the static input and returns the static output.

Kinds: "cuda" (torch.cuda.CUDAGraph, all graphs sharing one memory pool: they are never
replayed concurrently) and "snapshot", the CPU stand-in the tests use: at capture it
keeps a deep copy of the layer and replays by running the copy on the static input, so
it too goes on computing with the weights it captured. It gives the eager results
exactly, and a missing invalidation shows as stale results, as it would on a GPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dfo_lora.errors import UserError

GRAPH_KINDS = ("cuda", "snapshot")

# A layer run: (the layer module, hidden (B, T, H)) -> its output. The callable closes
# over the stack inputs of one bucket and one row count; the graph keeps it alive.
LayerRun = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass
class _Graph:
    static_in: torch.Tensor
    static_out: torch.Tensor
    replay: Callable[[], None]
    keep: tuple = field(default=())  # what the recorded kernels read besides the buffers


class LayerGraphs:
    """Captured layer forwards, keyed by (layer index, shape key); see the module doc."""

    def __init__(self, kind: str, device: torch.device):
        if kind not in GRAPH_KINDS:
            raise UserError(f"graphs: {kind!r} is not one of {', '.join(GRAPH_KINDS)}")
        if kind == "cuda" and device.type != "cuda":
            raise UserError(
                f"cuda_graphs: needs a CUDA device, the model is on {device} (leave it off)"
            )
        self.kind = kind
        self._graphs: dict[tuple[int, tuple], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if kind == "cuda" else None
        self.captures = 0  # counters, for the benchmark and the tests
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(
        self, index: int, key: tuple, layer: nn.Module, run: LayerRun, hidden: torch.Tensor
    ) -> torch.Tensor:
        """`run(layer, hidden)` through the graph of (index, key), captured on first use.
        The result is the graph's static output: read it before the next replay of the
        same graph (the server's next layer copies it into its own input at once)."""
        graph = self._graphs.get((index, key))
        if graph is None:
            graph = self._capture(layer, run, hidden)
            self._graphs[(index, key)] = graph
            self.captures += 1
        graph.static_in.copy_(hidden)
        graph.replay()
        self.replays += 1
        return graph.static_out

    def invalidate(self, index: int | None = None) -> None:
        """Drop the graphs of layer `index` (its committed state changed), or all."""
        if index is None:
            self._graphs.clear()
        else:
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != index}

    def _capture(self, layer: nn.Module, run: LayerRun, hidden: torch.Tensor) -> _Graph:
        static_in = hidden.clone()
        if self.kind == "snapshot":
            frozen = copy.deepcopy(layer)
            holder: dict[str, torch.Tensor] = {}

            def replay() -> None:
                holder["out"].copy_(run(frozen, static_in))

            holder["out"] = run(frozen, static_in).clone()
            return _Graph(static_in, holder["out"], replay, keep=(frozen, run))
        side = torch.cuda.Stream(device=hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(side):  # warm-up: lazy inits and autotuning off the capture
            for _ in range(2):
                run(layer, static_in)
        torch.cuda.current_stream(hidden.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = run(layer, static_in)
        return _Graph(static_in, static_out, graph.replay, keep=(graph, run))


def padded_rows(rows: int, multiple: int, most: int) -> int:
    """A chunk of `rows` candidates padded up to a multiple of `multiple` (at most `most`),
    so that populations of varying size (Fireworks' sparks, an elitist's extra
    candidate) share a few captured shapes."""
    return max(rows, min(most, -(-rows // multiple) * multiple))


def pad_weights(weights: dict, rows: int) -> dict:
    """A chunk's candidate weights with the last candidate repeated up to `rows` (the
    padded candidates' results are dropped)."""
    out = {}
    for key, group in weights.items():
        out[key] = tuple(
            t
            if t.shape[0] >= rows
            else torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])
            for t in group
        )
    return out
