"""Reading task data into `Example` lists, with one-line errors.

Built-in tasks have three sources, chosen by `data_dir` (`--data-dir`):

1. Local JSON Lines (the default): `<data_dir>/<task>/{train,test}.jsonl`, layout of
   shared/data/README.md: single-sentence rows `{"text", "label"}`, pair rows
   `{"text_a", "text_b", "label"}`. Malformed rows raise `UserError` naming file and line.
2. A folder written by Hugging Face `datasets` (`DatasetDict.save_to_disk`, recognised by
   its `dataset_dict.json`; or `Dataset.save_to_disk`, recognised by `state.json`):
   `data_dir` itself or `<data_dir>/<task>`. Read with `datasets.load_from_disk`, using the
   task's hub columns, splits and label mapping (`TaskSpec.hf`). A single saved Dataset is
   the pool only: test = pool minus the sampled train and dev.
3. The Hugging Face hub: `data_dir="hf"` (`--data-dir hf`) calls
   `datasets.load_dataset(<TaskSpec.hf.path>, <TaskSpec.hf.name>)`. Offline,
   `HF_DATASETS_OFFLINE=1` makes this read the local `datasets` cache only. Failing to
   load gives a one-line `UserError` naming the dataset and the cause.

With no `data_dir` given, the folder is `$DFO_LORA_DATA`, else the first of ./shared/data
and ../shared/data (relative to the current directory) that exists (`default_data_dir`).
The hub is reached only when `--data-dir hf` asks for it: a silent fallback made a run
started in another folder retry the network for ~25 s before failing, and would read
other data than the local copy. When no data is found, the one-line error names the
folders tried and says that `--data-dir DIR` or `--data-dir hf` chooses.

Rows from (2) and (3) pass the same checks as file rows; errors name the dataset, the
split and the row index (0-based). `datasets` is optional (`pip install datasets`).
Custom tasks (YAML, see `custom.py`) read the files and columns their `data` section names.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dfo_lora.errors import UserError
from dfo_lora.tasks.spec import TEST_FROM_POOL, Example, FileSource, HFSource, TaskSpec

HUB = "hf"  # the `data_dir` value that means: load from the Hugging Face hub


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


DEFAULT_DATA_DIRS = (Path("shared/data"), Path("../shared/data"))  # from the current dir
CHOOSE = "choose the data with --data-dir DIR, or --data-dir hf for the Hugging Face hub"


def default_data_dir() -> Path:
    """`$DFO_LORA_DATA`, else the first existing of ./shared/data, ../shared/data.

    Never the hub (see the module docstring); the error names the folders tried.
    """
    env = os.environ.get("DFO_LORA_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise UserError(f"$DFO_LORA_DATA={env}: no such directory; {CHOOSE}")
        return path
    for candidate in DEFAULT_DATA_DIRS:
        if candidate.is_dir():
            return candidate
    raise UserError(
        f"no data folder found: looked for ./shared/data and ../shared/data in {Path.cwd()} "
        f"($DFO_LORA_DATA is not set); {CHOOSE}"
    )


def _default_dir_origin(root: Path) -> str:
    """How `default_data_dir` chose `root`, for messages: the folders it tried."""
    if os.environ.get("DFO_LORA_DATA"):
        return f"$DFO_LORA_DATA={root}"
    return f"{root}, the first of ./shared/data, ../shared/data in {Path.cwd()}"


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
    """The pool (train split) and test set of a task; see the module docstring.

    `data_dir` is "hf" (the Hugging Face hub; a folder named hf is "./hf"), a folder
    written by `datasets`' `save_to_disk`, a folder with `<data_subdir>/{train,test}.jsonl`,
    or None for `default_data_dir()` (never the hub). The `mr` task uses `<data_dir>/mr`
    when it exists, else the download cache (`ensure_mr`). Custom tasks read the files
    named in their YAML.
    """
    if spec.source is not None:
        return _load_custom(spec, spec.source)
    if data_dir is not None and os.fspath(data_dir) == HUB:
        return _load_hub(spec)
    if data_dir is not None:
        saved = _saved_dataset(Path(data_dir), spec)
        if saved is not None:
            return _load_saved(spec, saved)
    if spec.name == "mr" and (data_dir is None or not (Path(data_dir) / "mr").is_dir()):
        from dfo_lora.tasks.mr import ensure_mr

        folder = ensure_mr()
    else:
        if data_dir is not None:
            root = Path(data_dir)
        else:
            try:
                root = default_data_dir()
            except UserError as e:
                raise UserError(f"task {spec.name}: {e}{_datasets_hint(spec)}") from None
            saved = _saved_dataset(root, spec)
            if saved is not None:
                return _load_saved(spec, saved)
        folder = root / spec.data_subdir
    if spec.is_pair:
        columns = ("text_a", "text_b", "label")
    else:
        columns = ("text", None, "label")
    train_path = folder / "train.jsonl"
    test_path = folder / "test.jsonl"
    if not train_path.is_file():
        if data_dir is None:
            raise UserError(
                f"{train_path}: no such file (task {spec.name}; no --data-dir given, so the "
                f"data folder is {_default_dir_origin(root)}); {CHOOSE}{_datasets_hint(spec)}"
            )
        raise UserError(
            f"{train_path}: no such file (task {spec.name}; check --data-dir{_hub_hint(spec)})"
        )
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


# ---------------------------------------------------------------- Hugging Face `datasets`


def _datasets_module():
    """The `datasets` package, or None when it is not installed."""
    try:
        import datasets
    except ImportError:
        return None
    return datasets


def _require_datasets(what: str):
    datasets = _datasets_module()
    if datasets is None:
        raise UserError(f"{what} needs the Hugging Face `datasets` package: pip install datasets")
    return datasets


def _datasets_hint(spec: TaskSpec) -> str:
    """What `--data-dir hf` would need here, after `CHOOSE`."""
    if spec.hf is None:
        return f" (task {spec.name} has no Hugging Face dataset)"
    if _datasets_module() is None:
        return " (which needs `pip install datasets`)"
    return ""


def _hub_hint(spec: TaskSpec) -> str:
    if spec.hf is None:
        return ""
    if _datasets_module() is None:
        return (
            ", or `pip install datasets` and use --data-dir hf to load it from the Hugging Face hub"
        )
    return ", or use --data-dir hf to load it from the Hugging Face hub"


def _columns(spec: TaskSpec) -> HFSource:
    """The task's hub columns; for a task without one, our JSONL column names."""
    if spec.hf is not None:
        return spec.hf
    text_a, text_b = ("text_a", "text_b") if spec.is_pair else ("text", None)
    return HFSource(spec.name, None, "train", "test", text_a, text_b, "label")


