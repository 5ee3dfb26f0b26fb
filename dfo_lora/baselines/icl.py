"""`icl`: in-context learning, demonstrations from the train split in every prompt.

Demonstrations: the first `demos_per_class` examples of each class in the k-shot train
split (at most k; default 4, so a binary task puts 8 demonstrations, ~200 tokens for
SST-2, in front of each query, far inside SmolLM2's window and cheap on a CPU; with 16
per class a prompt is ~4x longer), put in a seeded order (`stable_permutation(seed + 1)`).
The same block precedes every query. Each demonstration is the task's own template
filled with the example and its label word (causal LM: the prompt followed by " word";
masked LM: the word in the mask's place), joined by blank lines; the query follows in the
unchanged template. So the encoding, verbalizer tokens, slot, metric and loss are tune's
(`encode`, `build_server`): only the template grows by the block.

Context: prompts are limited to `context` tokens (default: the model's window, the
smaller of its position embeddings and the tokenizer's model_max_length). The block is
kept whole if it leaves room for a median-length train query; otherwise the last
demonstrations in the seeded order are dropped until it does, and results.json's notes
say how many were kept. A longer query has its text cut from the end (never the
template or the demonstrations), as tune cuts at max_length; the notes count them. If not
even one demonstration fits, the run stops with a one-line error (exit code 2) before
writing anything.

`calibrate` subtracts the mean logits of the train prompts (tune's calibration); those
prompts carry the same demonstrations, so a train example may see itself among them.
`zero_shot` and `calibrated_zero_shot` in results.json are the prompt without
demonstrations; `tuned` is the ICL prompt on dev and test. Nothing is selected.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dfo_lora.errors import UserError
from dfo_lora.options import Option
from dfo_lora.server.factory import build_server
from dfo_lora.tasks import Example, FewShotData, encode, render, stable_permutation
from dfo_lora.tasks.spec import PLACEHOLDER_RE

HELP = "in-context learning: demonstrations per class from train in every prompt"
OPTIONS = {
    "demos_per_class": Option(4, "demonstrations per class (at most k), from train", positive=True),
    "calibrate": Option(False, "subtract the mean train logits of the ICL prompts"),
    "context": Option(0, "tokens per prompt; 0: the model's context window", minimum=0),
}
SEPARATOR = "\n\n"
NO_LIMIT = 10**9


def model_window(backbone) -> int:
    """Tokens the model can attend to: position embeddings and the tokenizer's limit."""
    cfg = backbone.model.config
    sizes = [getattr(cfg, name, None) for name in ("max_position_embeddings", "n_positions")]
    tokenizer_max = getattr(backbone.tokenizer, "model_max_length", None)
    sizes.append(tokenizer_max if tokenizer_max and tokenizer_max < 10**6 else None)
    sizes = [int(s) for s in sizes if s]
    return min(sizes) if sizes else 512


def pick_demos(train: list[Example], n_labels: int, per_class: int, seed: int) -> list[Example]:
    """The first `per_class` train examples of each class, in a seeded order."""
    chosen = [
        e for label in range(n_labels) for e in [x for x in train if x.label == label][:per_class]
    ]
    return [chosen[i] for i in stable_permutation(seed + 1, len(chosen))]


def _plain(text: str | None, mask_token: str | None) -> str | None:
    """Demonstration text that cannot act as a placeholder or a slot."""
    if text is None:
        return None
    text = PLACEHOLDER_RE.sub(lambda m: "{ " + m.group(0)[1:], text)
    return text.replace(mask_token, " ") if mask_token else text


def demo_block(spec, demos: list[Example], causal: bool, tokenizer) -> str:
    template = spec.clm_template if causal else spec.mlm_template
    words = spec.words(causal)
    mask_token = None if causal else getattr(tokenizer, "mask_token", None)
    parts = []
    for demo in demos:
        a = _plain(demo.text_a, mask_token)
        b = _plain(demo.text_b, mask_token) if spec.is_pair else None
        word = words[demo.label]
        if causal:
            parts.append(render(template, a, b).rstrip() + " " + word)
        else:
            parts.append(render(template, a, b, word))
    return "".join(part + SEPARATOR for part in parts)


def with_block(spec, block: str, causal: bool):
    name = "clm_template" if causal else "mlm_template"
    return dataclasses.replace(spec, **{name: block + getattr(spec, name)})


def run(ctx) -> dict:
    o = ctx.options
    backbone, data = ctx.backbone, ctx.data
    spec, tokenizer, causal = data.spec, backbone.tokenizer, backbone.causal
    window = o["context"] or model_window(backbone)
    per_class = min(o["demos_per_class"], ctx.config.k)
    demos = pick_demos(data.train, spec.n_labels, per_class, ctx.config.seed)
    empty = [Example("", "" if spec.is_pair else None, 0)]

    def length(s, examples) -> list[int]:
        return [len(e.input_ids) for e in encode(s, examples, tokenizer, causal, NO_LIMIT)]

    base_empty = length(spec, empty)[0]
    query_room = int(np.median(length(spec, data.train))) - base_empty
    kept = len(demos)
    while True:
        icl_spec = with_block(spec, demo_block(spec, demos[:kept], causal, tokenizer), causal)
        template_tokens = length(icl_spec, empty)[0]
        if template_tokens + query_room <= window:
            break
        if kept == 1:
            raise UserError(
                f"icl: not even one demonstration fits the context of {window} tokens (one "
                f"demonstration, the template and a median query take {template_tokens + query_room}); "
                "raise --context or use shorter examples"
            )
        kept -= 1
    block_tokens = template_tokens - base_empty
    counts = np.bincount([d.label for d in demos[:kept]], minlength=spec.n_labels)
    ctx.notes.append(
        f"icl: {kept} demonstrations in every prompt (per class: "
        f"{', '.join(f'{n}={c}' for n, c in zip(spec.label_names, counts, strict=True))}; "
        f"{block_tokens} tokens), seeded order; prompts limited to {window} tokens"
    )
    if kept < len(demos):
        ctx.notes.append(
            f"icl: only {kept} of {len(demos)} demonstrations fit the context of {window} "
            f"tokens with room for a median query; the last {len(demos) - kept} in the seeded "
            "order were dropped"
        )
    room = window - template_tokens
    for split in ("train", "dev", "test"):
        examples = getattr(data, split)
        cut = sum(n - base_empty > room for n in length(spec, examples))
        if cut:
            ctx.notes.append(
                f"icl: {cut} of {len(examples)} {split} queries were cut to fit the context "
                f"(text only, from the end)"
            )
    icl_data = FewShotData(spec=icl_spec, train=data.train, dev=data.dev, test=data.test)
    server = build_server(dataclasses.replace(ctx.spec, max_length=window), backbone, icl_data)
    tuned = {s: ctx.evaluate(s, o["calibrate"], server=server) for s in ("dev", "test")}
    return ctx.finish(
        tuned,
        server=server,
        demonstrations=kept,
        demonstration_tokens=block_tokens,
        context=window,
    )
