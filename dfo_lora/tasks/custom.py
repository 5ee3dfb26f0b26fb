"""Custom tasks from a YAML file.

Example (paths are relative to the YAML file)::

    name: my_reviews
    description: product reviews, 2 classes      # optional
    labels: [negative, positive]
    verbalizer: [bad, great]                     # one word per label, no leading space
    clm_verbalizer: [bad, great]                 # optional: other words for causal LMs
    templates:
      mlm: "{text_a} . It was {mask} ."          # optional: default = clm + " {mask}"
      clm: "{text_a} . It was"
    metric: accuracy                             # optional: accuracy (default) or f1
    data:
      train: reviews/train.csv                   # CSV, TSV or JSONL
      test: reviews/test.csv                     # optional: default = pool minus train/dev
      text_a: review                             # column (or JSON key) names
      text_b: null                               # optional: second text of pair tasks
      label: stars                               # ints 0..n-1 or label names
      format: csv                                # optional: from the extension
      quoting: minimal                           # optional: minimal (CSV) / none (TSV default)

Templates hold the placeholders {text_a}, {text_b} (pair tasks) and {mask} (the masked-LM
template, once); `{{` and `}}` write a literal brace, as in str.format. Any other brace
(`{txt}`, an unclosed `{`) is refused in one line naming the file and the field.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from dfo_lora.errors import UserError, did_you_mean
from dfo_lora.tasks.spec import FileSource, TaskSpec, get_task, validate_spec

_TOP_KEYS = (
    "name",
    "description",
    "labels",
    "verbalizer",
    "clm_verbalizer",
    "templates",
    "metric",
    "data",
)
_TEMPLATE_KEYS = ("mlm", "clm")
_DATA_KEYS = ("train", "test", "text_a", "text_b", "label", "format", "quoting")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def _check_keys(mapping: dict, allowed: tuple[str, ...], where: str, prefix: str = "") -> None:
    for key in mapping:
        if key not in allowed:
            hint = did_you_mean(key, allowed, prefix)
            raise UserError(
                f"{where}: unknown field {prefix + str(key)!r}{hint}; known: {', '.join(allowed)}"
            )


def _require(mapping: dict, key: str, where: str, prefix: str = "") -> object:
    if mapping.get(key) is None:
        raise UserError(f"{where}: missing field '{prefix}{key}'")
    return mapping[key]


def _string(value: object, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: field '{field}' must be a non-empty string, got {value!r}")
    return value


def _words(value: object, field: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}' must be a non-empty list of strings")
    for item in value:
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise UserError(f"{where}: field '{field}': {item!r} is not a string")
    return tuple(str(item) for item in value)


def load_task_file(path: str | os.PathLike) -> TaskSpec:
    """A TaskSpec from a YAML task file (format in the module docstring).

    Every problem raises UserError naming the file and the field (or the YAML line).
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}{line}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: expected a mapping of fields (name, labels, ...)")
    _check_keys(doc, _TOP_KEYS, where)

    name = _string(_require(doc, "name", where), "name", where)
    labels = _words(_require(doc, "labels", where), "labels", where)
    verbalizer = _words(_require(doc, "verbalizer", where), "verbalizer", where)
    clm_verbalizer = None
    if doc.get("clm_verbalizer") is not None:
        clm_verbalizer = _words(doc["clm_verbalizer"], "clm_verbalizer", where)
    metric = doc.get("metric", "accuracy")
    description = doc.get("description") or f"custom task from {path.name}"

    templates = _require(doc, "templates", where)
    if not isinstance(templates, dict):
        raise UserError(f"{where}: field 'templates' must be a mapping with keys mlm, clm")
    _check_keys(templates, _TEMPLATE_KEYS, where, "templates.")
    clm = _string(_require(templates, "clm", where, "templates."), "templates.clm", where)
    mlm = templates.get("mlm")
    mlm = clm + " {mask}" if mlm is None else _string(mlm, "templates.mlm", where)

    data = _require(doc, "data", where)
    if not isinstance(data, dict):
        raise UserError(f"{where}: field 'data' must be a mapping (train, test, text_a, ...)")
    _check_keys(data, _DATA_KEYS, where, "data.")
    base = path.parent

    def data_path(key: str) -> Path:
        rel = _string(data[key], f"data.{key}", where)
        resolved = base / rel
        if not resolved.is_file():
            raise UserError(f"{where}: field 'data.{key}': {resolved}: no such file")
        return resolved

    train = data_path("train") if data.get("train") is not None else None
    if train is None:
        raise UserError(f"{where}: missing field 'data.train'")
    test = data_path("test") if data.get("test") is not None else None
    fmt = data.get("format")
    if fmt is None:
        fmt = _FORMATS.get(train.suffix.lower())
        if fmt is None:
            raise UserError(
                f"{where}: cannot tell the format of {train.name} from its extension; "
                "set field 'data.format' to jsonl, csv or tsv"
            )
    elif fmt not in ("jsonl", "csv", "tsv"):
        raise UserError(f"{where}: field 'data.format' must be jsonl, csv or tsv, got {fmt!r}")
    quoting = data.get("quoting", "none" if fmt == "tsv" else "minimal")
    if quoting not in ("minimal", "none"):
        raise UserError(f"{where}: field 'data.quoting' must be minimal or none, got {quoting!r}")
    text_b = data.get("text_b")
    source = FileSource(
        train=train,
        test=test,
        text_a=_string(_require(data, "text_a", where, "data."), "data.text_a", where),
        text_b=None if text_b is None else _string(text_b, "data.text_b", where),
        label=_string(_require(data, "label", where, "data."), "data.label", where),
        fmt=fmt,
        quoting=quoting,
    )
    spec = TaskSpec(
        name=name,
        label_names=labels,
        verbalizer=verbalizer,
        mlm_template=mlm,
        clm_template=clm,
        metric=str(metric),
        data_subdir=name,
        description=str(description),
        clm_verbalizer=clm_verbalizer,
        source=source,
    )
    validate_spec(spec, where, ("templates.mlm", "templates.clm"))
    if spec.is_pair != (source.text_b is not None):
        raise UserError(
            f"{where}: the templates use {{text_b}} but 'data.text_b' is not set"
            if spec.is_pair
            else f"{where}: 'data.text_b' is set but the templates do not use {{text_b}}"
        )
    return spec


def resolve_task(task: str | TaskSpec) -> TaskSpec:
    """A TaskSpec from a spec, a registered name, or a path to a YAML task file."""
    if isinstance(task, TaskSpec):
        return task
    if task.endswith((".yaml", ".yml")) or ("/" in task and Path(task).is_file()):
        return load_task_file(task)
    return get_task(task)
