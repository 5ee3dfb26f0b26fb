"""Task specifications: labels, templates, verbalizers, metric — and the registry.

Masked-LM templates and verbalizers are those of the DFO-LoRA and BBT papers; SST-5 and
TREC follow LM-BFF (Gao et al. 2021). Causal-LM templates are ours: the paper only uses
masked LMs, and a causal LM must predict the label word as the NEXT token, so every causal
template ends right before the label word:

- sentiment (sst2, yelp_polarity, mr, sst5): ``"{text_a} . It was"`` -> " bad" / " great"
  (the paper's template with the mask cut off);
- agnews: ``"{text_a} Topic:"`` -> " World" / " Sports" / " Business" / " Tech";
- dbpedia: ``"{text_a} Category:"`` -> the paper's words, except two that are several
  tokens for SmolLM2's tokenizer: Athlete -> " Athletes", Album -> " Music"
  (``TaskSpec.clm_verbalizer``);
- pair tasks (mrpc, rte, snli): ``"{text_a}\\nQuestion: {text_b} Yes or no?\\nAnswer:"``
  (snli: "Yes, no, or maybe?") -> " Yes" / " No" (/ " Maybe");
- trec: ``"{text_a} Answer type:"`` -> " Expression" / " Entity" / " Description" / ...

Verbalizer words are stored WITHOUT a leading space; `encoding.verbalizer_ids` decides
per tokenizer whether the label token is the space-prefixed word (byte-level BPE,
SentencePiece) or the bare word (WordPiece).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dfo_lora.errors import UserError, did_you_mean

METRICS = ("accuracy", "f1")
PLACEHOLDERS = ("{text_a}", "{text_b}", "{mask}")
PLACEHOLDER_RE = re.compile(r"(\{text_a\}|\{text_b\}|\{mask\})")
# One template piece: an escaped brace, a {...} group, a lone brace, or plain text.
_PIECE_RE = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]|[^{}]+")


def template_pieces(template: str) -> list[tuple[bool, str]]:
    """A template as (is_placeholder, text) pieces, in order, as str.format reads braces:
    `{{` and `}}` are a literal `{` and `}`, `{text_a}`, `{text_b}`, `{mask}` are
    placeholders. Anything else is kept as literal text here, so that rendering never
    fails (the ICL baseline renders templates holding demonstration text);
    `template_problem` is the check a task's own template must pass."""
    pieces = []
    for match in _PIECE_RE.finditer(template):
        piece = match.group()
        if piece in PLACEHOLDERS:
            pieces.append((True, piece))
        else:
            pieces.append((False, {"{{": "{", "}}": "}"}.get(piece, piece)))
    return pieces


def placeholders(template: str) -> list[str]:
    """The template's placeholders in order (`{{text_a}}` is literal text, not one)."""
    return [piece for is_slot, piece in template_pieces(template) if is_slot]


def template_problem(template: str) -> str | None:
    """Why a task template is malformed (an unknown placeholder such as `{txt}`, an
    unclosed `{` or a lone `}`), or None. A typo would otherwise go into every prompt
    as literal text and the run would go on without a word."""
    allowed = ", ".join(PLACEHOLDERS)
    for match in _PIECE_RE.finditer(template):
        piece = match.group()
        if piece in PLACEHOLDERS or piece in ("{{", "}}") or piece[0] not in "{}":
            continue
        where = f"at character {match.start() + 1}"
        if piece == "{":
            problem = f"unclosed brace {where}"
        elif piece == "}":
            problem = f"'}}' without an opening brace {where}"
        else:
            problem = f"unknown placeholder {piece}"
        return f"{problem}; use {allowed} (write {{{{ and }}}} for a literal brace)"
    return None


@dataclass(frozen=True)
class Example:
    """One labelled input; `text_b` is None for single-sentence tasks."""

    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class FileSource:
    """Where a custom (YAML) task's data lives and which columns hold what.

    `test` None means: no test file, the test set is the pool minus the sampled train+dev.
    `fmt` is "jsonl", "csv" or "tsv"; `quoting` is "minimal" (csv module quoting) or "none"
    (fields are taken verbatim; the default for TSV, as GLUE's files need).
    """

    train: Path
    test: Path | None
    text_a: str
    text_b: str | None
    label: str
    fmt: str
    quoting: str


