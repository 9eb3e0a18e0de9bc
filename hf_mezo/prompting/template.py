"""`PromptTemplate`: a cloze prompt around one sentence, with exactly one mask to fill; `CausalPromptTemplate`:
the same spellings read for a causal LM, the label word following the prompt.

Two spellings are accepted and mean the same thing:

- **LM-BFF / MeZO** (so their run scripts port unchanged), e.g. ``*cls**sent_0*_It_was*mask*.*sep+*``.
  The string alternates literal text and ``*variable*``; ``_`` in text stands for a space. Supported
  variables (a subset of princeton-nlp/LM-BFF's, enough for single-sentence tasks like SST-2):

  ============  ==========================================================================
  ``*cls*``     the tokenizer's CLS token (``<s>`` for RoBERTa, ``[CLS]`` for BERT)
  ``*mask*``    the mask token, exactly once; the label word's slot
  ``*sep*``     the SEP token
  ``*sep+*``    the SEP token, and the segment id (token_type_ids) grows by one after it
  ``*sent_0*``  the sentence
  ``*+sent_0*`` the sentence with a space before it (word-initial BPE tokens after text)
  ``*sent-_0*`` the sentence without its last character (drops a final period)
  ``*sentl_0*`` / ``*sentu_0*``  first character lower- / upper-cased; combinable as
                ``*+sentl_0*``, ``*sentl-_0*``, ...
  ============  ==========================================================================

  Not supported, with an error saying so: ``*sent_1*`` and higher (sentence pairs), ``*label_i*``
  and ``*labelx_i*`` (in-context demonstrations), and any other name.

- **Readable**, e.g. ``"{sentence} It was {mask}."``: ``{sentence}`` and ``{mask}`` placeholders
  in plain text, wrapped in CLS … SEP as ``tokenizer(text)`` would be. The single space before
  ``{mask}`` belongs to the label word (RoBERTa's ' great' carries it), and a space before
  ``{sentence}`` makes it ``+sent_0``; so the example above equals the LM-BFF string above.

Each part is tokenized on its own and the ids are concatenated (as LM-BFF does), which is what
lets truncation cut only the sentence: the template text, the special tokens and the mask always
survive. Surrounding whitespace of the sentence is stripped first — GLUE's TSVs end every sentence
with a space, which RoBERTa's BPE would otherwise encode as a lone 'Ġ' token before the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

SPECIAL_TOKENS = ("cls", "mask", "sep")
_SENTENCE_VARIABLE = re.compile(r"^(?P<space>\+)?sent(?P<case>[lu])?(?P<drop_last>-)?_(?P<index>\d+)$")
_READABLE_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Special:
    """A special token by role: 'cls', 'mask' or 'sep'. `new_segment`: the segment id grows after it."""

    name: str
    new_segment: bool = False


@dataclass(frozen=True)
class Text:
    """Literal template text, tokenized as is (spaces included)."""

    text: str


@dataclass(frozen=True)
class Sentence:
    """The input sentence, with LM-BFF's optional edits."""

    space_before: bool = False
    case: str | None = None  # "lower" / "upper": of the first character
    drop_last_char: bool = False

    def format(self, sentence: str) -> str:
        text = sentence.strip()
        if self.case == "lower":
            text = text[:1].lower() + text[1:]
        elif self.case == "upper":
            text = text[:1].upper() + text[1:]
        if self.drop_last_char:
            text = text[:-1]
        return " " + text if self.space_before else text


Part = Special | Text | Sentence


@dataclass
class PromptEncoding:
    """One prompt as token ids (no padding). `truncated`: sentence tokens cut to fit `max_length`."""

    input_ids: list[int]
    token_type_ids: list[int]
    mask_position: int
    truncated: int = 0


