"""The label-word head: the LM head evaluated at the mask and for the label words only.

Prompt-based fine-tuning (LM-BFF) classifies with the masked-LM head: class c scores
s_c = w_{v(c)} · h(x_mask) + b_{v(c)}, where v maps each class to its label word, h is the head's
dense → activation → LayerNorm transform and (w, b) are the decoder's rows; the loss is the cross-entropy
of softmax(s) against the class. The stock head computes all V rows at all L positions and throws away
all but |classes| numbers per example; here the transform runs at the mask only and the decoder multiplies
only the label-word rows.

The row selection happens inside `LabelWordDecoder.forward`, i.e. inside the module that owns the decoder
weight: module-scoped perturbation (`hf_mezo.perturbation`) swaps a parameter only while its owner runs, so
a gather done by the parent (`head.decoder.weight[ids]` in the model's forward) would read the unperturbed θ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100  # the MLM "no target here" value, as in `transformers` and the data collators


class LabelWordDecoder(nn.Linear):
    """The LM head's output projection (vocabulary × hidden), able to compute only chosen rows.

    Behaves exactly as `nn.Linear` unless rows are selected with `restricted_to`, so the stock head's forward
    (dense, activation, LayerNorm, decoder) is reused unchanged. Parameter names are those of `nn.Linear`:
    checkpoints are interchangeable with the stock model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.active_rows: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> LabelWordDecoder:
        """A `LabelWordDecoder` holding `linear`'s own Parameter objects (ties to the embeddings survive)."""
        decoder = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        decoder.weight = linear.weight
        decoder.bias = linear.bias
        return decoder

    @contextlib.contextmanager
    def restricted_to(self, rows: torch.Tensor) -> Iterator[None]:
        """Within the block, forward returns logits for `rows` (vocabulary ids) only, in that order."""
        previous, self.active_rows = self.active_rows, rows
        try:
            yield
        finally:
            self.active_rows = previous

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.active_rows is None:
            return super().forward(hidden)
        bias = None if self.bias is None else self.bias[self.active_rows]
        return F.linear(hidden, self.weight[self.active_rows], bias)


