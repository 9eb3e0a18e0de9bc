"""`VerbalizerDataCollator`: raw rows (sentence, label) → a padded prompt batch for a masked or causal LM.

The batch serves both model kinds without a conversion step:

- a stock ``AutoModelForMaskedLM`` (``RobertaForMaskedLM``, ``BertForMaskedLM``, ...) gets ``labels`` in
  MLM form: -100 everywhere except the mask position, which holds the label word's id. Its own loss
  is then the cross-entropy of the label word over the full vocabulary at the mask;
- a label-word head model also gets ``class_labels`` (the class index) and ``mask_positions`` (the
  index of the mask token in each row) when ``return_class_labels=True``. They are off by default so
  that a stock model, whose ``forward`` does not accept them, gets only what it accepts.

For a causal LM (a `CausalPromptTemplate`, or ``causal=True``, the default for a tokenizer without a mask
token) the prompt ends where the label word would follow, ``labels`` is the class index (batch,) — what the
causal prompt LMs (`hf_mezo.models.LlamaForPromptCausalLM`, ...) take, and what `compute_metrics` reads — and
``mask_positions`` is each row's last prompt token. Rows pad on the tokenizer's ``padding_side``; the model
counts position ids from each row's first attended token, so a row's scores do not depend on its padding.

Use it as the Trainer's ``data_collator`` with ``remove_unused_columns=False``: the Trainer would
otherwise drop the ``sentence`` column, which no model's ``forward`` names, before the collator sees it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .template import CausalPromptTemplate, PromptTemplate
from .verbalizer import Verbalizer

# `tokenizer.model_max_length` for tokenizers that declare no limit (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = int(1e20)
COLUMNS = ("sentence", "label")


class VerbalizerDataCollator:
    """Builds prompts, truncates only the sentence, pads, and adds MLM labels at the mask.

    Args:
        tokenizer: the model's tokenizer (its padding side and truncation side are honoured).
        template: a `PromptTemplate` or a template string (LM-BFF or readable style).
        verbalizer: a `Verbalizer`, or label words to build one with `tokenizer`
            (``"{'0':'terrible','1':'great'}"``, a dict or a list).
        max_length: longest prompt in tokens; only the sentence is cut to fit. None: the tokenizer's
            ``model_max_length`` (no limit if it declares none).
        pad_to_multiple_of: pad each batch to a multiple of this (8 suits tensor cores).
        column_map: dataset column names for ``"sentence"`` and ``"label"``, e.g.
            ``{"sentence": "text"}`` for a dataset whose sentence column is ``text``.
        return_class_labels: also return ``class_labels`` and ``mask_positions`` (for a label-word
            head model; a stock masked LM does not accept them).
        causal: build prompts for a causal LM (see the module docstring). None: causal when `template` is a
            `CausalPromptTemplate` or the tokenizer has no mask token.

    Returns from ``__call__``: ``input_ids``, ``attention_mask``, ``token_type_ids`` (only if the
    tokenizer's model uses them), ``labels``, and optionally ``class_labels``, ``mask_positions``;
    all ``torch.long``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: PromptTemplate | str,
        verbalizer: Verbalizer | Mapping[Any, str] | Sequence[str] | str,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        column_map: Mapping[str, str] | None = None,
        return_class_labels: bool = False,
        causal: bool | None = None,
    ):
        self.tokenizer = tokenizer
        if causal is None:
            causal = isinstance(template, CausalPromptTemplate) or tokenizer.mask_token_id is None
        self.causal = causal
        template_class = CausalPromptTemplate if causal else PromptTemplate
        self.template = template if type(template) is template_class else template_class(template)
        if not isinstance(verbalizer, Verbalizer):  # a causal LM can score multi-token words; a masked LM cannot
            verbalizer = Verbalizer(verbalizer, tokenizer, multi_token=causal)
        if not causal and verbalizer.multi_token:
            raise ValueError(
                f"{verbalizer!r} has multi-token label words; a masked LM scores one token at the mask. Pick words "
                "the tokenizer keeps whole, or use a causal LM (causal=True)."
            )
        self.verbalizer = verbalizer
        if max_length is None and tokenizer.model_max_length < _NO_LIMIT:
            max_length = tokenizer.model_max_length
        if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}.")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}.")
        if tokenizer.pad_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} {tokenizer.name_or_path!r} has no pad token; set tokenizer.pad_token "
                "first (for a causal LM, tokenizer.pad_token = tokenizer.eos_token: padded positions are masked)."
            )
        unknown = set(column_map or {}) - set(COLUMNS)
        if unknown:
            raise ValueError(
                f"column_map keys must be among {COLUMNS} (what the collator reads), got {sorted(unknown)}; "
                "map them to your dataset's columns, e.g. {'sentence': 'text'}."
            )
        self.columns = {name: (column_map or {}).get(name, name) for name in COLUMNS}
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_class_labels = return_class_labels
        self.return_token_type_ids = "token_type_ids" in tokenizer.model_input_names
        if max_length is not None:
            # Fails now, not at the first batch, if the template alone does not fit.
            self.template.encode(tokenizer, "", max_length)

    def check_model(self, model) -> None:
        """Refuse, before any work, a model that would misread this collator's batches.

        A causal batch's ``labels`` are class indices (batch,): a stock ``*ForCausalLM`` would take them for token
        labels and fail inside torch (``Expected input batch_size (40) to match target batch_size (4)``). A prompt
        LM whose label words are not the verbalizer's would score other words. `MeZOTrainer` calls this with its
        model and data collator.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's base
        base = getattr(base, "module", base)  # a DDP / DataParallel wrapper
        label_word_ids = getattr(base, "label_word_ids", None)
        if not hasattr(base, "set_label_word_ids"):
            if not self.causal:
                return  # a stock masked LM reads MLM labels: its own full-vocabulary loss at the mask
            raise ValueError(
                f"VerbalizerDataCollator(causal=True) returns class-index `labels` (batch,), which "
                f"{type(base).__name__} would read as token labels. Load the model as a prompt LM, which scores the "
                "classes by their label words: hf_mezo.AutoModelForPromptCausalLM.from_pretrained(path, "
                "label_word_ids=collator.verbalizer.label_word_ids) (or .from_model(model, label_word_ids=...))."
            )
        expected = list(self.verbalizer.label_word_ids)
        if label_word_ids is None and not self.causal:
            return  # a prompt masked LM without label words is the stock one
        if label_word_ids is None or list(label_word_ids) != expected:
            raise ValueError(
                f"{type(base).__name__} has label words {label_word_ids}, but the collator's verbalizer "
                f"{self.verbalizer!r} has {expected}: the model would score other words. Call "
                "model.set_label_word_ids(collator.verbalizer.label_word_ids)."
            )

    def __repr__(self) -> str:
        return (
            f"VerbalizerDataCollator(template={self.template!r}, verbalizer={self.verbalizer!r}, causal={self.causal}, "
            f"max_length={self.max_length}, return_class_labels={self.return_class_labels})"
        )

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("VerbalizerDataCollator got an empty batch.")
        sentence_column, label_column = self.columns["sentence"], self.columns["label"]
        sentences, class_labels = [], []
        for example in examples:
            missing = [c for c in (sentence_column, label_column) if c not in example]
            if missing:
                raise ValueError(
                    f"example is missing column(s) {missing} (it has {sorted(example)}). Pass "
                    "column_map={'sentence': ..., 'label': ...} for other names, and remove_unused_columns=False "
                    "to the Trainer so it keeps the sentence column."
                )
            sentence = example[sentence_column]
            if not isinstance(sentence, str):
                raise TypeError(f"column {sentence_column!r} must hold strings, got {type(sentence).__name__}.")
            sentences.append(sentence)
            class_labels.append(self.verbalizer.class_index(example[label_column]))

        encodings = self.template.encode_batch(self.tokenizer, sentences, self.max_length)
        length = max(len(e.input_ids) for e in encodings)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch_size = len(encodings)
        input_ids = torch.full((batch_size, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        token_type_ids = torch.zeros((batch_size, length), dtype=torch.long)
        mask_positions = torch.empty(batch_size, dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for row, encoding in enumerate(encodings):
            n = len(encoding.input_ids)
            start = length - n if left else 0
            input_ids[row, start : start + n] = torch.tensor(encoding.input_ids)
            attention_mask[row, start : start + n] = 1
            token_type_ids[row, start : start + n] = torch.tensor(encoding.token_type_ids)
            mask_positions[row] = start + encoding.mask_position
        class_labels = torch.tensor(class_labels, dtype=torch.long)
        if self.causal:
            labels = class_labels.clone()  # the label word follows the prompt: nothing to mark inside it
        else:
            labels = torch.full((batch_size, length), -100, dtype=torch.long)
            labels[torch.arange(batch_size), mask_positions] = torch.tensor(self.verbalizer.token_ids)[class_labels]

        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.return_token_type_ids:
            batch["token_type_ids"] = token_type_ids
        batch["labels"] = labels
        if self.return_class_labels:
            batch["class_labels"] = class_labels
            batch["mask_positions"] = mask_positions
        return batch
