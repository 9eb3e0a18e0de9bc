"""`Verbalizer`: label → label word → token id, checked once against the tokenizer.

The model classifies by comparing its mask-position logits for one word per class. That only works
if each label word is exactly one token of the model's vocabulary, and the token must be the one
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
    """Maps each class label to a single-token label word.

    Args:
        label_words: ``{label: word}``, a list of words (label = position), or a string of either,
            e.g. LM-BFF's ``"{'0':'terrible','1':'great'}"``.
        tokenizer: the model's tokenizer; each word must be exactly one (known) token of it.
        prefix_space: encode each word with a leading space, as it appears after the template text.

    Classes are ordered by label value when every label is an integer (so class index == label for
    SST-2's 0/1), otherwise in the order given. `class_index` accepts a label in any spelling
    (1, '1', a numpy integer).
    """

    def __init__(
        self,
        label_words: Mapping[Any, str] | Sequence[str] | str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        prefix_space: bool = True,
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
        self.token_ids: tuple[int, ...] = tuple(self._single_token_id(tokenizer, label, word) for label, word in pairs)
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(
                f"label words {list(self.words)} map to token ids {list(self.token_ids)}: two classes share a token, "
                "so the model could not tell them apart. Choose distinct words."
            )
        self._index = {label: i for i, label in enumerate(self.labels)}

    def _single_token_id(self, tokenizer: PreTrainedTokenizerBase, label: Any, word: str) -> int:
        text = " " + word if self.prefix_space and not word[0].isspace() else word
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            tokens = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(
                f"label word {word!r} (label {label!r}) is {len(ids)} tokens for {type(tokenizer).__name__} "
                f"{tokenizer.name_or_path!r}: {text!r} -> {tokens} (ids {ids}); a label word must be exactly one "
                "token. Pick a word the tokenizer keeps whole, e.g. 'great' / 'terrible'."
            )
        if tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"label word {word!r} (label {label!r}) is the unknown token {tokenizer.unk_token!r} for "
                f"{type(tokenizer).__name__} {tokenizer.name_or_path!r}; pick a word in its vocabulary."
            )
        return ids[0]

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

    def token_id(self, label: Any) -> int:
        """The label word's token id for `label`."""
        return self.token_ids[self.class_index(label)]