def validate_label_word_ids(
    label_word_ids: Sequence[int | Sequence[int]] | None, vocab_size: int, multi_token: bool = False
) -> list[int | list[int]] | None:
    """The label words as a list (one entry per class), or None; raises on anything else.

    An entry is one token id, or with `multi_token` a sequence of token ids (a word the tokenizer splits); a
    one-element sequence is stored as its id, so single-token words always read as ints.
    """
    if label_word_ids is None:
        return None
    if isinstance(label_word_ids, torch.Tensor):
        label_word_ids = label_word_ids.tolist()
    entries = []
    for entry in label_word_ids:
        if isinstance(entry, torch.Tensor):
            entry = entry.tolist()
        if isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 1:
            entry = entry[0]
        if isinstance(entry, Sequence) and not isinstance(entry, str):
            entry = list(entry)
        entries.append(entry)

    def is_id(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    well_formed = len(entries) >= 2 and all(
        is_id(e) or (isinstance(e, list) and len(e) > 1 and all(is_id(i) for i in e)) for e in entries
    )
    if not well_formed:
        raise ValueError(
            f"label_word_ids must be a sequence of at least two label words (one per class), each a token id"
            f"{' or a list of token ids' if multi_token else ''}, got {label_word_ids!r}; e.g. "
            "tokenizer.convert_tokens_to_ids(['Ġterrible', 'Ġgreat'])."
        )
    multi = [e for e in entries if isinstance(e, list)]
    if multi and not multi_token:
        raise ValueError(
            f"label_word_ids {entries} hold multi-token words {multi}, which this model cannot score: it reads one "
            "vocabulary id per class. A causal LM scores multi-token words with hf_mezo.AutoModelForPromptCausalLM; "
            "otherwise pick label words the tokenizer keeps whole."
        )
    flat = [i for e in entries for i in (e if isinstance(e, list) else [e])]
    if not all(0 <= i < vocab_size for i in flat):
        raise ValueError(f"label_word_ids {entries} must lie in [0, vocab_size={vocab_size}).")
    if len({tuple(e) if isinstance(e, list) else e for e in entries}) != len(entries):
        raise ValueError(f"label_word_ids {entries} repeat a label word: each class needs its own.")
    return entries


def is_multi_token(label_word_ids: Sequence[int | Sequence[int]] | None) -> bool:
    """Whether some class's label word is several tokens."""
    return label_word_ids is not None and any(not isinstance(e, int) for e in label_word_ids)


def find_mask_positions(
    input_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask_positions: torch.Tensor | None,
    mask_token_id: int | None,
) -> torch.Tensor:
    """The mask position of each example, (batch,): given, else where `labels` ≠ -100, else the mask token.

    Exactly one mask per example is required: the label-word head scores one position per example.
    """
    if mask_positions is not None:
        positions = torch.as_tensor(mask_positions).reshape(-1).long()
        reference = labels if labels is not None else input_ids
        if reference is not None:
            batch, length = reference.shape[:2]
            if positions.numel() != batch or not bool(((positions >= 0) & (positions < length)).all()):
                raise ValueError(
                    f"mask_positions must hold one position in [0, {length}) per example ({batch}), got {positions.tolist()}."
                )
        return positions
    if labels is not None:
        where, source = labels.ne(IGNORE_INDEX), "labels ≠ -100"
    elif input_ids is not None and mask_token_id is not None:
        where, source = input_ids.eq(mask_token_id), f"input_ids == mask_token_id ({mask_token_id})"
    else:
        raise ValueError(
            "The label-word head needs the mask position of each example: pass `mask_positions`, or MLM-style "
            "`labels` (-100 except the label word at the mask), or set the model's mask_token_id "
            "(`model.set_label_word_ids(ids, mask_token_id=tokenizer.mask_token_id)`)."
        )
    counts = where.sum(dim=1)
    if not bool((counts == 1).all()):
        raise ValueError(
            f"The label-word head needs exactly one mask per example, found {counts.tolist()} positions with "
            f"{source}. Pass `mask_positions` to choose one per example."
        )
    return where.long().argmax(dim=1)


def class_targets(
    label_word_ids: torch.Tensor,
    mask_positions: torch.Tensor,
    labels: torch.Tensor | None,
    class_labels: torch.Tensor | None,
) -> torch.Tensor | None:
    """Class index per example: `class_labels`, else the label word that `labels` holds at the mask.

    Examples whose MLM label at the mask is -100 get target -100 (ignored by the loss).
    """
    if class_labels is not None:
        return torch.as_tensor(class_labels, device=label_word_ids.device).reshape(-1).long()
    if labels is None:
        return None
    words = labels[torch.arange(labels.shape[0], device=labels.device), mask_positions.to(labels.device)]
    words = words.to(label_word_ids.device)
    matches = words.unsqueeze(1).eq(label_word_ids.unsqueeze(0))
    unknown = ~matches.any(dim=1) & words.ne(IGNORE_INDEX)
    if bool(unknown.any()):
        raise ValueError(
            f"labels hold token ids {words[unknown].tolist()} at the mask, which are not label words "
            f"{label_word_ids.tolist()}; pass `class_labels`, or fix the verbalizer's label words."
        )
    return torch.where(words.eq(IGNORE_INDEX), IGNORE_INDEX, matches.long().argmax(dim=1))


def label_word_loss(
    class_logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """LM-BFF loss: cross-entropy over the label words, averaged over examples.

    With `num_items_in_batch` (the Trainer passes it to models that accept loss kwargs, counting `labels` ≠ -100
    across the accumulated micro-batches) the sum is divided by it instead, so gradient accumulation gives the
    mean over the whole batch.
    """
    targets = targets.to(class_logits.device)
    if class_logits.dtype != torch.float64:  # half-precision logits: the loss in float32; float64 stays float64
        class_logits = class_logits.float()
    if num_items_in_batch is None:
        return F.cross_entropy(class_logits, targets, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(class_logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
