"""The evaluation server: a frozen model that scores whole populations of z vectors.

It owns the model and the tokenized splits on one device. Its API takes and returns
numpy arrays and plain dicts, so the same object runs in-process or as a Ray actor:

    score(layer, Z[P, d]) -> {"loss": (P,), "accuracy": (P,)}
    commit(layer, z[d])          # the layer's current best; all other layers stay fixed
    evaluate(split) -> {"accuracy": ..., "loss": ..., ...}

What makes `score` fast (ARCHITECTURE.md), each exact up to dtype rounding:
- prefix cache: the train set's input to every layer under the committed state is
  kept; scoring layer l runs only layers l..L-1; a commit at layer j invalidates the
  cache above j only;
- population batching: candidates are stacked into one batch (P' blocks of n sequences)
  and their weights applied by batched matmuls (the search space's modules, see
  dfo_lora/spaces: the server only talks to that interface); P' is chosen so a chunk holds
  at most `max_tokens` tokens (by default sized from free device memory), which bounds
  memory;
- shared first step: at layer l the base projections of the layer input run once;
- verbalizer-only logits, at the slot position only; the last layer runs its attention
  at every position and the rest (residual, norms, MLP) at the slot only;
- length buckets: little padding (right padding; causal models need no padding mask),
  cut finer for the train split, which is scored P-stacked;
- shared prefix: a prompt space's prompt, the same tokens in front of every example,
  runs once per candidate on a causal model, its keys and values read by the rest of
  each sequence through the model's own cache (`_prefixed_logits`);
- on CUDA, with `cuda_graphs`, the layers above the searched one replayed from graphs
  captured per shape (server/graphs.py; chunks padded to a multiple of GRAPH_ROWS
  candidates so that varying population sizes share a few shapes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from dfo_lora.backbone import Backbone
from dfo_lora.backbone.fusion import compile_layers, restore_eager
from dfo_lora.backbone.stack import PrefixReader, StackInputs
from dfo_lora.errors import UserError
from dfo_lora.server.batching import Bucket, make_buckets
from dfo_lora.server.graphs import LayerGraphs, pad_weights, padded_rows
from dfo_lora.server.losses import LOSSES, per_example_loss
from dfo_lora.spaces import space_class, take
from dfo_lora.spaces.lora import LoraConfig
from dfo_lora.spaces.statistics import ZeroStateTrain, measure

CPU_CHUNK_TOKENS = 16384  # padded tokens per stacked chunk on a CPU (BENCHMARKS.md)
# Padded tokens worth one more call for the P-stacked train split on a CPU: sst2, k = 16
# gets 462 tokens for 443 real in 8 buckets (537 in 3 at 64; BENCHMARKS.md "No wasted work")
TRAIN_CPU_BUCKET_CALL_COST = 4
# The same on CUDA, where a call's launches and Python cost more than its padding: on an
# H200 (roberta-large shape, P = 20) one bucket of 1,312 padded tokens beat eight of 633
# (740 against 701 evals/s), so 7 calls were worth more than 679 tokens, ~97 a call
# (BENCHMARKS.md "Real shapes on one GPU"); 128 is the round figure above that bound.
TRAIN_CUDA_BUCKET_CALL_COST = 128
GRAPH_ROWS = 4  # cuda_graphs: a chunk's candidates padded up to a multiple of this


@dataclass(frozen=True)
class ServerOptions:
    """Performance knobs; none of them changes a result beyond dtype rounding."""

    # padded tokens per stacked chunk (candidates x examples); None = auto: CPU_CHUNK_TOKENS
    # on a CPU, on CUDA as many as a quarter of the free device memory holds
    max_tokens: int | None = None
    bucket_call_cost: int = 64  # padding tokens worth one more forward call, for bucketing
    # The same for the train split, which `score` runs P times over (P candidates stacked):
    # a padded token there costs P tokens of work while a bucket costs one more call per
    # layer. None = auto, by device (`train_call_cost`): TRAIN_CPU_BUCKET_CALL_COST on a CPU,
    # where FLOPs dominate and it pays to cut finer; TRAIN_CUDA_BUCKET_CALL_COST on CUDA,
    # where calls dominate (BENCHMARKS.md).
    train_bucket_call_cost: int | None = None
    max_buckets: int = 8  # length buckets per split at most
    prefix_cache: bool = True  # reuse layer inputs below the searched layer
    slot_only_last_layer: bool = True  # last layer's MLP etc. at the slot position only
    # a prompt space on a causal LM: the prompt's positions once per candidate in `score`,
    # not once per example (their keys and values reach the examples through a cache)
    shared_prefix: bool = True
    # torch.compile each layer's norms and MLP (backbone/fusion.py): fused elementwise work
    compile: bool = False
    # CUDA: replay the layers above the searched one from captured graphs (server/graphs.py);
    # "snapshot" is its CPU stand-in for tests (exact, and as stale as a graph if not dropped)
    cuda_graphs: bool | str = False

    def validate(self) -> None:
        for name in ("max_tokens", "max_buckets"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.cuda_graphs not in (False, True, "snapshot"):
            raise UserError(f"cuda_graphs: {self.cuda_graphs!r} is not true or false")
        if self.cuda_graphs and self.compile:
            raise UserError(
                "cuda_graphs and compile: choose one (a graph captures the eager kernels)"
            )


class EvaluationServer:
    """Scores populations of candidates of a search space on a frozen backbone."""

    def __init__(
        self,
        backbone: Backbone,
        splits: dict[str, list],
        verbalizer_ids: list[int],
        metric: str = "accuracy",
        space=None,  # a space config (dfo_lora.spaces.SPACES); None: the paper's LoRA
        loss: str = "ce",
        options: ServerOptions | None = None,
        notes: list[str] | None = None,
        calibrate: bool = False,
    ):
        if loss not in LOSSES:
            raise UserError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
        if not splits.get("train"):
            raise UserError("train split is empty: nothing to score")
        self.backbone = backbone
        self.model = backbone.model
        self.arch = backbone.arch
        self.layers = self.arch.layers(self.model)
        self.loss_name = loss
        self.metric = metric
        self.calibrate = calibrate
        self.notes = [n for n in (notes or []) if n]
        self.options = options or ServerOptions()
        self.options.validate()
        space = space or LoraConfig()
        space.validate()
        kind = space_class(space)
        self.verbalizer = torch.tensor(verbalizer_ids, device=backbone.device)
        splits = {k: kind.prepare_examples(space, self.model, v) for k, v in splits.items()}
        pad_id = _pad_id(backbone.tokenizer)
        self.buckets: dict[str, list[Bucket]] = {
            name: make_buckets(
                examples,
                pad_id,
                backbone.device,
                self._bucket_call_cost(name),
                self.options.max_buckets,
            )
            for name, examples in splits.items()
        }
        self.split_sizes = {name: len(examples) for name, examples in splits.items()}
        # The space's modules in every layer (the zero state: exactly the frozen model).
        self.adapted = [kind.install(space, self.arch, self.model, layer) for layer in self.layers]
        entered = {  # layer 0's input and each layer's extra arguments, per bucket
            id(b): self.arch.enter(self.model, b.input_ids, b.attention_mask)
            for buckets in self.buckets.values()
            for b in buckets
        }
        self._stack_inputs = {key: inputs for key, (_, inputs) in entered.items()}
        self.z = np.zeros((self.num_layers, space.intrinsic_dim))
        self._cache: list[list[torch.Tensor] | None] = [None] * (self.num_layers + 1)
        self._cache[0] = [entered[id(b)][0] for b in self.buckets["train"]]
        del entered
        self._valid_upto = 0
        # The train split's statistics the space asks for, measured on the zero state.
        train = ZeroStateTrain(
            self.arch,
            self.model,
            self.layers,
            self.buckets["train"],
            self._advance_cache_all(),
            self._stack_inputs,
        )
        needs = kind.requirements(space)
        stats = measure(needs, train, self.adapted, self.verbalizer, backbone.dtype)
        self.space = kind.build(space, self.arch, self.model, self.adapted, stats, backbone.device)
        self._after_prefix = self._enter_after_prefix()
        if self.options.compile:  # (re)compiled from eager, as a backbone may be reused
            path = self.arch.attention_path(self.model)
            compile_layers(self.layers, [layer.get_submodule(path) for layer in self.layers])
        else:
            restore_eager(self.layers)  # a reused backbone may come compiled
        self.chunk_tokens = self.options.max_tokens or self._auto_chunk_tokens()
        graphs = self.options.cuda_graphs
        self.graphs = (
            LayerGraphs("snapshot" if graphs == "snapshot" else "cuda", backbone.device)
            if graphs
            else None
        )
        self._repeated: dict[tuple[int, int], tuple] = {}  # (bucket, rows) -> inputs, slots

    def _enter_after_prefix(self) -> dict[int, tuple[StackInputs, StackInputs]]:
        """Per train bucket, the arguments of the shared prefix alone and of the rest after
        it (`Architecture.enter_after_prefix`), where `score` runs the prefix once per
        candidate (`shared_prefix`; before CUDA graphs, as it saves FLOPs and graphs save
        launches); empty where it does not (no shared prefix, a masked LM, a model that
        hands its layers no cache)."""
        n = self.space.shared_prefix
        if not (n and self.options.shared_prefix):
            return {}
        entered = {}
        for bucket in self.buckets["train"]:
            ids = bucket.input_ids
            pair = self.arch.enter_after_prefix(self.model, ids[:1, :n], ids[:, n:])
            if pair is None:
                return {}
            entered[id(bucket)] = pair
        return entered

    def _bucket_call_cost(self, split: str) -> int:
        """Padded tokens worth one more forward call when bucketing `split`."""
        options = self.options
        if split != "train":
            return options.bucket_call_cost
        return train_call_cost(options, self.backbone.device)

    # ------------------------------------------------------------------ facts
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dim(self) -> int:
        return self.space.dim

    def info(self) -> dict:
        """Plain facts about this server, for the search loop and logs."""
        train = self.buckets["train"]
        return {
            "model": self.backbone.name,
            "num_layers": self.num_layers,
            "dim": self.dim,
            "dtype": self.backbone.precision,
            "device": str(self.backbone.device),
            "split_sizes": dict(self.split_sizes),
            "train_tokens": sum(b.real_tokens for b in train),
            "train_padded_tokens": sum(b.size * b.length for b in train),
            "sigma_hat": list(self.space.sigma_hat),
            "space": self.space.name,
            "space_state": self.space.state(),
            "metric": self.metric,
            "calibrate": self.calibrate,
            "notes": list(self.notes),
        }

    def peak_memory(self) -> int:
        """Peak bytes: GPU allocations on CUDA, else the process's RSS high-water mark."""
        if self.backbone.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.backbone.device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    # ------------------------------------------------------------------ set-up
    def _advance_cache_all(self) -> list[list[torch.Tensor]]:
        """The zero state's train inputs to every layer (statistics, at set-up)."""
        self._advance_cache(self.num_layers - 1)
        return self._cache[: self.num_layers]

    @torch.inference_mode()
    def _auto_chunk_tokens(self) -> int:
        """Tokens per stacked chunk when `max_tokens` is not given.

        CPU: CPU_CHUNK_TOKENS (larger chunks gain nothing there, BENCHMARKS.md). CUDA: the
        peak bytes per token of one measured forward of layer 0 on the train set, and as
        many tokens as a quarter of the free device memory holds, so a whole population
        is one chunk wherever it fits, with room for the prefix cache and the allocator.
        """
        device = self.backbone.device
        if device.type != "cuda":
            return CPU_CHUNK_TOKENS
        train = self.buckets["train"]
        index = max(range(len(train)), key=lambda i: train[i].size * train[i].length)
        bucket, h0 = train[index], self._cache[0][index]
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        self.arch.run_layer(self.layers[0], h0, self._stack_inputs[id(bucket)])
        torch.cuda.synchronize(device)
        per_token = (torch.cuda.max_memory_allocated(device) - before) / (
            bucket.size * bucket.length
        )
        free, _ = torch.cuda.mem_get_info(device)
        return max(CPU_CHUNK_TOKENS, int(0.25 * free / max(per_token, 1.0)))

    # ------------------------------------------------------------------ state
    def commit(self, layer: int, z: np.ndarray) -> None:
        """Fix layer `layer` at z; layers above see it from now on."""
        z = np.asarray(z, dtype=np.float64).reshape(self.dim)
        if np.array_equal(z, self.z[layer]):
            return
        self.z[layer] = z
        if np.any(z):
            weights = self.space.weights(layer, torch.from_numpy(z)[None], self.backbone.dtype)
            self.adapted[layer].commit(weights)
        else:
            self.adapted[layer].commit(None)
        self._changed(layer)

    def _changed(self, layer: int) -> None:
        """Layer `layer`'s committed state changed: what was computed from it is stale."""
        self._valid_upto = min(self._valid_upto, layer)
        if self.graphs is not None:
            self.graphs.invalidate(layer)

    def install_weights(self, layer: int, weights) -> None:
        """Put weights that are no committed z into a layer's modules: the autograd
        tensors of an in-process trainer (baselines/subspace_gradient.py). The layer's z
        reads NaN (unknown) until the next `commit` or `set_state` replaces the weights."""
        self.adapted[layer].commit(weights)
        self.z[layer] = np.nan
        self._changed(layer)

    def set_state(self, z: np.ndarray) -> None:
        """Commit every layer at once: z (L, d)."""
        z = np.asarray(z, dtype=np.float64)
        if z.shape != self.z.shape:
            raise UserError(f"state: expected z of shape {self.z.shape}, got {z.shape}")
        for layer in range(self.num_layers):
            self.commit(layer, z[layer])

    def get_state(self) -> np.ndarray:
        return self.z.copy()

    def state_factors(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """fp32 weights of a state z (L, d), for export, of every layer whose z is not zero:
        "<layer>.<group>.<name>", LoRA's "<layer>.<target>.A" (r, in) and ".B" (out, r)
        (the space's `export_tensors`). The committed state is untouched."""
        z = np.asarray(z, dtype=np.float64)
        out = {}
        for layer in np.flatnonzero(np.any(z != 0, axis=1)):
            for key, value in self.space.export_tensors(int(layer), z[layer]).items():
                out[f"{layer}.{key}"] = value
        return out

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _advance_cache(self, layer: int) -> list[torch.Tensor]:
        """Train-set input to `layer` under the committed state, reusing what is valid."""
        if not self.options.prefix_cache:
            self._valid_upto = 0
        with self.backbone.compute():
            while self._valid_upto < layer:
                j = self._valid_upto
                self._cache[j + 1] = [
                    self.arch.run_layer(self.layers[j], h, self._stack_inputs[id(b)])
                    for h, b in zip(self._cache[j], self.buckets["train"], strict=True)
                ]
                self._valid_upto = j + 1
        return self._cache[layer]

    @torch.inference_mode()
    def score(self, layer: int, candidates: np.ndarray) -> dict[str, np.ndarray]:
        """Train loss and accuracy of each candidate z for `layer`, others at their commits."""
        cand = np.asarray(candidates, dtype=np.float64)
        if cand.ndim != 2 or cand.shape[1] != self.dim:
            raise UserError(f"candidates: expected shape (P, {self.dim}), got {cand.shape}")
        if not 0 <= layer < self.num_layers:
            raise UserError(f"layer: {layer} is outside 0..{self.num_layers - 1}")
        num = cand.shape[0]
        weights = self.space.weights(layer, torch.from_numpy(cand), self.backbone.dtype)
        inputs = self._advance_cache(layer)
        n = self.split_sizes["train"]
        logits = torch.zeros(num, n, len(self.verbalizer), dtype=torch.float32)  # (P, N, C)
        labels = torch.zeros(n, dtype=torch.long)
        for h0, bucket in zip(inputs, self.buckets["train"], strict=True):
            per_chunk = max(1, self.chunk_tokens // (bucket.size * bucket.length))
            rows = torch.from_numpy(bucket.order)
            labels[rows] = bucket.labels.cpu()
            for start in range(0, num, per_chunk):
                stop = min(num, start + per_chunk)
                chunk = take(weights, start, stop)
                with self.backbone.compute():
                    if self._after_prefix:
                        out = self._prefixed_logits(layer, h0, bucket, chunk, stop - start)
                    elif self.graphs is not None and layer < self.num_layers - 1:
                        out = self._graphed_logits(
                            layer, h0, bucket, chunk, stop - start, per_chunk
                        )
                    else:
                        out = self._candidate_logits(layer, h0, bucket, chunk, stop - start)
                logits[start:stop, rows] = out.float().cpu()
        if self.calibrate:  # each candidate judged after removing its own label bias
            logits = logits - logits.mean(1, keepdim=True)
        losses = _worst_if_nan(per_example_loss(self.loss_name, logits, labels.expand(num, -1)))
        correct = (logits.argmax(-1) == labels).double()
        return {"loss": losses.double().mean(1).numpy(), "accuracy": correct.mean(1).numpy()}

    def _candidate_logits(self, layer, h0, bucket, chunk, num) -> torch.Tensor:
        """Run layers layer..L-1 for `num` stacked candidates; verbalizer logits (P', n, C)."""
        modules = self.adapted[layer]
        modules.set_candidates(chunk)
        try:
            hidden = h0.repeat(num, 1, 1)  # (P'*n, T, H)
            inputs = self._stack_inputs[id(bucket)].repeat(num)
            at_slot = self._run_to_slots(layer, hidden, inputs, bucket.slots.repeat(num))
        finally:
            modules.clear_candidates()
        logits = self.arch.verbalizer_logits(self.model, at_slot, self.verbalizer)
        return logits.view(num, bucket.size, -1)

    def _prefixed_logits(self, layer, h0, bucket, chunk, num) -> torch.Tensor:
        """`_candidate_logits` with the shared prefix (n positions in front of every
        sequence) run once per candidate: layers layer..L-1 on the prefix alone (P', n),
        which fills a cache with its keys and values, then on the rest of each sequence
        (P' * b, T - n), whose attention reads the prefix there. Equal to running the whole
        sequences up to rounding: the prefix's positions do not read the later ones."""
        n = self.space.shared_prefix
        alone, after = self._after_prefix[id(bucket)]
        cache = copy.deepcopy(alone.cache())  # empty; filled by the prefix's layers
        modules = self.adapted[layer]
        modules.set_candidates(chunk)
        try:
            with self.space.prefix_span(self.adapted, "prompt"):
                self._run_to_slots(
                    layer,
                    h0[:1, :n].repeat(num, 1, 1),
                    alone.repeat(num).with_cache(cache),
                    torch.zeros(num, dtype=torch.long, device=h0.device),
                )
        finally:
            modules.clear_candidates()
        with self.space.prefix_span(self.adapted, "off"):
            at_slot = self._run_to_slots(
                layer,
                h0[:, n:].repeat(num, 1, 1),
                after.repeat(num).with_cache(PrefixReader(cache, bucket.size)),
                (bucket.slots - n).repeat(num),
            )
        logits = self.arch.verbalizer_logits(self.model, at_slot, self.verbalizer)
        return logits.view(num, bucket.size, -1)

    def _graphed_logits(self, layer, h0, bucket, chunk, num, per_chunk) -> torch.Tensor:
        """`_candidate_logits` with the layers above `layer` replayed from graphs: the
        chunk padded to `rows` candidates (a captured shape), layer `layer` run eager with
        the candidates, each layer above through its graph for (bucket, rows)."""
        rows = padded_rows(num, GRAPH_ROWS, max(per_chunk, num))
        key = (id(bucket), rows)
        if key not in self._repeated:  # static for the graphs: made once per shape
            self._repeated[key] = (
                self._stack_inputs[id(bucket)].repeat(rows),
                bucket.slots.repeat(rows),
            )
        inputs, slots = self._repeated[key]
        modules = self.adapted[layer]
        modules.set_candidates(pad_weights(chunk, rows))
        try:
            hidden = self.arch.run_layer(self.layers[layer], h0.repeat(rows, 1, 1), inputs)
        finally:
            modules.clear_candidates()
        last = self.num_layers - 1
        for j in range(layer + 1, last + 1):
            original = self.layers[j]

            def run(module, h, original=original, at_slots=j == last):
                rekeyed = inputs.for_module(module, original)
                if at_slots:
                    return self._last_layer_at_slots(module, h, rekeyed, slots)
                return self.arch.run_layer(module, h, rekeyed)

            hidden = self.graphs.run(j, key, original, run, hidden)
        logits = self.arch.verbalizer_logits(self.model, hidden, self.verbalizer)
        return logits.view(rows, bucket.size, -1)[:num]

    def _run_to_slots(self, first: int, hidden, inputs, slots: torch.Tensor) -> torch.Tensor:
        """Layers first..L-1 on `hidden` (B, T, H); the last one's output at the slots (B, H)."""
        last = self.num_layers - 1
        for j in range(first, last):
            hidden = self.arch.run_layer(self.layers[j], hidden, inputs)
        return self._last_layer_at_slots(self.layers[last], hidden, inputs, slots)

    def _last_layer_at_slots(self, layer, hidden, inputs, slots: torch.Tensor) -> torch.Tensor:
        """The last layer's output (B, H) at the slots: its per-token part at the slots only
        (`slot_only_last_layer`), else the whole layer and a gather."""
        if self.options.slot_only_last_layer:
            return self.arch.run_layer_at_slots(self.model, layer, hidden, inputs, slots)
        hidden = self.arch.run_layer(layer, hidden, inputs)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), slots]

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def predict(self, split: str) -> dict[str, np.ndarray]:
        """Verbalizer logits (N, C) and labels of a split under the committed state."""
        if split not in self.buckets:
            raise UserError(f"split: {split!r} is not loaded (have {', '.join(self.buckets)})")
        n = self.split_sizes[split]
        logits = np.zeros((n, len(self.verbalizer)), dtype=np.float32)
        labels = np.zeros(n, dtype=np.int64)
        for bucket in self.buckets[split]:
            per_chunk = max(1, self.chunk_tokens // bucket.length)
            for start in range(0, bucket.size, per_chunk):
                rows = slice(start, start + per_chunk)
                ids = bucket.input_ids[rows]
                with self.backbone.compute():
                    hidden, inputs = self.arch.enter(self.model, ids, bucket.attention_mask[rows])
                    at_slot = self._run_to_slots(0, hidden, inputs, bucket.slots[rows])
                    out = self.arch.verbalizer_logits(self.model, at_slot, self.verbalizer)
                logits[bucket.order[rows]] = out.float().cpu().numpy()
                labels[bucket.order[rows]] = bucket.labels[rows].cpu().numpy()
        return {"logits": logits, "labels": labels}

    def evaluate(self, split: str, calibrate: bool | None = None) -> dict[str, float]:
        """Metric(s) and mean loss of a split under the committed state.

        With `calibrate`, the mean train logits of the same state are subtracted first
        (the bias estimated from the k-shot train set only, never from the split); the
        metric of the plain prompt's argmax is reported too, as `uncalibrated_<metric>`.
        `calibrate=None` is the server's own setting; True/False overrides it for this call
        (results.json's `calibrated_zero_shot`, the baselines).
        """
        from dfo_lora.tasks import compute_metric

        calibrate = self.calibrate if calibrate is None else calibrate
        out = self.predict(split)
        logits, labels = torch.from_numpy(out["logits"]), torch.from_numpy(out["labels"])
        extra = {}
        if calibrate:
            plain = compute_metric(self.metric, out["logits"].argmax(-1), out["labels"])
            extra = {f"uncalibrated_{k}": float(v) for k, v in plain.items()}
            logits = logits - torch.from_numpy(self.predict("train")["logits"]).mean(0)
        metrics = compute_metric(self.metric, logits.argmax(-1).numpy(), out["labels"])
        loss = _worst_if_nan(per_example_loss(self.loss_name, logits, labels)).mean()
        return {**{k: float(v) for k, v in metrics.items()}, "loss": float(loss), **extra}


WORST_LOSS = 1e4  # a NaN/inf loss counts as this (worse than any real CE/hinge value)


def train_call_cost(options: ServerOptions, device: torch.device) -> int:
    """Padded train tokens worth one more stacked call on `device` (ServerOptions)."""
    if options.train_bucket_call_cost is not None:
        return options.train_bucket_call_cost
    if device.type == "cuda":
        return TRAIN_CUDA_BUCKET_CALL_COST
    return TRAIN_CPU_BUCKET_CALL_COST


def _worst_if_nan(losses: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(losses, nan=WORST_LOSS, posinf=WORST_LOSS, neginf=WORST_LOSS)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
