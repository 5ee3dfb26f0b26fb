"""Turning examples into token ids with a slot position, and label words into token ids.

Masked LM: the template's {mask} becomes the tokenizer's mask token, the tokenizer adds its
own special tokens (<s> ... </s>, [CLS] ... [SEP]); the slot is the mask position.
Causal LM: the template (which ends right before the label word) is encoded without special
tokens, except that the tokenizer's BOS is prepended when the tokenizer itself adds one
(never twice, never an EOS); the slot is the LAST token, whose next-token logits are read
at the verbalizer ids.

Over-long inputs are cut in the example text only (text_a, and text_b for pairs, longest
first, from the end), never in the template, so the slot always survives. A max_length
that leaves no token of text after the template's own tokens is refused before anything
is encoded (every prompt would be the bare template, and a run would go on with identical
inputs and learn nothing); the minimum is the template's length plus one token per text.
A partial cut (some examples cut) gets no note: cutting long texts is what max_length is
for (the option's help says so), each cut prompt keeps its text's beginning, its
template and its slot, and the default of 256 cuts only a few long reviews.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dfo_lora.errors import UserError
from dfo_lora.tasks.spec import Example, TaskSpec, template_pieces

# Context used to find how a word is tokenized when it follows other words ("It was great").
_CONTEXT = "It was"


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one prompt, the slot index (mask token / last token) and the label."""

    input_ids: list[int]
    slot: int
    label: int


