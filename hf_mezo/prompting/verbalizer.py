"""`Verbalizer`: label → label word → token id(s), checked once against the tokenizer.

A masked LM classifies by comparing its mask-position logits for one word per class. That only works
if each label word is exactly one token of the model's vocabulary (a causal LM can also score a word
the tokenizer splits: `multi_token=True`), and the token must be the one
that appears after a space in running text: RoBERTa's BPE has ' great' (372) and 'great' (12338) as
different tokens, and the prompt "... It was<mask>." puts the space inside the label word. So a
word is encoded with a leading space by default (as LM-BFF and MeZO do); WordPiece and SentencePiece
tokenizers map ' great' to the same token as 'great' / '▁great', so the rule is safe for them too.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase


def _canonical(label: Any) -> Any:
    """Labels compare by value across spellings: 1, np.int64(1) and '1' are the same label."""
    if isinstance(label, bool):
        return label
    if hasattr(label, "item") and callable(label.item):  # numpy / torch scalars
        label = label.item()
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return label


def parse_label_words(label_words: Mapping[Any, str] | Sequence[str] | str) -> list[tuple[Any, str]]:
    """(label, word) pairs from a mapping, a list (label = position) or a string of either.

    Strings are Python/JSON literals, e.g. LM-BFF's ``"{'0':'terrible','1':'great'}"`` or
    ``'["terrible", "great"]'``.
    """
    original = label_words
    if isinstance(label_words, str):
        try:
            label_words = ast.literal_eval(label_words)
        except (ValueError, SyntaxError):
            raise ValueError(
                f"label_words {original!r} is not a mapping or list literal; write e.g. "
                "\"{'0':'terrible','1':'great'}\" or '[\"terrible\", \"great\"]'."
            ) from None
    if isinstance(label_words, Mapping):
        pairs = list(label_words.items())
    elif isinstance(label_words, Sequence) and not isinstance(label_words, str):
        pairs = list(enumerate(label_words))
    else:
        raise TypeError(f"label_words must be a mapping, a list or a string of one, got {original!r}.")
    if len(pairs) < 2:
        raise ValueError(f"label_words {original!r} names {len(pairs)} class(es); a classifier needs at least 2.")
    for label, word in pairs:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"label word for label {label!r} must be a non-empty string, got {word!r}.")
    return pairs


class Verbalizer:
    """Maps each class label to its label word (one token, or with `multi_token` possibly several).

    Args:
        label_words: ``{label: word}``, a list of words (label = position), or a string of either,
            e.g. LM-BFF's ``"{'0':'terrible','1':'great'}"``.
        tokenizer: the model's tokenizer; each word must be (known) tokens of it.
        prefix_space: encode each word with a leading space, as it appears after the template text.
        multi_token: accept words the tokenizer splits (a causal LM scores them by their mean token
            log-probability, `hf_mezo.AutoModelForPromptCausalLM`); by default each word must be exactly one token.

    Classes are ordered by label value when every label is an integer (so class index == label for
    SST-2's 0/1), otherwise in the order given. `class_index` accepts a label in any spelling
    (1, '1', a numpy integer). `label_word_ids` is what a prompt LM takes: per class a token id, or a list of ids.
    """

    def __init__(
        self,
        label_words: Mapping[Any, str] | Sequence[str] | str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prefix_space: bool = True,
        multi_token: bool = False,
    ):
        pairs = [(_canonical(label), word) for label, word in parse_label_words(label_words)]
        if all(isinstance(label, int) and not isinstance(label, bool) for label, _ in pairs):
            pairs.sort(key=lambda pair: pair[0])
        labels = [label for label, _ in pairs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"label_words {label_words!r} names a label twice: {labels}.")
        self.labels: tuple[Any, ...] = tuple(labels)
        self.words: tuple[str, ...] = tuple(word for _, word in pairs)
        self.prefix_space = prefix_space
        encoded = [self._token_ids(tokenizer, label, word, multi_token) for label, word in pairs]
        # One id per single-token word (as before), a tuple of ids for a word the tokenizer splits.
        self.token_ids: tuple[int | tuple[int, ...], ...] = tuple(ids[0] if len(ids) == 1 else ids for ids in encoded)
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(
                f"label words {list(self.words)} map to token ids {list(self.token_ids)}: two classes share a token, "
                "so the model could not tell them apart. Choose distinct words."
            )
        self._index = {label: i for i, label in enumerate(self.labels)}

    @property
    def multi_token(self) -> bool:
        """Whether some label word is several tokens."""
        return any(isinstance(ids, tuple) for ids in self.token_ids)

    @property
    def label_word_ids(self) -> list[int | list[int]]:
        """Per class the word's token id, or its list of ids: `model.set_label_word_ids(verbalizer.label_word_ids)`."""
        return [list(ids) if isinstance(ids, tuple) else ids for ids in self.token_ids]

    def _token_ids(
        self, tokenizer: PreTrainedTokenizerBase, label: Any, word: str, multi_token: bool
    ) -> tuple[int, ...]:
        text = " " + word if self.prefix_space and not word[0].isspace() else word
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or (len(ids) != 1 and not multi_token):
            tokens = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"label word {word!r} (label {label!r}) is {len(ids)} tokens for {type(tokenizer).__name__} "
                f"{tokenizer.name_or_path!r}: {text!r} -> {tokens} (ids {ids}); a label word must be exactly one "
                "token here. Pick a word the tokenizer keeps whole, e.g. 'great' / 'terrible', or, for a causal LM, "
                "pass multi_token=True (VerbalizerDataCollator(causal=True) does) and load the model with "
                "hf_mezo.AutoModelForPromptCausalLM, which scores a word by its mean token log-probability."
            )
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise ValueError(
                f"label word {word!r} (label {label!r}) holds the unknown token {tokenizer.unk_token!r} for "
                f"{type(tokenizer).__name__} {tokenizer.name_or_path!r}; pick a word in its vocabulary."
            )
        return tuple(ids)

    def __repr__(self) -> str:
        mapping = ", ".join(
            f"{label!r}: {word!r} ({i})" for label, word, i in zip(self.labels, self.words, self.token_ids)
        )
        return f"Verbalizer({{{mapping}}})"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def class_index(self, label: Any) -> int:
        """Position of `label` among the classes; `ValueError` naming the known labels if it has none."""
        try:
            return self._index[_canonical(label)]
        except (KeyError, TypeError):
            raise ValueError(
                f"label {label!r} has no label word; the verbalizer knows labels {list(self.labels)} "
                f"(words {list(self.words)}). Unlabeled rows (e.g. GLUE's test split, label -1) cannot be scored."
            ) from None

    def token_id(self, label: Any) -> int | tuple[int, ...]:
        """The label word's token id for `label` (a tuple of ids for a multi-token word)."""
        return self.token_ids[self.class_index(label)]
