"""Tests for the Hugging Face `datasets` sources of dfo_lora.tasks.loaders (all offline).

Folders written by `save_to_disk` stand in for the hub; the hub path itself runs with
`HF_DATASETS_OFFLINE=1` and sockets that refuse to connect.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from dfo_lora.errors import UserError
from dfo_lora.tasks import Example, build_few_shot, get_task, list_tasks, load_splits
from dfo_lora.tasks.sampling import sample_few_shot

datasets = pytest.importorskip("datasets")

SST2_TRAIN = [(f" good movie {i} ", 1) for i in range(6)] + [
    (f"bad movie {i}", 0) for i in range(6)
]
SST2_VALIDATION = [("fine", 1), ("awful", 0), ("great", 1)]


def _sst2_dict(train=SST2_TRAIN, validation=SST2_VALIDATION):
    """A DatasetDict with GLUE sst2's columns, splits and label feature."""
    features = datasets.Features(
        {
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["negative", "positive"]),
            "idx": datasets.Value("int32"),
        }
    )

    def split(rows):
        return datasets.Dataset.from_dict(
            {
                "sentence": [t for t, _ in rows],
                "label": [lab for _, lab in rows],
                "idx": list(range(len(rows))),
            },
            features=features,
        )

    return datasets.DatasetDict({"train": split(train), "validation": split(validation)})


def _pairs(rows, a="premise", b="hypothesis"):
    return datasets.Dataset.from_dict(
        {a: [r[0] for r in rows], b: [r[1] for r in rows], "label": [r[2] for r in rows]}
    )


