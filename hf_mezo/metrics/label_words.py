"""`compute_metrics` for prompt-based classification: label-word logits → class predictions → metric.

The Trainer's eval loop hands `compute_metrics` the gathered predictions and ``label_ids`` of every
process (``gather_for_metrics`` semantics, duplicates from uneven batches dropped), so nothing here is
distributed-aware. What arrives depends on the model kind:

- **stock masked LM**: logits of shape (batch, seq, vocab), and ``label_ids`` = the collator's MLM
  labels (batch, seq). The mask position of a row is where its label is not -100, and the label word
  id found there gives the class. Gathering full-vocab logits of every eval batch would cost
  batch·seq·vocab floats per batch (≈ 25 MB for 16×8×50k), so `preprocess_logits_for_metrics`
  shrinks them on the fly to the label words at the mask: (batch, classes);
- **label-word head** (prompt masked and causal LMs): class logits (batch, classes) already; the class
  comes from ``class_labels`` (batch,) if the Trainer passes them, from the causal collator's ``labels``
  (class indices, batch,), or from the MLM labels as above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

SST2_METRIC_PATH = Path(__file__).resolve().parent / "sst2"
IGNORE_INDEX = -100


def load_sst2_metric(**kwargs: Any):
    """The local SST-2 `evaluate` module (accuracy, f1); works offline.

    Kept in memory: with several processes each computing on the gathered predictions, a file cache
    shared by all of them would contend for the same lock.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(SST2_METRIC_PATH), **kwargs)


def _label_word_ids(label_word_ids: Sequence[int] | Any) -> list[int]:
    ids = getattr(label_word_ids, "token_ids", label_word_ids)  # a Verbalizer, or the ids themselves
    # A multi-token word (a causal LM's, scored as class logits) is kept as a tuple: it only names its class.
    ids = [
        tuple(i) if isinstance(i, (list, tuple)) else int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)
    ]
    if len(ids) < 2 or len(set(ids)) != len(ids):
        raise ValueError(f"label_word_ids must be at least 2 distinct token ids, one per class; got {ids}.")
    return ids


def _split_labels(label_ids: Any) -> tuple[Any, Any]:
    """(MLM labels (batch, seq) or None, class labels (batch,) or None) out of what the Trainer passes."""
    candidates = label_ids if isinstance(label_ids, (tuple, list)) else (label_ids,)
    mlm_labels = class_labels = None
    for candidate in candidates:
        if candidate is None:
            continue
        if candidate.ndim == 2 and mlm_labels is None:
            mlm_labels = candidate
        elif candidate.ndim == 1 and class_labels is None:
            class_labels = candidate
    return mlm_labels, class_labels


def mask_positions_from_labels(mlm_labels: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Per row, the one position whose MLM label is not -100 (the collator labels only the mask)."""
    labelled = mlm_labels != IGNORE_INDEX
    counts = labelled.sum(-1)
    counts = counts.cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    bad_rows = np.flatnonzero(counts != 1)
    if bad_rows.size:
        rows = [int(r) for r in bad_rows[:5]]
        raise ValueError(
            f"MLM labels must mark exactly one position per row (the mask); rows {rows} mark "
            f"{[int(counts[r]) for r in rows]} positions. Were they built by VerbalizerDataCollator?"
        )
    return (labelled * 1).argmax(-1)  # first (only) labelled position; `* 1` because bool has no argmax


def class_indices(label_ids: Any, label_word_ids: Sequence[int]) -> np.ndarray:
    """Gold class index per row, from class labels if present, else from the label word at the mask."""
    mlm_labels, class_labels = _split_labels(label_ids)
    if class_labels is not None:
        return np.asarray(class_labels, dtype=np.int64)
    if mlm_labels is None:
        raise ValueError("no labels to score against: expected MLM labels (batch, seq) or class labels (batch,).")
    mlm_labels = np.asarray(mlm_labels)
    words = mlm_labels[np.arange(len(mlm_labels)), mask_positions_from_labels(mlm_labels)]
    lookup = {token_id: i for i, token_id in enumerate(label_word_ids)}
    unknown = sorted({int(w) for w in words if int(w) not in lookup})
    if unknown:
        raise ValueError(f"MLM labels hold token ids {unknown}, which are not label words {list(label_word_ids)}.")
    return np.array([lookup[int(w)] for w in words], dtype=np.int64)


def label_word_logits(logits: Any, labels: Any, label_word_ids: Sequence[int]) -> Any:
    """(batch, classes) logits: full-vocab logits at the mask restricted to the label words; class logits as is.

    Works on torch tensors (in `preprocess_logits_for_metrics`) and numpy arrays (in `compute_metrics`).
    """
    if isinstance(logits, (tuple, list)):  # models returning extra outputs: logits come first
        logits = logits[0]
    if logits.ndim == 2:
        if logits.shape[-1] != len(label_word_ids):
            raise ValueError(
                f"class logits have {logits.shape[-1]} columns but there are {len(label_word_ids)} label words."
            )
        return logits
    if logits.ndim != 3:
        raise ValueError(
            f"expected logits of shape (batch, classes) or (batch, seq, vocab), got {tuple(logits.shape)}."
        )
    mlm_labels, _ = _split_labels(labels)
    if mlm_labels is None:
        raise ValueError(
            "full-vocabulary logits need the MLM labels (batch, seq) to find the mask position; the Trainer passes "
            "them when the collator returns `labels`."
        )
    positions = mask_positions_from_labels(mlm_labels)
    if isinstance(logits, torch.Tensor):
        rows = torch.arange(logits.shape[0], device=logits.device)
        ids = torch.tensor(label_word_ids, device=logits.device)
        return logits[rows, positions.to(logits.device)][:, ids]
    return np.asarray(logits)[np.arange(len(logits)), positions][:, label_word_ids]


def build_compute_metrics(
    label_word_ids: Sequence[int] | Any, metric: Any | None = None
) -> tuple[Callable[[EvalPrediction], dict[str, float]], Callable[[Any, Any], Any]]:
    """``(compute_metrics, preprocess_logits_for_metrics)`` for the Trainer, for either model kind.

    Args:
        label_word_ids: one token id per class, in class order, or a `Verbalizer`.
        metric: an `evaluate` module taking ``predictions`` and ``references`` class indices;
            default: the local SST-2 metric (accuracy and F1 for 2 classes; accuracy and macro_f1 for more).

    Usage::

        compute_metrics, preprocess = build_compute_metrics(verbalizer)
        Trainer(..., compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess)

    Prediction = the class whose label word has the highest logit at the mask (argmax over the label
    words only, i.e. the argmax of the renormalized label-word distribution).
    """
    ids = _label_word_ids(label_word_ids)
    # The local metric is told the class count: binary F1 for 2 classes, macro-F1 for more (not class 1's F1).
    extra = {"num_classes": len(ids)} if metric is None else {}
    metric = load_sst2_metric() if metric is None else metric

    def preprocess_logits_for_metrics(logits: Any, labels: Any) -> torch.Tensor:
        return label_word_logits(logits, labels, ids)

    def compute_metrics(eval_pred: EvalPrediction) -> dict[str, float]:
        logits = label_word_logits(eval_pred.predictions, eval_pred.label_ids, ids)
        predictions = np.asarray(logits).argmax(-1)
        references = class_indices(eval_pred.label_ids, ids)
        return metric.compute(predictions=predictions, references=references, **extra)

    return compute_metrics, preprocess_logits_for_metrics
