"""Context before the sentence: an instruction, or k demonstrations (examples with their label word), in a template.

The context becomes literal template text ahead of the sentence, so (1) truncation still cuts only the sentence
(the template's budget counts the context), and (2) every prompt built from the template starts with the same
tokens: the text is tokenized apart from the sentence, which is what lets a causal LM share the prefix's keys and
values across a batch (`hf_mezo.models.shared_prefix`). For the same reason the demonstrations are one fixed set
for every row (drawn once, seeded), not redrawn per example as LM-BFF does for masked LMs.

Both template styles are served: readable (``"{sentence} It was"``: the context is put first) and LM-BFF/MeZO
(``"*cls**sent_0*_It_was"``: the context goes after a leading ``*cls*``, its spaces written as ``_``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .template import CausalPromptTemplate, PromptTemplate, Sentence, Special, Text
from .verbalizer import Verbalizer

DEFAULT_SEPARATOR = "\n\n"


def with_context(template: str, context: str) -> str:
    """`template` with `context` (literal text) before everything but a leading ``*cls*``."""
    if not isinstance(template, str) or not isinstance(context, str):
        raise TypeError(f"template and context must be strings, got {template!r} and {context!r}.")
    if not context:
        return template
    if "*" in template:  # LM-BFF style
        if "*" in context or "_" in context:
            raise ValueError(
                f"context {context!r} holds '*' or '_', which the LM-BFF template {template!r} reads as syntax; "
                "remove them or use a readable template ('{sentence} It was')."
            )
        text = context.replace(" ", "_")
        head = "*cls*" if template.startswith("*cls*") else ""
        return head + text + template[len(head) :]
    if "{" in context or "}" in context:
        raise ValueError(
            f"context {context!r} holds a brace, which the readable template {template!r} reads as a placeholder."
        )
    return context + template


def with_instruction(template: str, instruction: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """`template` preceded by `instruction` and `separator`."""
    if not instruction.strip():
        raise ValueError("instruction is empty; leave it out to use the template alone.")
    return with_context(template, instruction.strip() + separator)


def select_demonstrations(
    dataset, num: int, seed: int, sentence_column: str = "sentence", label_column: str = "label"
):
    """`num` (sentence, label) pairs from `dataset`, drawn once (seeded) and balanced over the labels round-robin."""
    if num < 1:
        raise ValueError(f"num demonstrations must be ≥ 1, got {num}.")
    if len(dataset) < num:
        raise ValueError(f"asked for {num} demonstrations from a split of {len(dataset)} rows; lower the number.")
    by_label: dict[Any, list[int]] = {}
    for index, label in enumerate(dataset[label_column]):
        by_label.setdefault(label, []).append(index)
    rng = random.Random(seed)
    for indices in by_label.values():
        rng.shuffle(indices)
    labels = sorted(by_label, key=str)
    chosen = []
    while len(chosen) < num:
        for label in labels:
            if by_label[label] and len(chosen) < num:
                chosen.append(by_label[label].pop())
    rng.shuffle(chosen)
    sentences = dataset[sentence_column]
    return [(sentences[i], dataset[label_column][i]) for i in chosen]


def demonstration_text(
    template: str,
    verbalizer: Verbalizer,
    examples: Sequence[tuple[str, Any]],
    causal: bool = True,
    separator: str = DEFAULT_SEPARATOR,
) -> str:
    """The examples written out with `template`, each with its label word in the mask's place, then `separator`.

    Special tokens (*cls*, *sep*) are left out: the demonstrations are plain text inside the prompt. For a causal
    LM a demonstration ends at its label word (as the prompt itself ends before it).
    """
    parsed = CausalPromptTemplate(template) if causal else PromptTemplate(template)
    rendered = []
    for sentence, label in examples:
        word = verbalizer.words[verbalizer.class_index(label)]
        if verbalizer.prefix_space and not word[0].isspace():
            word = " " + word
        text = ""
        for part in parsed.parts:
            if isinstance(part, Sentence):
                text += part.format(sentence)
            elif isinstance(part, Text):
                text += part.text
            elif isinstance(part, Special) and part.name == "mask":
                text += word
        rendered.append(text.strip() + separator)
    return "".join(rendered)


def with_demonstrations(
    template: str,
    verbalizer: Verbalizer,
    examples: Sequence[tuple[str, Any]],
    causal: bool = True,
    separator: str = DEFAULT_SEPARATOR,
) -> str:
    """`template` preceded by the demonstrations (see `demonstration_text`)."""
    return with_context(template, demonstration_text(template, verbalizer, examples, causal, separator))
