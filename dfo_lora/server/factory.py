"""Build an evaluation server from plain values (model name, task name, seeds).

`ServerSpec` holds only plain values, so the same spec builds a server in-process or
inside a Ray actor on another machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from dfo_lora.backbone import Backbone, load_backbone
from dfo_lora.server.server import EvaluationServer, ServerOptions
from dfo_lora.spaces.lora import LoraConfig
from dfo_lora.tasks import FewShotData, build_few_shot, encode, resolve_task, verbalizer_ids


@dataclass(frozen=True)
class ServerSpec:
    """Everything a server needs, as plain values."""

    model: str = "smollm2-135m"
    task: str = "sst2"
    data_dir: str | None = None
    k: int = 16
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    max_length: int = 256
    test_limit: int | None = None  # score only the first N test examples (quick runs)
    loss: str = "ce"
    calibrate: bool = False  # subtract each state's mean train logits before loss/metric
    # the search space's config (dfo_lora.spaces.SPACES: LoraConfig, HydraConfig, ...)
    space: object = field(default_factory=LoraConfig)
    options: ServerOptions = field(default_factory=ServerOptions)
    trust_remote_code: bool = False
    fit_on: str = "train"  # "train+dev": the server's train split holds train and dev

    def to_dict(self) -> dict:
        return asdict(self)


def load_data(spec: ServerSpec) -> FewShotData:
    return build_few_shot(
        resolve_task(spec.task), spec.data_dir, k=spec.k, seed=spec.seed, test_limit=spec.test_limit
    )


def build_server(
    spec: ServerSpec, backbone: Backbone | None = None, data: FewShotData | None = None
) -> EvaluationServer:
    """Load (or reuse) the backbone and the few-shot data, tokenize once, build the server."""
    data = data or load_data(spec)
    backbone = backbone or load_backbone(
        spec.model, spec.dtype, spec.device, spec.trust_remote_code
    )
    causal = backbone.causal
    label_ids = verbalizer_ids(data.spec, backbone.tokenizer, causal)
    splits = {
        name: encode(data.spec, examples, backbone.tokenizer, causal, spec.max_length)
        for name, examples in (("train", data.train), ("dev", data.dev), ("test", data.test))
    }
    if spec.fit_on == "train+dev":  # fit (and calibrate on) every labelled example
        splits["train"] = splits["train"] + splits["dev"]
    return EvaluationServer(
        backbone,
        splits,
        label_ids,
        metric=data.spec.metric,
        space=spec.space,
        loss=spec.loss,
        options=spec.options,
        notes=data.notes,
        calibrate=spec.calibrate,
    )