def _one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def offline(monkeypatch, tmp_path, no_network):
    """HF offline mode (env and the already-imported libraries), an empty cache, and no
    network: every socket connect is recorded and refused."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read these variables at import time, which may have happened already.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return no_network  # the connects tried (conftest: each refused)


def test_every_builtin_task_names_a_hub_dataset():
    for spec in list_tasks():
        assert spec.hf is not None, spec.name
        assert (spec.hf.text_b is not None) == spec.is_pair, spec.name
    assert get_task("sst2").hf.dataset_id == "nyu-mll/glue (sst2)"
    assert get_task("snli").hf.skip_labels == (-1,)


def test_saved_sst2_dict_gives_the_same_few_shot_data_as_its_rows(tmp_path):
    _sst2_dict().save_to_disk(str(tmp_path / "sst2"))
    pool = [Example(t.strip(), None, lab) for t, lab in SST2_TRAIN]
    test = [Example(t, None, lab) for t, lab in SST2_VALIDATION]

    splits = load_splits(get_task("sst2"), tmp_path)
    assert splits.pool == pool and splits.test == test and not splits.test_from_pool
    assert "split 'validation' (3 examples)" in splits.test_note

    data = build_few_shot("sst2", tmp_path, k=2, seed=7)
    assert (data.train, data.dev) == sample_few_shot(pool, 2, 7, 2)
    assert data.test == test
    assert sorted(e.label for e in data.train) == [0, 0, 1, 1]
    # data_dir may also be the saved folder itself
    again = build_few_shot("sst2", tmp_path / "sst2", k=2, seed=7)
    assert (again.train, again.dev, again.test) == (data.train, data.dev, data.test)


def test_saved_nli_dict_maps_columns_and_drops_unlabelled_rows(tmp_path):
    rows = [(f"p{i}", f"h{i}", i % 3) for i in range(9)] + [("p?", "h?", -1)]
    test_rows = [("tp", "th", 2), ("tq", "tr", -1)]
    datasets.DatasetDict({"train": _pairs(rows), "test": _pairs(test_rows)}).save_to_disk(
        str(tmp_path)
    )
    splits = load_splits(get_task("snli"), tmp_path)
    assert splits.pool == [Example(f"p{i}", f"h{i}", i % 3) for i in range(9)]
    assert splits.test == [Example("tp", "th", 2)]
    data = build_few_shot("snli", tmp_path, k=1, seed=0)
    assert sorted(e.label for e in data.train) == [0, 1, 2]
    assert all(e.text_b == "h" + e.text_a[1:] for e in data.train + data.dev)


def test_label_map_is_applied(tmp_path):
    rte = get_task("rte")
    # a hub copy whose labels are the other way round, and one with string labels
    flipped = replace(rte, hf=replace(rte.hf, label_map=((0, 1), (1, 0))))
    named = replace(rte, hf=replace(rte.hf, label_map=(("yes", 0), ("no", 1))))
    rows = [("a", "b", 0), ("c", "d", 1), ("e", "f", 1)]
    dd = datasets.DatasetDict(
        {
            "train": _pairs(rows, "sentence1", "sentence2"),
            "validation": _pairs(rows[:1], "sentence1", "sentence2"),
        }
    )
    dd.save_to_disk(str(tmp_path / "flipped"))
    splits = load_splits(flipped, tmp_path / "flipped")
    assert [e.label for e in splits.pool] == [1, 0, 0] and splits.test[0].label == 1
    assert [e.label for e in load_splits(rte, tmp_path / "flipped").pool] == [0, 1, 1]

    words = [("a", "b", "no"), ("c", "d", "yes")]
    datasets.DatasetDict(
        {
            "train": _pairs(words, "sentence1", "sentence2"),
            "validation": _pairs(words, "sentence1", "sentence2"),
        }
    ).save_to_disk(str(tmp_path / "named"))
    assert [e.label for e in load_splits(named, tmp_path / "named").pool] == [1, 0]


@pytest.mark.parametrize(
    "train, validation, expected",
    [
        ([("ok", 1), ("bad", 5)], None, "split 'train' row 1: label 5 is not one of 0..1"),
        ([("ok", 1), (None, 0)], None, "split 'train' row 1: missing field 'sentence'"),
        ([("ok", 1)], [("x", 0), ("y", -3)], "split 'validation' row 1: label -3 is not one of"),
    ],
)
def test_bad_rows_are_one_line_user_errors(tmp_path, train, validation, expected):
    columns = {"sentence": [t for t, _ in train], "label": [lab for _, lab in train]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)})
    if validation is not None:
        dd["validation"] = datasets.Dataset.from_dict(
            {"sentence": [t for t, _ in validation], "label": [lab for _, lab in validation]}
        )
    else:
        dd["validation"] = datasets.Dataset.from_dict({"sentence": ["z"], "label": [0]})
    dd.save_to_disk(str(tmp_path / "sst2"))
    message = _one_line_error(load_splits, get_task("sst2"), tmp_path)
    assert str(tmp_path / "sst2") in message and expected in message


def test_missing_columns_and_splits_are_one_line_user_errors(tmp_path):
    text_only = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    datasets.DatasetDict({"train": text_only, "validation": text_only}).save_to_disk(
        str(tmp_path / "a")
    )
    message = _one_line_error(load_splits, get_task("sst2"), tmp_path / "a")
    assert "split 'train': no column 'sentence' (columns: text, label)" in message
    _sst2_dict().save_to_disk(str(tmp_path / "b"))
    message = _one_line_error(load_splits, get_task("snli"), tmp_path / "b")
    assert (
        str(tmp_path / "b") in message and "no split 'test' (splits: train, validation)" in message
    )


def test_a_single_saved_dataset_is_the_pool(tmp_path):
    _sst2_dict()["train"].save_to_disk(str(tmp_path))
    splits = load_splits(get_task("sst2"), tmp_path)
    assert splits.test_from_pool and splits.test == [] and len(splits.pool) == 12
    data = build_few_shot("sst2", tmp_path, k=2, seed=3)
    assert len(data.test) == 12 - 8


def test_hub_offline_fails_fast_naming_the_dataset(offline):
    message = _one_line_error(load_splits, get_task("sst2"), "hf")
    assert "could not load Hugging Face dataset nyu-mll/glue (sst2)" in message
    assert "Error" in message  # the cause's exception type and first line
    message = _one_line_error(build_few_shot, "snli", "hf", k=2)
    assert "stanfordnlp/snli" in message
    assert offline == []  # no connection was attempted


def test_missing_local_folder_never_reaches_the_hub(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("DFO_LORA_DATA", str(tmp_path))  # exists, but has no agnews/
    message = _one_line_error(load_splits, get_task("agnews"))
    assert f"{tmp_path / 'agnews' / 'train.jsonl'}: no such file" in message
    assert f"$DFO_LORA_DATA={tmp_path}" in message and "--data-dir hf" in message
    assert "hub:" not in message and "ag_news" not in message  # the hub was not tried
    # an explicit data_dir is never replaced by the hub either
    message = _one_line_error(load_splits, get_task("agnews"), tmp_path)
    assert "no such file" in message and "--data-dir hf" in message
    assert offline == []


def test_without_datasets_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    monkeypatch.setenv("DFO_LORA_DATA", str(tmp_path))
    message = _one_line_error(load_splits, get_task("agnews"))
    assert "no such file" in message
    assert "pip install datasets" in message and "--data-dir hf" in message
    message = _one_line_error(load_splits, get_task("agnews"), "hf")
    assert "pip install datasets" in message and "fancyzhx/ag_news" in message