def render(template: str, text_a: str, text_b: str | None, mask: str = "") -> str:
    """Fill a template's {text_a}, {text_b}, {mask} in one pass (texts are not re-scanned);
    `{{` and `}}` become `{` and `}` (`spec.template_pieces`)."""
    values = {"{text_a}": text_a, "{text_b}": text_b or "", "{mask}": mask}
    return "".join(values[p] if slot else p for slot, p in template_pieces(template))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _adds_bos(tokenizer) -> bool:
    """True if the tokenizer has a BOS token and puts it in front by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _word_token_ids(tokenizer, word: str) -> list[int]:
    """Token ids of `word` as it appears after another word in running text.

    That is the space-prefixed token for byte-level BPE (RoBERTa, GPT-2, SmolLM2) and
    SentencePiece tokenizers, and the bare word for WordPiece (BERT), which ignores spaces.
    """
    base = _ids(tokenizer, _CONTEXT)
    full = _ids(tokenizer, f"{_CONTEXT} {word}")
    if full[: len(base)] == base and len(full) > len(base):
        return full[len(base) :]
    return _ids(tokenizer, " " + word)  # context merged with the word: fall back


def verbalizer_ids(spec: TaskSpec, tokenizer, causal: bool) -> list[int]:
    """One token id per label for the spec's verbalizer words (causal or masked variant).

    UserError if a word is several tokens for this tokenizer, or two words share a token.
    """
    ids = []
    for word in spec.words(causal):
        tokens = _word_token_ids(tokenizer, word)
        pieces = [tokenizer.decode([t]) for t in tokens]
        shown = (" " + word) if pieces and pieces[0].startswith(" ") else word
        if len(tokens) != 1:
            raise UserError(
                f"task {spec.name}: verbalizer word {shown!r} is {len(tokens)} tokens for this "
                f"tokenizer: {pieces!r}; choose a single-token word"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise UserError(
            f"task {spec.name}: verbalizer words {list(spec.words(causal))} do not map to "
            "distinct tokens for this tokenizer"
        )
    return ids


def _truncate_text(tokenizer, text: str, n_tokens: int) -> str:
    """The prefix of `text` covering its first `n_tokens` tokens (encoded on its own)."""
    if n_tokens <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if n_tokens >= len(offsets):
            return text
        return text[: offsets[n_tokens - 1][1]].rstrip()
    ids = _ids(tokenizer, text)
    if n_tokens >= len(ids):
        return text
    return tokenizer.decode(ids[:n_tokens]).strip()


def _longest_first(len_a: int, len_b: int, excess: int) -> tuple[int, int]:
    """New token budgets after removing `excess` tokens, always from the longer text."""
    for _ in range(min(excess, len_a + len_b)):
        if len_a >= len_b:
            len_a -= 1
        else:
            len_b -= 1
    return len_a, len_b


def encode(
    spec: TaskSpec,
    examples: Sequence[Example],
    tokenizer,
    causal: bool,
    max_length: int = 256,
) -> list[EncodedExample]:
    """Encode examples with the spec's masked-LM or causal-LM template (see module doc).

    UserError when `max_length` leaves no room for the text after the template's tokens.
    """
    if max_length <= 0:
        raise UserError(f"max_length must be positive, got {max_length}")
    template = spec.clm_template if causal else spec.mlm_template
    mask_token = None
    mask_id = None
    bos_prefix: list[int] = []
    if causal:
        if _adds_bos(tokenizer):
            bos_prefix = [tokenizer.bos_token_id]
    else:
        mask_token = getattr(tokenizer, "mask_token", None)
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token is None or mask_id is None:
            raise UserError(
                f"task {spec.name}: this tokenizer has no mask token; a masked-LM template "
                "needs one (is the model causal?)"
            )

    def clean(text: str | None) -> str | None:
        if text is None or mask_token is None:
            return text
        return text.replace(mask_token, " ")  # a literal mask token in the data is not a slot

    def prompt(a: str, b: str | None) -> str:
        if causal:
            return render(template, a, b).rstrip()
        return render(template, a, b, mask_token)

    def ids_of(prompts: list[str]) -> list[list[int]]:
        if causal:
            batch = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            return [bos_prefix + list(ids) for ids in batch]
        return [list(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]

    # The template's own tokens (BOS / special tokens included), from a prompt with empty
    # texts; every text needs at least one token beside them for the prompts to differ.
    empty = "" if spec.is_pair else None
    template_tokens = len(ids_of([prompt("", empty)])[0])
    minimum = template_tokens + (2 if spec.is_pair else 1)
    if max_length < minimum:
        kind = "causal-LM" if causal else "masked-LM"
        raise UserError(
            f"max_length={max_length} leaves no room for the text: task {spec.name}'s {kind} "
            f"template takes {template_tokens} tokens with this tokenizer, so the minimum that "
            f"works is {minimum} (one token of {'each text' if spec.is_pair else 'text'})"
        )
    texts = [(clean(e.text_a), clean(e.text_b) if spec.is_pair else None) for e in examples]
    all_ids = ids_of([prompt(a, b) for a, b in texts]) if texts else []
    out = []
    for i, (example, (a, b), ids) in enumerate(zip(examples, texts, all_ids, strict=True)):
        for _ in range(50):
            excess = len(ids) - max_length
            if excess <= 0:
                break
            len_a = len(_ids(tokenizer, a))
            len_b = len(_ids(tokenizer, b)) if b is not None else 0
            if len_a + len_b == 0:
                raise UserError(
                    f"task {spec.name}: the template alone is {len(ids)} tokens, more than "
                    f"max_length={max_length}"
                )
            new_a, new_b = _longest_first(len_a, len_b, excess)
            a = _truncate_text(tokenizer, a, new_a) if new_a < len_a else a
            if b is not None and new_b < len_b:
                b = _truncate_text(tokenizer, b, new_b)
            ids = ids_of([prompt(a, b)])[0]
        else:  # pragma: no cover - truncation always shrinks the text
            raise RuntimeError(f"example {i}: could not truncate to {max_length} tokens")
        if causal:
            slot = len(ids) - 1
        else:
            positions = [p for p, t in enumerate(ids) if t == mask_id]
            if len(positions) != 1:
                raise UserError(
                    f"task {spec.name}: example {i} has {len(positions)} mask tokens after "
                    "encoding, expected 1"
                )
            slot = positions[0]
        out.append(EncodedExample(input_ids=ids, slot=slot, label=example.label))
    return out
