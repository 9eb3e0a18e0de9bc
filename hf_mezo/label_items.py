"""Whether a model's loss shifts its labels, measured on the model rather than read from a flag.

Under gradient accumulation the Trainer (and MeZO's micro-batch weighting) counts the labelled items a
mean-reduced loss averages over: labels ≠ -100, over `labels[..., 1:]` when the loss is a causal-LM loss
that predicts label i+1 at position i. The Trainer reads that from `model.loss_type`, which transformers
leaves unset on some causal LMs (`GPT2LMHeadModel` matches no loss name, yet its forward falls back to
`ForCausalLMLoss`); the count then includes position 0 of every row and weights unequal micro-batches
wrongly (g off by 17.7% on a tiny GPT-2).

`loss_shifts_labels` asks the loss itself: one row, labelled at position 0 only, forwarded once without
gradients. A loss that shifts never reads label 0 and so averages over nothing (NaN, or 0 for a sum); a
loss that does not shift gives a positive cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

IGNORE_INDEX = -100  # the label that no loss in transformers counts


def shift_is_known(model: nn.Module) -> bool:
    """Whether the Trainer's own rule is reliable for `model`, so that no probe forward is needed.

    It is when transformers knows the loss (`loss_type` names an entry of `LOSS_MAPPING`), and for a
    label-word head (`hf_mezo.models`), which scores the mask position only.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base, "loss_type", None) in LOSS_MAPPING or getattr(base, "label_word_ids", None) is not None


@torch.no_grad()
def loss_shifts_labels(model: nn.Module, batch: dict[str, Any]) -> bool | None:
    """True if `model`'s loss ignores label 0 of a row (a causal-LM shift), False if it counts it, None if unknown.

    Unknown: no token-level labels in `batch` (labels shaped like `input_ids`, at least two positions), or a
    forward that does not return a loss for them. Costs one forward of one row; the model's train/eval mode is
    restored.
    """
    labels, input_ids = batch.get("labels"), batch.get("input_ids")
    if not (torch.is_tensor(labels) and torch.is_tensor(input_ids)) or labels.shape != input_ids.shape:
        return None
    if labels.dim() != 2 or labels.shape[1] < 2:
        return None
    probe = {
        k: v[:1] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == labels.shape[0]
    }
    only_first = torch.full_like(labels[:1], IGNORE_INDEX)
    only_first[0, 0] = input_ids[0, 1]  # any valid class id
    probe["labels"] = only_first
    was_training = model.training
    model.eval()
    try:
        outputs = model(**probe)
    except (TypeError, ValueError, RuntimeError) as error:
        logger.info(f"Could not measure whether {type(model).__name__}'s loss shifts its labels ({error}).")
        return None
    finally:
        model.train(was_training)
    loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
    if not torch.is_tensor(loss) or loss.numel() != 1:
        return None
    loss = float(loss)
    return not (loss == loss and loss != 0.0)  # NaN (mean over nothing) or 0 (sum over nothing): label 0 unread