def _saved_dataset(folder: Path, spec: TaskSpec) -> Path | None:
    """`folder` (or `folder/<data_subdir>`) when it holds a `save_to_disk` dataset."""
    for candidate in (folder, folder / spec.data_subdir):
        if (candidate / "dataset_dict.json").is_file() or (candidate / "state.json").is_file():
            return candidate
    return None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _hf_examples(spec: TaskSpec, src: HFSource, dataset, where: str) -> list[Example]:
    """Examples from a `datasets.Dataset` with the columns of `src`; UserError on bad rows."""
    wanted = [c for c in (src.text_a, src.text_b, src.label) if c is not None]
    missing = [c for c in wanted if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"{where}: no column {missing[0]!r} (columns: {', '.join(dataset.column_names)})"
        )
    label_map = dict(src.label_map)
    skip = set(src.skip_labels)
    # `[:]`: a plain list (newer `datasets` return a lazy Column, slow to index per row).
    texts_a = dataset[src.text_a][:]
    texts_b = dataset[src.text_b][:] if src.text_b is not None else None
    labels = dataset[src.label][:]
    examples = []
    for i, raw in enumerate(labels):
        row_where = f"{where} row {i}"
        if raw is None:
            raise UserError(f"{row_where}: missing field {src.label!r}")
        if isinstance(raw, (int, str)) and not isinstance(raw, bool):
            if raw in skip:
                continue
            raw = label_map.get(raw, raw)
        row = {src.text_a: texts_a[i]}
        if texts_b is not None:
            row[src.text_b] = texts_b[i]
        examples.append(
            Example(
                text_a=_text(row, src.text_a, row_where),
                text_b=_text(row, src.text_b, row_where) if src.text_b is not None else None,
                label=_parse_label(raw, spec, row_where),
            )
        )
    if not examples:
        raise UserError(f"{where}: no examples")
    return examples


def _splits_from(spec: TaskSpec, src: HFSource, data, where: str) -> Splits:
    """Splits from a DatasetDict (pool = `src.train`, test = `src.test`) or a Dataset."""
    if not isinstance(data, dict):  # a single Dataset (DatasetDict is a dict): the pool
        pool = _clean(spec, _hf_examples(spec, src, data, where))
        note = (
            f"{spec.name}: {where} is a single split; the test set is the rest of the "
            f"{len(pool)}-example pool after removing the sampled train and dev"
        )
        return Splits(pool=pool, test=[], test_note=note, test_from_pool=True)
    names = list(data.keys())
    for split in (src.train, src.test):
        if split not in names:
            raise UserError(f"{where}: no split {split!r} (splits: {', '.join(names)})")
    pool = _clean(spec, _hf_examples(spec, src, data[src.train], f"{where} split {src.train!r}"))
    test = _clean(spec, _hf_examples(spec, src, data[src.test], f"{where} split {src.test!r}"))
    note = f"{spec.name}: test = {where} split {src.test!r} ({len(test)} examples)"
    return Splits(pool=pool, test=test, test_note=note)


def _load_hub(spec: TaskSpec) -> Splits:
    """The task's Hugging Face dataset via `datasets.load_dataset` (`--data-dir hf` only)."""
    if spec.hf is None:
        raise UserError(f"task {spec.name} has no Hugging Face dataset; --data-dir hf needs one")
    src = spec.hf
    where = f"Hugging Face dataset {src.dataset_id}"
    datasets = _require_datasets(f"--data-dir hf (task {spec.name}, {src.dataset_id})")
    try:
        data = datasets.load_dataset(src.path, src.name)
    except Exception as e:  # network, missing repo, gated, offline cache miss, ...
        raise UserError(f"{spec.name}: could not load {where}: {_first_line(e)}") from None
    return _splits_from(spec, src, data, where)


def _load_saved(spec: TaskSpec, folder: Path) -> Splits:
    """A dataset written by `save_to_disk`, read with the task's hub columns."""
    datasets = _require_datasets(f"{folder} (a saved Hugging Face dataset)")
    try:
        data = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise UserError(f"{folder}: could not load the saved dataset: {_first_line(e)}") from None
    return _splits_from(spec, _columns(spec), data, str(folder))


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
