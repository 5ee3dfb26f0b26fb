"""One typed config for a tuning run: defaults, YAML loading, CLI overrides, validation.

Defaults are the paper's (arXiv 2403.01754): C-LoRA on q and k, r = 4, d = 500, popsize 20,
budget 8000, alpha = sigma = 1, cross-entropy, one generation per layer per visit,
bottom-up, commit the best-ever candidate. Every value is validated with a message that
names the field; an unknown key gets a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from dfo_lora.backbone.loading import DTYPE_CHOICES
from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.options import Option
from dfo_lora.search import policy
from dfo_lora.search.policy import (  # noqa: F401 - parse_layers is re-exported here
    COMMITS,
    FWA_VARIANTS,
    HYBRID_MODES,
    LAYER_ORDERS,
    SELECTIONS,
    WITHOUT_DEV,
    parse_layers,
)
from dfo_lora.server import LOSSES, ServerOptions
from dfo_lora.server.factory import ServerSpec
from dfo_lora.spaces import (
    check_space_name,
    option_help,
    option_users,
    options_alike,
    space_config,
)


def opt(default, help_text: str, shown: str | None = None):
    """A config field with its help text (shown by `dfo-lora tune --help`, with `shown` as
    the default where the field's own default is None: "the space's default")."""
    metadata = {"option": Option(default, help_text, shown=shown)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def space_opt(key: str, default):
    """A field that only some spaces read, its help from those spaces' declarations; where
    they differ, each space's default is in brackets (None: the space's own default)."""
    shown = None if options_alike(key) else "the space's, in brackets"
    return opt(default, option_help(key), shown=shown)


FIT_SPLITS = ("train", "train+dev")
OPTIMIZERS = policy.RUN_OPTIMIZERS  # the optim registry's names + hybrid
BACKENDS = ("local", "ray")


@dataclass
class TuneConfig:
    """Everything that defines a tuning run (the output folder's config.yaml)."""

    # ---- model and data
    model: str = opt("smollm2-135m", "preset, local folder, .gguf file or hub id")
    task: str = opt("sst2", "registered task name or a YAML task file")
    data_dir: str | None = opt(
        None,
        "folder with <task>/{train,test}.jsonl, a datasets save_to_disk folder, or hf (the hub)",
        shown="$DFO_LORA_DATA, else ./shared/data or ../shared/data",
    )
    k: int = opt(16, "examples per class in train, and again in dev")
    seed: int = opt(42, "few-shot sample, projections and optimizers")
    test_limit: int | None = opt(
        None, "score only the first N test examples (quick runs)", shown="the whole split"
    )
    max_length: int = opt(256, "tokens per example; the text is cut, never the template")
    dtype: str = opt(
        "auto",
        "auto | bf16 | bf16-mixed | fp16 | fp32 (auto: bf16 where native, else fp32; "
        "bf16-mixed: fp32 weights and hidden states, bf16 matmuls)",
    )
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    trust_remote_code: bool = opt(
        False, "run a model folder's own modelling code (config.json auto_map); off unless asked"
    )
    # ---- search space
    space: str = opt(
        "lora",
        "lora (the paper: z -> LoRA factors) | hydra (HydraLoRA: a shared A, hydra_heads B "
        "heads, a per-token router; not mergeable) | series (bottleneck adapters after the "
        "targets' outputs, which must write the residual stream) | parallel (a bottleneck "
        "adapter beside each MLP) | bitfit (a bias shift on each target projection's output; "
        "not mergeable) | prompt (BBT: prompt_length prompt tokens in front, their input "
        "shifted; --layers 0) | deep-prompt (BBTv2: the same prompt shifted at every layer)",
    )
    targets: list[str] | None = space_opt("targets", None)
    rank: int = space_opt("rank", 4)
    hydra_heads: int = space_opt("hydra_heads", 3)
    adapter_size: int = space_opt("adapter_size", 8)
    prompt_length: int = space_opt("prompt_length", 50)
    adapter_down: str = space_opt("adapter_down", "searched")
    intrinsic_dim: int = opt(500, "d: entries of z per layer")
    class_dim: int | None = opt(
        None,
        "d per logit difference: a task of C classes gets d = class_dim * (C - 1) entries of "
        "z per layer in place of intrinsic_dim (config.yaml records the d used)",
        shown="none: intrinsic_dim",
    )
    alpha: float = opt(1.0, "projection std multiplier (BBTv2)")
    sigma: float = opt(1.0, "optimizer's initial step size (also in the projection std)")
    a_factor: str = space_opt("a_factor", "searched")
    b_basis: str = space_opt("b_basis", "random")
    basis_dim: int = space_opt("basis_dim", 32)
    loss: str = opt("ce", "ce | hinge | neg_acc")
    calibrate: bool = opt(
        False, "subtract each state's mean train logits before loss and metric (not the paper's)"
    )
    # ---- search
    optimizer: str = opt("cma", policy.optimizer_help())
    fwa_variant: str = opt("dynfwa", policy.fwa_variant_help())
    optimizer_options: dict = opt(
        {},
        "options of the (Fireworks) optimizer, e.g. n_fireworks=5,amplitude=2.0 (YAML: a mapping)",
    )
    layers: str = opt(
        "all",
        "layers searched: all | top:N | bottom:N | a list such as 0,4,20-29 (others stay at z = 0)",
    )
    hybrid_mode: str = opt("layer", "hybrid: cma on even layers (layer) or on even rounds (round)")
    popsize: int = opt(20, "candidates per generation")
    budget: int = opt(8000, 'candidate evaluations ("API calls")')
    generations_per_visit: int = opt(1, "generations at a layer before moving on")
    subspace_dim: int | None = opt(
        None,
        "k: each visit searches k fresh random directions of the layer's z around its "
        "current value, with a fresh optimizer (a growing space: over the rounds the search "
        "reaches more of z than k directions, each visit's step estimated in k dims)",
        shown="none: the whole z, one optimizer per layer for the run",
    )
    layer_order: str = opt("bottom_up", "bottom_up | top_down | random (per round)")
    commit: str = opt("best", "best (xbest, the paper) | mean (distribution centre)")
    select: str = opt(
        "metric",
        "state tested at the end: metric (best dev metric, ties by dev loss: BBT's rule) | "
        "loss (lowest dev loss) | final (the last state, no selection) | average (the mean "
        "of the states at the round ends, no selection: see average_last) | average_if_fit "
        "(the mean where the last state gets every train example right, else the last state: "
        "once the 32 examples are fitted, further rounds only overfit them)",
    )
    average_last: int = opt(
        0,
        "select: average(_if_fit): the mean of the last N round-end states; 0 = all of them "
        "and the start state (Polyak averaging of the search's path; for a delta linear in "
        "z, the mean of the deltas)",
    )
    fit_on: str = opt(
        "train",
        "train | train+dev: the split the search fits; train+dev fits all 2k examples per "
        "class (the dev split is then fitted, so it needs select: final)",
    )
    z_penalty: float = opt(
        0.0, "adds z_penalty * mean(z**2) of a candidate to its train loss (decay on z)"
    )
    elitist: bool = opt(
        False,
        "also score the layer's current z in each visit and commit only a candidate that beats "
        "it (1 more evaluation per visit)",
    )
    eval_every: int = opt(100, "evaluations between dev evaluations")
    checkpoint_every_s: float = opt(
        60.0,
        "seconds between checkpoints within a long layer visit (one is also written after "
        "every visit); inf: only after visits",
    )
    # ---- performance
    max_tokens: int | None = opt(
        None,
        "padded tokens per stacked chunk of candidates (bounds memory); auto: 16384 on a "
        "CPU, on CUDA what a quarter of the free device memory holds",
        shown="auto",
    )
    max_buckets: int = opt(8, "length buckets per split")
    prefix_cache: bool = opt(True, "reuse layer inputs below the searched layer")
    compile: bool = opt(
        False,
        "torch.compile each layer's norms and MLP (fused elementwise work; a one-time compile "
        "of seconds; equal results up to rounding)",
    )
    cuda_graphs: bool = opt(
        False,
        "CUDA: replay the layers above the searched one from graphs captured per shape "
        "(fewer launches; equal results up to rounding; not with compile)",
    )
    # ---- distributed (dfo_lora/distributed; the results do not depend on them)
    backend: str = opt("local", "local (in-process) | ray (server and optimizer actors)")
    address: str = opt("auto", "ray: auto (RAY_ADDRESS, a running or a new local Ray) or host:port")
    servers: int = opt(1, "ray: server actors, each a model replica scoring part of a generation")
    gpus_per_server: float = opt(0.0, "ray: GPUs per server actor (fractions share a GPU)")
    cpus_per_server: float = opt(1.0, "ray: CPUs per server actor (also its torch threads)")

    def validate(self) -> TuneConfig:
        self._resolve_class_dim()
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("fwa_variant", self.fwa_variant, FWA_VARIANTS)
        _check_choice("hybrid_mode", self.hybrid_mode, HYBRID_MODES)
        _check_choice("layer_order", self.layer_order, LAYER_ORDERS)
        _check_choice("commit", self.commit, COMMITS)
        policy.check_commit(self)
        _check_choice("select", self.select, SELECTIONS)
        _check_choice("fit_on", self.fit_on, FIT_SPLITS)
        if not isinstance(self.average_last, int) or self.average_last < 0:
            raise UserError(f"average_last: must be a whole number >= 0, got {self.average_last}")
        if self.fit_on == "train+dev" and self.select not in WITHOUT_DEV:
            raise UserError(
                "fit_on: train+dev fits the dev split, so select must be final or average(_if_fit) "
                f"(got {self.select!r})"
            )
        if not (self.z_penalty >= 0 and math.isfinite(self.z_penalty)):
            raise UserError(f"z_penalty: must be a finite number >= 0, got {self.z_penalty}")
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("dtype", self.dtype, DTYPE_CHOICES)
        _check_choice("backend", self.backend, BACKENDS)
        for name in (
            "k",
            "rank",
            "intrinsic_dim",
            "popsize",
            "budget",
            "generations_per_visit",
            "eval_every",
            "max_length",
            "max_buckets",
            "servers",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"{name}: must be a positive integer, got {getattr(self, name)}")
        if self.subspace_dim is not None and not 0 < self.subspace_dim <= self.intrinsic_dim:
            raise UserError(
                f"subspace_dim: must be in 1..intrinsic_dim ({self.intrinsic_dim}), "
                f"got {self.subspace_dim}"
            )
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise UserError(f"max_tokens: must be a positive integer, got {self.max_tokens}")
        if self.popsize < 2:
            raise UserError(f"popsize: must be at least 2, got {self.popsize}")
        for name in ("alpha", "sigma", "cpus_per_server"):  # inf would scale every delta to inf
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name}: must be a finite positive number, got {value}")
        if not self.checkpoint_every_s > 0:  # inf is meaningful: only after each visit
            raise UserError(f"checkpoint_every_s: must be positive, got {self.checkpoint_every_s}")
        gpus = float(self.gpus_per_server)
        if not (0 <= gpus <= 1 or gpus.is_integer() and gpus > 0):  # as Ray's num_gpus
            raise UserError(
                "gpus_per_server: must be a fraction in [0, 1] or a whole number, "
                f"got {self.gpus_per_server}"
            )
        if not self.address.strip():
            raise UserError("address: must be auto or a cluster address such as host:6379")
        if self.test_limit is not None and self.test_limit <= 0:
            raise UserError(f"test_limit: must be positive, got {self.test_limit}")
        layers = parse_layers(self.layers, None)
        if self.space == "prompt" and layers != [0]:
            raise UserError(
                f"layers: the prompt space (BBT) shifts the first layer's input only, so it "
                f"searches layer 0: give --layers 0 (got {self.layers!r}; deep-prompt has a "
                "prompt at every layer)"
            )
        self._validate_space_options()
        self.space_config().validate()
        self._validate_optimizer_options()
        return self

    def _resolve_class_dim(self) -> None:
        """class_dim given: intrinsic_dim = class_dim * (C - 1) for the task's C classes
        (once resolved, the same again: a resumed run's config.yaml holds that d)."""
        if self.class_dim is None:
            return
        if isinstance(self.class_dim, bool) or self.class_dim <= 0:
            raise UserError(f"class_dim: must be a positive integer, got {self.class_dim}")
        from dfo_lora.tasks import resolve_task

        classes = resolve_task(self.task).n_labels
        dim = self.class_dim * (classes - 1)
        default = TuneConfig.__dataclass_fields__["intrinsic_dim"].default
        if self.intrinsic_dim not in (dim, default):
            raise UserError(
                f"intrinsic_dim: {self.intrinsic_dim} and class_dim: {self.class_dim} (d = "
                f"{dim} for the {classes} classes of {self.task}) both set d: give one"
            )
        self.intrinsic_dim = dim

    def _validate_optimizer_options(self) -> None:
        """Build each layer optimizer kind once, so bad options fail before the model loads."""
        from dfo_lora.optim import make_optimizer

        for kind in policy.optimizer_kinds(self):
            try:
                make_optimizer(
                    kind,
                    self.subspace_dim or self.intrinsic_dim,
                    self.popsize,
                    self.sigma,
                    0,
                    **policy.options_for(self, kind),
                )
            except UserError as exc:
                raise UserError(f"optimizer_options: {exc}") from None

    def _validate_space_options(self) -> None:
        """The space exists, and no option of another space was changed from its default
        (it would be silently ignored)."""
        check_space_name(self.space)
        defaults = TuneConfig()
        for name, spaces in SPACE_OPTIONS.items():
            if self.space not in spaces and getattr(self, name) != getattr(defaults, name):
                users = ", ".join(spaces)
                raise UserError(
                    f"{name}: not used by the {self.space} space (only by {users}); "
                    f"leave it at its default or choose --space {spaces[0]}"
                )

    def space_config(self):
        """The chosen space's config (dfo_lora.spaces), from the run's values."""
        return space_config(self.space, self)

    def server_spec(self) -> ServerSpec:
        return ServerSpec(
            model=self.model,
            task=self.task,
            data_dir=self.data_dir,
            k=self.k,
            seed=self.seed,
            dtype=self.dtype,
            device=self.device,
            trust_remote_code=self.trust_remote_code,
            fit_on=self.fit_on,
            max_length=self.max_length,
            test_limit=self.test_limit,
            loss=self.loss,
            calibrate=self.calibrate,
            space=self.space_config(),
            options=ServerOptions(
                max_tokens=self.max_tokens,
                max_buckets=self.max_buckets,
                prefix_cache=self.prefix_cache,
                compile=self.compile,
                cuda_graphs=self.cuda_graphs,
            ),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(
            f"{name}: {value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"
        )


FIELD_TYPES = typing.get_type_hints(TuneConfig)

# Options that only some spaces read (the others refuse a value other than the default),
# from the spaces' configs.
SPACE_OPTIONS: dict[str, tuple[str, ...]] = option_users()


def coerce(name: str, value, where: str = ""):
    """Convert a YAML or command-line value to the field's type, or fail naming the field."""
    if name not in FIELD_TYPES:
        known = [f.name for f in fields(TuneConfig)]
        raise UserError(f"{where}unknown config key {name!r}{did_you_mean(name, known)}")
    kind = FIELD_TYPES[name]
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        words = ("none", "null", "", "auto") if name == "max_tokens" else ("none", "null", "")
        if value is None or (isinstance(value, str) and value.lower() in words):
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is dict:
            if isinstance(value, str):
                pairs = [p for p in value.split(",") if p.strip()]
                if not all("=" in p for p in pairs):
                    raise ValueError
                return {k.strip(): yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if typing.get_origin(kind) is list:
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, list):
                raise ValueError
            return [str(item).strip() for item in items if str(item).strip()]
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    type_name = getattr(kind, "__name__", str(kind))
    raise UserError(f"{where}{name}: {value!r} is not a valid {type_name}")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TuneConfig:
    """Defaults <- YAML file <- overrides (already-parsed CLI values), validated."""
    values: dict = {}
    if path is not None:
        values.update(read_yaml_mapping(Path(path)))
    for name, value in (overrides or {}).items():
        values[name] = value
    config = TuneConfig()
    for name, value in values.items():
        setattr(config, name, coerce(name, value, where=f"{path}: " if path else ""))
    return config.validate()


def read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data