@dataclass(frozen=True)
class HFSource:
    """Where a built-in task lives on the Hugging Face hub (`--data-dir hf`, or a folder
    written by `datasets`' `save_to_disk`).

    `path` / `name` are the first two arguments of `datasets.load_dataset`; `train` is the
    split used as the few-shot pool and `test` the split scored as test; `text_a`, `text_b`
    (None for single-sentence tasks) and `label` are column names. `label_map` lists
    (hub label, our label) pairs where the hub's label differs from ours (labels not listed
    are taken as they are); rows whose hub label is in `skip_labels` are dropped (SNLI's -1,
    "no gold label").
    """

    path: str
    name: str | None
    train: str
    test: str
    text_a: str
    text_b: str | None
    label: str
    label_map: tuple[tuple[int | str, int], ...] = ()
    skip_labels: tuple[int | str, ...] = ()

    @property
    def dataset_id(self) -> str:
        """`path` with its config, e.g. "nyu-mll/glue (sst2)", for messages."""
        return self.path if self.name is None else f"{self.path} ({self.name})"


@dataclass(frozen=True)
class TaskSpec:
    """A classification task: labels, how an input becomes a prompt, how labels become words.

    Templates use the placeholders {text_a}, {text_b} (pair tasks only) and {mask} (masked
    LM only, exactly once); `{{` and `}}` write a literal brace, any other brace is refused
    (`template_problem`). `clm_verbalizer`, when set, replaces `verbalizer` for causal LMs
    (used where a paper word is several tokens for common causal tokenizers). `source` is
    set for custom tasks loaded from YAML; built-in tasks read `<data_dir>/<data_subdir>`,
    or the Hugging Face dataset `hf` names (see `loaders.load_splits`).
    """

    name: str
    label_names: tuple[str, ...]
    verbalizer: tuple[str, ...]  # one word per label, without leading space
    mlm_template: str  # e.g. "{text_a} . It was {mask} ."
    clm_template: str  # slot at the end, e.g. "{text_a} . It was"
    metric: str  # "accuracy" or "f1" (binary F1 of label 1)
    data_subdir: str  # folder name under the data dir
    description: str  # one line for `dfo-lora tasks`
    clm_verbalizer: tuple[str, ...] | None = None
    source: FileSource | None = None
    hf: HFSource | None = None

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return "{text_b}" in placeholders(self.mlm_template) + placeholders(self.clm_template)

    def words(self, causal: bool) -> tuple[str, ...]:
        """The verbalizer words used for a causal (True) or masked (False) LM."""
        if causal and self.clm_verbalizer is not None:
            return self.clm_verbalizer
        return self.verbalizer


def validate_spec(
    spec: TaskSpec, where: str, template_fields: tuple[str, str] = ("mlm_template", "clm_template")
) -> None:
    """Raise UserError (prefixed with `where`) if the spec is inconsistent.

    `template_fields` names the two templates in messages (YAML files call them
    templates.mlm / templates.clm).
    """
    n = len(spec.label_names)
    if n < 2:
        raise UserError(f"{where}: a task needs at least 2 labels, got {n}")
    if len(set(spec.label_names)) != n:
        raise UserError(f"{where}: label names must be distinct: {list(spec.label_names)}")
    for field, words in (("verbalizer", spec.verbalizer), ("clm_verbalizer", spec.clm_verbalizer)):
        if words is None:
            continue
        if len(words) != n:
            raise UserError(
                f"{where}: field '{field}' has {len(words)} words but there are {n} labels"
            )
        for w in words:
            if not isinstance(w, str) or not w.strip() or w != w.strip():
                raise UserError(
                    f"{where}: field '{field}': {w!r} must be a non-empty word without surrounding spaces"
                )
        if len(set(words)) != n:
            raise UserError(f"{where}: field '{field}' words must be distinct: {list(words)}")
    if spec.metric not in METRICS:
        raise UserError(f"{where}: metric {spec.metric!r} is not one of {', '.join(METRICS)}")
    if spec.metric == "f1" and n != 2:
        raise UserError(f"{where}: metric 'f1' (binary F1 of label 1) needs 2 labels, got {n}")
    for field, template, masked in (
        (template_fields[1], spec.clm_template, False),
        (template_fields[0], spec.mlm_template, True),
    ):
        problem = template_problem(template)
        if problem is not None:
            raise UserError(f"{where}: field '{field}': {problem}")
        pieces = placeholders(template)
        if pieces.count("{text_a}") != 1:
            raise UserError(f"{where}: field '{field}' must contain {{text_a}} exactly once")
        if pieces.count("{text_b}") > 1:
            raise UserError(f"{where}: field '{field}' contains {{text_b}} more than once")
        if masked and pieces.count("{mask}") != 1:
            raise UserError(f"{where}: field '{field}' must contain {{mask}} exactly once")
        if not masked and "{mask}" in pieces:
            raise UserError(
                f"{where}: field '{field}' must not contain {{mask}}: the causal LM predicts "
                "the label word after the last token"
            )
    pair_m = "{text_b}" in placeholders(spec.mlm_template)
    pair_c = "{text_b}" in placeholders(spec.clm_template)
    if pair_m != pair_c:
        raise UserError(f"{where}: {{text_b}} must appear in both templates or in neither")
    if spec.hf is not None:
        if (spec.hf.text_b is not None) != pair_m:
            raise UserError(
                f"{where}: Hugging Face source {spec.hf.dataset_id} must name a text_b column "
                "exactly when the templates use {text_b}"
            )
        for hub, ours in spec.hf.label_map:
            if isinstance(ours, bool) or not isinstance(ours, int) or not 0 <= ours < n:
                raise UserError(
                    f"{where}: Hugging Face label_map sends {hub!r} to {ours!r}, "
                    f"not one of 0..{n - 1}"
                )


