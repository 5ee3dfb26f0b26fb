"""Reading task data: JSONL / CSV / TSV files into `Example` lists, with one-line errors.

Built-in tasks read `<data_dir>/<task>/{train,test}.jsonl` (layout of shared/data/README.md:
single-sentence rows `{"text", "label"}`, pair rows `{"text_a", "text_b", "label"}`).
Custom tasks (YAML, see `custom.py`) read the files and columns their `data` section names.
Every malformed row raises `UserError` naming the file and line.

Hugging Face `datasets` is deliberately not used: it is not a dependency, and the local
files (plus the downloaded `mr` task) cover every task the tool registers.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dfo_lora.errors import UserError
from dfo_lora.tasks.spec import TEST_FROM_POOL, Example, FileSource, TaskSpec


@dataclass
class Splits:
    """The labelled pool to sample few-shot train/dev from, and the test set.

    When `test_from_pool` is True there is no separate test file: `test` is empty and the
    test set is the pool minus the sampled train and dev (`build_few_shot` does this);
    `test_note` says which case applies, in words for the user.
    """

    pool: list[Example]
    test: list[Example]
    test_note: str
    test_from_pool: bool = False


def default_data_dir() -> Path:
    """`$DFO_LORA_DATA`, else the first existing of ./shared/data, ../shared/data."""
    env = os.environ.get("DFO_LORA_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise UserError(f"$DFO_LORA_DATA={env}: no such directory")
        return path
    for candidate in (Path("shared/data"), Path("../shared/data")):
        if candidate.is_dir():
            return candidate
    raise UserError(
        "no data directory found (looked for ./shared/data and ../shared/data): "
        "pass --data-dir or set $DFO_LORA_DATA"
    )


def _parse_label(value: object, spec: TaskSpec, where: str) -> int:
    """An int label in 0..n-1; strings may be a label name or a decimal integer."""
    n = spec.n_labels
    if isinstance(value, str):
        text = value.strip()
        if text in spec.label_names:
            return spec.label_names.index(text)
        try:
            value = int(text)
        except ValueError:
            raise UserError(
                f"{where}: label {value!r} is not one of 0..{n - 1} or a label name "
                f"({', '.join(spec.label_names)})"
            ) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{where}: label {value!r} is not an integer in 0..{n - 1}")
    if not 0 <= value < n:
        raise UserError(f"{where}: label {value} is not one of 0..{n - 1}")
    return value


def _text(row: dict, column: str, where: str) -> str:
    if column not in row or row[column] is None:
        raise UserError(f"{where}: missing field {column!r}")
    value = row[column]
    if not isinstance(value, str):
        raise UserError(f"{where}: field {column!r} must be a string, got {value!r}")
    return value.strip()


def _rows_jsonl(path: Path):
    """Yield (line_number, dict) for each non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {lineno}: expected a JSON object")
            yield lineno, row


def _rows_table(path: Path, fmt: str, quoting: str):
    """Yield (line_number, dict) for each row of a CSV/TSV file with a header row."""
    delimiter = "\t" if fmt == "tsv" else ","
    kwargs = {"quoting": csv.QUOTE_NONE} if quoting == "none" else {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, **kwargs)
        try:
            header = next(reader, None)
            if header is None:
                raise UserError(f"{path}: empty file (expected a header row)")
            header = [h.strip() for h in header]
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise UserError(
                        f"{path} line {reader.line_num}: {len(row)} fields, "
                        f"the header has {len(header)}"
                    )
                yield reader.line_num, dict(zip(header, row, strict=True))
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: {e}") from None


def read_examples(
    path: Path,
    spec: TaskSpec,
    text_a: str,
    text_b: str | None,
    label: str,
    fmt: str = "jsonl",
    quoting: str = "minimal",
) -> list[Example]:
    """Read every row of `path` into Examples; UserError naming file and line on bad rows."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    rows = _rows_jsonl(path) if fmt == "jsonl" else _rows_table(path, fmt, quoting)
    examples = []
    try:
        for lineno, row in rows:
            where = f"{path} line {lineno}"
            if label not in row:
                raise UserError(f"{where}: missing field {label!r}")
            examples.append(
                Example(
                    text_a=_text(row, text_a, where),
                    text_b=_text(row, text_b, where) if text_b is not None else None,
                    label=_parse_label(row[label], spec, where),
                )
            )
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def _clean(spec: TaskSpec, examples: list[Example]) -> list[Example]:
    """Task-specific text fixes. Yelp keeps literal '\\n' escapes; BBT turns them into spaces."""
    if spec.name == "yelp_polarity":
        return [
            Example(" ".join(e.text_a.replace("\\n", " ").split()), e.text_b, e.label)
            for e in examples
        ]
    return examples


def load_splits(spec: TaskSpec, data_dir: str | os.PathLike | None = None) -> Splits:
    """The pool (train file) and test set of a task.

    Built-in tasks read `<data_dir>/<data_subdir>/{train,test}.jsonl`; `data_dir` None means
    `default_data_dir()`. The `mr` task uses `<data_dir>/mr` when it exists, else the
    download cache (`ensure_mr`). Custom tasks read the files named in their YAML.
    """
    if spec.source is not None:
        return _load_custom(spec, spec.source)
    if spec.name == "mr" and (data_dir is None or not (Path(data_dir) / "mr").is_dir()):
        from dfo_lora.tasks.mr import ensure_mr

        folder = ensure_mr()
    else:
        folder = Path(data_dir if data_dir is not None else default_data_dir()) / spec.data_subdir
    if spec.is_pair:
        columns = ("text_a", "text_b", "label")
    else:
        columns = ("text", None, "label")
    train_path = folder / "train.jsonl"
    test_path = folder / "test.jsonl"
    if not train_path.is_file():
        raise UserError(f"{train_path}: no such file (task {spec.name}; check --data-dir)")
    pool = _clean(spec, read_examples(train_path, spec, *columns))
    if not test_path.is_file():
        if spec.name not in TEST_FROM_POOL:
            raise UserError(f"{test_path}: no such file (task {spec.name}; check --data-dir)")
        note = (
            f"{spec.name}: no {test_path.name} in {folder}; the test set is the rest of the "
            f"{len(pool)}-example pool after removing the sampled train and dev "
            "(NOT the official test set)"
        )
        return Splits(pool=pool, test=[], test_note=note, test_from_pool=True)
    test = _clean(spec, read_examples(test_path, spec, *columns))
    note = f"{spec.name}: test = {test_path} ({len(test)} examples)"
    return Splits(pool=pool, test=test, test_note=note)


def _load_custom(spec: TaskSpec, src: FileSource) -> Splits:
    def read(path: Path) -> list[Example]:
        return read_examples(path, spec, src.text_a, src.text_b, src.label, src.fmt, src.quoting)

    pool = read(src.train)
    if src.test is None:
        note = (
            f"{spec.name}: no test file given; the test set is the rest of the "
            f"{len(pool)}-example pool after removing the sampled train and dev"
        )
        return Splits(pool=pool, test=[], test_note=note, test_from_pool=True)
    test = read(src.test)
    return Splits(pool, test, f"{spec.name}: test = {src.test} ({len(test)} examples)")
