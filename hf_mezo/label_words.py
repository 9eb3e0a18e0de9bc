"""Label words, defined once: the ignore index, the labelled position of each row, and the class a label word means.

Prompt-based classification puts one label word at the mask (masked LMs) or after the prompt (causal
LMs); the collator's MLM-style labels are -100 everywhere except that position, which holds the label
word's token id. Three places read such labels: the prompt models' loss (`hf_mezo.models`, torch), the
Trainer's `compute_metrics` (`hf_mezo.metrics`, numpy arrays after the gather) and the gradient-free
objectives (`hf_mezo.objectives`, torch). They share these definitions, so a batch means the same thing
to the loss, the metric and the objective. Every function takes torch tensors or numpy arrays alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE_INDEX = -100  # "no target here", as in transformers' losses and data collators


def _as_numpy(values: Any) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def labelled_positions(labels: torch.Tensor | np.ndarray, source: str = "labels ≠ -100") -> Any:
    """Per row, the one position whose label is not -100 (the mask), as the input's type.

    Exactly one per row is required: the label-word head scores one position per example.
    """
    labelled = labels != IGNORE_INDEX
    counts = _as_numpy(labelled.sum(-1)).reshape(-1)
    bad_rows = np.flatnonzero(counts != 1)
    if bad_rows.size:
        rows = [int(r) for r in bad_rows[:5]]
        raise ValueError(
            f"The label-word head needs exactly one mask per example: rows {rows} mark {[int(counts[r]) for r in rows]} "
            f"positions with {source}. Pass `mask_positions` to choose one per row, or build the batch with "
            "VerbalizerDataCollator (one labelled position per row)."
        )
    return (labelled * 1).argmax(-1)  # first (only) labelled position; `* 1` because bool has no argmax


def label_word_classes(words: torch.Tensor | np.ndarray, label_word_ids: Sequence[int] | Any) -> Any:
    """The class of each token id in `words`: its index in `label_word_ids`; -100 stays -100.

    Raises a `ValueError` naming the token ids that are no label word.
    """
    if isinstance(words, torch.Tensor):
        ids = torch.as_tensor(label_word_ids, device=words.device).reshape(-1)
        matches = words.unsqueeze(-1).eq(ids)
        unknown = ~matches.any(dim=-1) & words.ne(IGNORE_INDEX)
        classes = torch.where(words.eq(IGNORE_INDEX), IGNORE_INDEX, matches.long().argmax(dim=-1))
    else:
        words, ids = np.asarray(words), np.asarray(label_word_ids).reshape(-1)
        matches = words[..., None] == ids
        unknown = ~matches.any(axis=-1) & (words != IGNORE_INDEX)
        classes = np.where(words == IGNORE_INDEX, IGNORE_INDEX, matches.argmax(axis=-1)).astype(np.int64)
    if bool(unknown.any()):
        found = sorted({int(w) for w in _as_numpy(words[unknown]).reshape(-1)})
        raise ValueError(
            f"labels hold token ids {found} at the mask, which are not label words "
            f"{[int(i) for i in _as_numpy(ids)]}; pass `class_labels`, or fix the verbalizer's label words."
        )
    return classes


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
        return labelled_positions(labels)
    if input_ids is not None and mask_token_id is not None:
        # The mask token marks the position: the same "exactly one per row" rule, on a -100/mask view of the ids.
        marked = torch.where(input_ids.eq(mask_token_id), input_ids, IGNORE_INDEX)
        return labelled_positions(marked, source=f"input_ids == mask_token_id ({mask_token_id})")
    raise ValueError(
        "The label-word head needs the mask position of each example: pass `mask_positions`, or MLM-style "
        "`labels` (-100 except the label word at the mask), or set the model's mask_token_id "
        "(`model.set_label_word_ids(ids, mask_token_id=tokenizer.mask_token_id)`)."
    )


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
    return label_word_classes(words.to(label_word_ids.device), label_word_ids)