_SENTIMENT_MLM = "{text_a} . It was {mask} ."
_SENTIMENT_CLM = "{text_a} . It was"
_PAIR_MLM = "{text_a} ? {mask} , {text_b}"
_PAIR_CLM = "{text_a}\nQuestion: {text_b} Yes or no?\nAnswer:"

# `hf=`: the task on the Hugging Face hub, HFSource(path, config, pool split, test split,
# text_a column, text_b column, label column). Every hub label order below equals ours
# (shared/data/README.md), so no task needs a label_map: GLUE sst2 0 negative / 1 positive,
# mrpc 0 not_equivalent / 1 equivalent, rte 0 entailment / 1 not_entailment; SNLI 0 entailment /
# 1 neutral / 2 contradiction, -1 (no gold label) dropped; yelp_polarity "1" / "2" stars-class
# = negative / positive; ag_news World, Sports, Business, Sci/Tech; dbpedia_14 in our order
# (text = `content` only, no title, as BBT and our local pool); SetFit/sst5 0 very negative ..
# 4 very positive; trec `coarse_label` ABBR, ENTY, DESC, HUM, LOC, NUM; rotten_tomatoes
# 0 neg / 1 pos. From the hub, yelp_polarity and dbpedia get their official test split, and
# mr the Rotten Tomatoes train/test split (not the fixed 2,000-row split of `mr.py`).
_BUILTIN: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="sst2",
        label_names=("negative", "positive"),
        verbalizer=("bad", "great"),
        mlm_template=_SENTIMENT_MLM,
        clm_template=_SENTIMENT_CLM,
        metric="accuracy",
        data_subdir="sst2",
        hf=HFSource("nyu-mll/glue", "sst2", "train", "validation", "sentence", None, "label"),
        description="SST-2 movie-review sentiment (GLUE; test = GLUE dev, 872)",
    ),
    TaskSpec(
        name="yelp_polarity",
        label_names=("negative", "positive"),
        verbalizer=("bad", "great"),
        mlm_template=_SENTIMENT_MLM,
        clm_template=_SENTIMENT_CLM,
        metric="accuracy",
        data_subdir="yelp_polarity",
        hf=HFSource("fancyzhx/yelp_polarity", None, "train", "test", "text", None, "label"),
        description="Yelp review polarity (local pool only: test = pool minus train/dev)",
    ),
    TaskSpec(
        name="agnews",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        verbalizer=("World", "Sports", "Business", "Tech"),
        mlm_template="{mask} News: {text_a}",
        clm_template="{text_a} Topic:",
        metric="accuracy",
        data_subdir="agnews",
        hf=HFSource("fancyzhx/ag_news", None, "train", "test", "text", None, "label"),
        description="AG News topic, 4 classes (official test, 7,600)",
    ),
    TaskSpec(
        name="dbpedia",
        label_names=(
            "Company",
            "EducationalInstitution",
            "Artist",
            "Athlete",
            "OfficeHolder",
            "MeanOfTransportation",
            "Building",
            "NaturalPlace",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "WrittenWork",
        ),
        verbalizer=(
            "Company",
            "Education",
            "Artist",
            "Athlete",
            "Office",
            "Transportation",
            "Building",
            "Natural",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "Written",
        ),
        clm_verbalizer=(
            "Company",
            "Education",
            "Artist",
            "Athletes",
            "Office",
            "Transportation",
            "Building",
            "Natural",
            "Village",
            "Animal",
            "Plant",
            "Music",
            "Film",
            "Written",
        ),
        mlm_template="[ Category: {mask} ] {text_a}",
        clm_template="{text_a} Category:",
        metric="accuracy",
        data_subdir="dbpedia",
        hf=HFSource("fancyzhx/dbpedia_14", None, "train", "test", "content", None, "label"),
        description="DBPedia-14 ontology, 14 classes (local pool only: test = pool minus train/dev)",
    ),
    TaskSpec(
        name="mrpc",
        label_names=("not_equivalent", "equivalent"),
        verbalizer=("No", "Yes"),
        mlm_template=_PAIR_MLM,
        clm_template=_PAIR_CLM,
        metric="f1",
        data_subdir="mrpc",
        hf=HFSource(
            "nyu-mll/glue", "mrpc", "train", "validation", "sentence1", "sentence2", "label"
        ),
        description="MRPC paraphrase, sentence pairs, F1 (GLUE; test = GLUE dev, 408)",
    ),
    TaskSpec(
        name="snli",
        label_names=("entailment", "neutral", "contradiction"),
        verbalizer=("Yes", "Maybe", "No"),
        mlm_template=_PAIR_MLM,
        clm_template="{text_a}\nQuestion: {text_b} Yes, no, or maybe?\nAnswer:",
        metric="accuracy",
        data_subdir="snli",
        hf=HFSource(
            "stanfordnlp/snli",
            None,
            "train",
            "test",
            "premise",
            "hypothesis",
            "label",
            skip_labels=(-1,),
        ),
        description="SNLI entailment, 3 classes (official test, 9,824)",
    ),
    TaskSpec(
        name="rte",
        label_names=("entailment", "not_entailment"),
        verbalizer=("Yes", "No"),
        mlm_template=_PAIR_MLM,
        clm_template=_PAIR_CLM,
        metric="accuracy",
        data_subdir="rte",
        hf=HFSource(
            "nyu-mll/glue", "rte", "train", "validation", "sentence1", "sentence2", "label"
        ),
        description="RTE entailment, sentence pairs (GLUE; test = GLUE dev, 277)",
    ),
    TaskSpec(
        name="sst5",
        label_names=("very negative", "negative", "neutral", "positive", "very positive"),
        verbalizer=("terrible", "bad", "okay", "good", "great"),
        mlm_template=_SENTIMENT_MLM,
        clm_template=_SENTIMENT_CLM,
        metric="accuracy",
        data_subdir="sst5",
        hf=HFSource("SetFit/sst5", None, "train", "test", "text", None, "label"),
        description="SST-5 fine-grained sentiment, 5 classes (official test, 2,210)",
    ),
    TaskSpec(
        name="trec",
        # Label order is the data's (HF `trec` coarse): ABBR, ENTY, DESC, HUM, LOC, NUM;
        # words are LM-BFF's, mapped to that order.
        label_names=("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"),
        verbalizer=("Expression", "Entity", "Description", "Human", "Location", "Number"),
        mlm_template="{mask} : {text_a}",
        clm_template="{text_a} Answer type:",
        metric="accuracy",
        data_subdir="trec",
        hf=HFSource("CogComp/trec", None, "train", "test", "text", None, "coarse_label"),
        description="TREC-6 question type, 6 classes (official test, 500)",
    ),
    TaskSpec(
        name="mr",
        label_names=("negative", "positive"),
        verbalizer=("bad", "great"),
        mlm_template=_SENTIMENT_MLM,
        clm_template=_SENTIMENT_CLM,
        metric="accuracy",
        data_subdir="mr",
        hf=HFSource(
            "cornell-movie-review-data/rotten_tomatoes",
            None,
            "train",
            "test",
            "text",
            None,
            "label",
        ),
        description="Movie-review snippets (Rotten Tomatoes polarity via vaderSentiment; "
        "downloaded on first use; fixed 2,000-row test)",
    ),
)

_REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in _BUILTIN}
for _spec in _BUILTIN:
    validate_spec(_spec, f"built-in task {_spec.name}")

# Built-in tasks whose local copy has no test.jsonl: test = pool minus sampled train/dev.
TEST_FROM_POOL = frozenset({"yelp_polarity", "dbpedia"})


def get_task(name: str) -> TaskSpec:
    """The registered task called `name`; UserError with a suggestion if unknown."""
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    hint = did_you_mean(name, _REGISTRY)
    raise UserError(f"unknown task {name!r} (known: {', '.join(_REGISTRY)}){hint}")


def list_tasks() -> list[TaskSpec]:
    """All registered tasks, in registry order (the paper's seven first)."""
    return list(_REGISTRY.values())
