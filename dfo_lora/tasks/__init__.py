"""Task registry, data loading, few-shot sampling, prompt encoding and metrics.

Typical use::

    from dfo_lora.tasks import build_few_shot, encode, verbalizer_ids

    data = build_few_shot("sst2", k=16, seed=42)          # train/dev: 16 per class
    enc = encode(data.spec, data.train, tokenizer, causal=True)
    label_ids = verbalizer_ids(data.spec, tokenizer, causal=True)
"""

from dfo_lora.tasks.custom import load_task_file, resolve_task
from dfo_lora.tasks.encoding import EncodedExample, encode, render, verbalizer_ids
from dfo_lora.tasks.loaders import Splits, default_data_dir, load_splits, read_examples
from dfo_lora.tasks.metrics import compute_metric
from dfo_lora.tasks.mr import default_cache_dir, ensure_mr
from dfo_lora.tasks.permutation import stable_permutation
from dfo_lora.tasks.sampling import FewShotData, build_few_shot, sample_few_shot
from dfo_lora.tasks.spec import (
    Example,
    FileSource,
    HFSource,
    TaskSpec,
    get_task,
    list_tasks,
)

__all__ = [
    "EncodedExample",
    "Example",
    "FewShotData",
    "FileSource",
    "HFSource",
    "Splits",
    "TaskSpec",
    "build_few_shot",
    "compute_metric",
    "default_cache_dir",
    "default_data_dir",
    "encode",
    "ensure_mr",
    "get_task",
    "list_tasks",
    "load_splits",
    "load_task_file",
    "read_examples",
    "render",
    "resolve_task",
    "sample_few_shot",
    "stable_permutation",
    "verbalizer_ids",
]