class PromptTemplate:
    """A cloze template: parses an LM-BFF string (``*cls**sent_0*_It_was*mask*.*sep+*``) or a readable
    one (``"{sentence} It was {mask}."``) into parts, and encodes sentences with it.

    Raises `ValueError` for a template without exactly one mask and one sentence, or with a part
    outside the supported subset (see the module docstring).
    """

    def __init__(self, template: str):
        if isinstance(template, PromptTemplate):
            template = template.source
        if not isinstance(template, str):
            raise TypeError(f"template must be a string, got {type(template).__name__}: {template!r}")
        self.source = template
        if "*mask*" in template:
            self.style = "lmbff"
            parts = _parse_lmbff(template)
        elif "{mask}" in template:
            self.style = "readable"
            parts = _parse_readable(template)
        else:
            raise ValueError(
                f"template {template!r} has no mask: write '*mask*' (LM-BFF style, e.g. "
                "'*cls**sent_0*_It_was*mask*.*sep+*') or '{mask}' (readable style, e.g. '{sentence} It was {mask}.')."
            )
        self.parts: tuple[Part, ...] = tuple(parts)
        masks = sum(isinstance(p, Special) and p.name == "mask" for p in self.parts)
        sentences = sum(isinstance(p, Sentence) for p in self.parts)
        if masks != 1 or sentences != 1:
            raise ValueError(
                f"template {template!r} has {masks} mask(s) and {sentences} sentence placeholder(s); a cloze "
                "template needs exactly one of each."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"

    def __eq__(self, other: object) -> bool:
        # Same class and same parts: a causal template reads its parts differently from a cloze one.
        return type(other) is type(self) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.parts))

    # ---- encoding --------------------------------------------------------------------------------

    def template_length(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Tokens the template takes without the sentence: the budget `max_length` must exceed."""
        return sum(len(ids) for part, ids in self._encode_fixed_parts(tokenizer) if not isinstance(part, Sentence))

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, sentence: str, max_length: int | None = None
    ) -> PromptEncoding:
        """Token ids of the prompt for one sentence; see `encode_batch`."""
        return self.encode_batch(tokenizer, [sentence], max_length)[0]

    def encode_batch(
        self, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int | None = None
    ) -> list[PromptEncoding]:
        """Token ids of the prompt for each sentence, the sentence cut to fit `max_length` if needed.

        The sentence keeps its head (its tail with ``tokenizer.truncation_side == "left"``); everything
        else is never cut. A template that leaves no room for a sentence token is a `ValueError`.
        """
        fixed = self._encode_fixed_parts(tokenizer)
        sentence_part = next(p for p in self.parts if isinstance(p, Sentence))
        budget = None
        if max_length is not None:
            template_length = sum(len(ids) for part, ids in fixed if not isinstance(part, Sentence))
            budget = max_length - template_length
            if budget < 1:
                raise ValueError(
                    f"template {self.source!r} alone is {template_length} tokens, which leaves no room for the "
                    f"sentence within max_length={max_length}; raise max_length or shorten the template."
                )
        formatted = [sentence_part.format(s) for s in sentences]
        sentence_ids = tokenizer(formatted, add_special_tokens=False)["input_ids"] if formatted else []
        encodings = []
        for ids in sentence_ids:
            truncated = 0
            if budget is not None and len(ids) > budget:
                truncated = len(ids) - budget
                ids = ids[-budget:] if tokenizer.truncation_side == "left" else ids[:budget]
            input_ids: list[int] = []
            token_type_ids: list[int] = []
            segment, mask_position = 0, -1
            for part, part_ids in fixed:
                if isinstance(part, Sentence):
                    part_ids = ids
                elif isinstance(part, Special) and part.name == "mask":
                    mask_position = len(input_ids)
                input_ids += part_ids
                token_type_ids += [segment] * len(part_ids)
                if isinstance(part, Special) and part.new_segment:
                    segment += 1
            encodings.append(PromptEncoding(input_ids, token_type_ids, mask_position, truncated))
        return encodings

    def _encode_fixed_parts(self, tokenizer: PreTrainedTokenizerBase) -> list[tuple[Part, list[int]]]:
        """Ids of every part but the sentence (an empty placeholder list for it), in order."""
        encoded = []
        for part in self.parts:
            if isinstance(part, Special):
                token_id = getattr(tokenizer, f"{part.name}_token_id")
                if token_id is None:
                    raise ValueError(
                        f"template {self.source!r} uses '{part.name}', but {type(tokenizer).__name__} has no "
                        f"{part.name} token; a cloze template needs a masked-LM tokenizer (BERT, RoBERTa, ...)."
                    )
                encoded.append((part, [token_id]))
            elif isinstance(part, Text):
                encoded.append((part, tokenizer(part.text, add_special_tokens=False)["input_ids"]))
            else:
                encoded.append((part, []))
        return encoded


def _parse_lmbff(template: str) -> list[Part]:
    pieces = template.split("*")
    if len(pieces) % 2 == 0:
        raise ValueError(
            f"template {template!r} has an odd number of '*': every LM-BFF variable is written *name*, "
            "e.g. '*cls**sent_0*_It_was*mask*.*sep+*'."
        )
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:  # literal text between variables
            if piece:
                parts.append(Text(piece.replace("_", " ")))
            continue
        if piece in SPECIAL_TOKENS:
            parts.append(Special(piece))
        elif piece == "sep+":
            parts.append(Special("sep", new_segment=True))
        elif match := _SENTENCE_VARIABLE.match(piece):
            if int(match["index"]) != 0:
                raise ValueError(
                    f"template {template!r} uses *{piece}*: only single-sentence templates (*sent_0* and its "
                    "variants) are supported, not sentence pairs."
                )
            case = {"l": "lower", "u": "upper", None: None}[match["case"]]
            parts.append(Sentence(bool(match["space"]), case, bool(match["drop_last"])))
        elif piece.startswith(("label_", "labelx_")):
            raise ValueError(
                f"template {template!r} uses *{piece}*: label words inside the template (LM-BFF's in-context "
                "demonstrations) are not supported; the label word goes only in *mask*."
            )
        else:
            raise ValueError(
                f"template {template!r} has unknown variable *{piece}*; supported: *cls*, *mask*, *sep*, *sep+*, "
                "*sent_0* and its variants *+sent_0*, *sent-_0*, *sentl_0*, *sentu_0*. Use '_' for a space in text."
            )
    return parts


def _parse_readable(template: str) -> list[Part]:
    parts: list[Part] = [Special("cls")]
    pieces = _READABLE_PLACEHOLDER.split(template)  # text, name, text, name, ..., text
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if "{" in piece or "}" in piece:
                raise ValueError(f"template {template!r} has an unmatched brace in {piece!r}.")
            if piece:
                parts.append(Text(piece))
            continue
        previous = parts[-1]
        # A space right before a placeholder belongs to the word that fills it: the label word carries its
        # own leading space (' great'), and the sentence is encoded with one (+sent_0).
        space_before = isinstance(previous, Text) and previous.text.endswith(" ")
        if space_before:
            parts[-1] = Text(previous.text[:-1])
            if not parts[-1].text:
                parts.pop()
        if piece == "mask":
            parts.append(Special("mask"))
        elif piece == "sentence":
            parts.append(Sentence(space_before=space_before))
        else:
            raise ValueError(
                f"template {template!r} has unknown placeholder {{{piece}}}; the readable style supports "
                "{sentence} and {mask}."
            )
    parts.append(Special("sep", new_segment=True))
    return parts


def _start_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The special tokens `tokenizer` puts before a text (Llama-2's <s>, OPT's </s>; none for GPT-2 or SmolLM2)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []


class CausalPromptTemplate(PromptTemplate):
    """A prompt for a causal LM: the label word is the next token after the prompt's last token.

    Accepts the same spellings as `PromptTemplate`, read for a decoder-only model:

    - MeZO's causal form, a template without a mask: ``"{sentence} It was"`` (or ``"*cls**sent_0*_It_was"``);
      the label word (with its leading space, ' great') follows the prompt.
    - A cloze template (``"*cls**sent_0*_It_was*mask*.*sep+*"``, ``"{sentence} It was {mask}."``): the prompt is
      everything before the mask; what follows it (``.``, ``*sep+*``) cannot influence a next-token prediction
      and is dropped (kept in `dropped_parts`). ``*cls*`` becomes the tokens the tokenizer itself puts before a
      text (Llama-2's ``<s>``, OPT's ``</s>``, nothing for GPT-2, SmolLM2 or Qwen2); a ``*sep*`` before the mask
      becomes the SEP token, else EOS.

    `PromptEncoding.mask_position` is the prompt's last token: the position whose next-token logits score the
    classes (the causal prompt LMs' `mask_positions`).
    """

    causal = True

    def __init__(self, template: str):
        if isinstance(template, PromptTemplate):
            template = template.source
        if isinstance(template, str) and "*mask*" not in template and "{mask}" not in template:
            lmbff = re.search(r"\*(cls|sep\+?|\+?sent[lu]?-?_\d+)\*", template) is not None
            source, template = template, template + ("*mask*" if lmbff else " {mask}")
        else:
            source = template
        super().__init__(template)
        self.source = source
        mask_index = next(i for i, p in enumerate(self.parts) if isinstance(p, Special) and p.name == "mask")
        self.dropped_parts: tuple[Part, ...] = self.parts[mask_index + 1 :]
        self.parts = self.parts[: mask_index + 1]
        if not any(isinstance(p, Sentence) for p in self.parts):
            raise ValueError(
                f"template {source!r} puts the sentence after the label word's slot; a causal LM predicts the label "
                "word from the text before it, so the sentence must come first, e.g. '{sentence} It was'."
            )

    def encode_batch(
        self, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int | None = None
    ) -> list[PromptEncoding]:
        """As `PromptTemplate.encode_batch`; `mask_position` is the prompt's last token."""
        encodings = super().encode_batch(tokenizer, sentences, max_length)
        for encoding in encodings:
            if not encoding.input_ids:
                raise ValueError(f"template {self.source!r} gives an empty prompt for sentence ''; nothing to score.")
            encoding.mask_position = len(encoding.input_ids) - 1
        return encodings

    def _encode_fixed_parts(self, tokenizer: PreTrainedTokenizerBase) -> list[tuple[Part, list[int]]]:
        encoded = []
        for part in self.parts:
            if isinstance(part, Special) and part.name == "mask":
                encoded.append((part, []))  # the label word's slot: after the prompt, not in it
            elif isinstance(part, Special) and part.name == "cls":
                encoded.append((part, _start_tokens(tokenizer)))
            elif isinstance(part, Special):
                token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
                if token_id is None:
                    raise ValueError(
                        f"template {self.source!r} uses *sep* before the label word, but {type(tokenizer).__name__} "
                        "has neither a SEP nor an EOS token; remove it from the template."
                    )
                encoded.append((part, [token_id]))
            elif isinstance(part, Text):
                encoded.append((part, tokenizer(part.text, add_special_tokens=False)["input_ids"]))
            else:
                encoded.append((part, []))
        return encoded
