"""The training set's labels checked against the model before the first step.

A label the model cannot score (class 5 of a 2-class head, a token id past the vocabulary, a label the
verbalizer has no word for) otherwise raises only in the batch that holds it: at step 2, or step 2,000,
after the weights have moved. `check_training_labels` reads the label column once, through Arrow
(no Python loop over the rows), and raises a `ValueError` naming the first bad row, its value and the
allowed range.

What is allowed comes from what consumes the labels: a collator with a verbalizer (`VerbalizerDataCollator`)
maps the raw labels to classes; a label-word head scores `len(label_word_ids)` classes (class indices) or the
label words themselves (MLM labels); a `...ForSequenceClassification`/`...ForTokenClassification` head
`config.num_labels` classes; a language model its vocabulary. -100 is "no target" everywhere. Datasets that
are not a `datasets.Dataset` (streaming, torch datasets) are not checked.
"""

from __future__ import annotations

from typing import Any

from torch import nn

IGNORE_INDEX = -100
LABEL_COLUMNS = ("labels", "label", "label_ids")


def _arrow_column(dataset: Any, column: str):
    """The column as one pyarrow array (in the dataset's current order), or None if not an Arrow-backed dataset."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        return None
    if not isinstance(dataset, Dataset) or column not in dataset.column_names:
        return None
    values = dataset.with_format("arrow")[column]
    return values.combine_chunks() if hasattr(values, "combine_chunks") else values


def _first_bad_row(values, allowed) -> tuple[int, Any] | None:
    """(row, value) of the first label outside `allowed` (a range (lo, hi) or a set of ids), -100 always allowed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = None
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        rows = pc.list_parent_indices(values)
        values = pc.list_flatten(values)
    if not pa.types.is_integer(values.type):
        return None
    if isinstance(allowed, tuple):
        low, high = allowed
        bad = pc.or_(pc.less(values, low), pc.greater_equal(values, high))
    else:
        bad = pc.invert(pc.is_in(values, value_set=pa.array(sorted(allowed), type=values.type)))
    bad = pc.and_(bad, pc.not_equal(values, IGNORE_INDEX))
    bad = pc.fill_null(bad, False)
    if not pc.any(bad).as_py():
        return None
    index = pc.index(bad, True).as_py()
    row = index if rows is None else rows[index].as_py()
    return row, values[index].as_py()


def _model_of(model: nn.Module) -> nn.Module:
    base = getattr(model, "get_base_model", None)  # a peft model: the checks are about the base model's head
    return base() if callable(base) else model


def _vocab_size(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _allowed_labels(model: nn.Module, token_level: bool) -> tuple[Any, str] | None:
    """(a range (lo, hi) or a set of ids, what it is) for the labels `model` scores, or None if unknown."""
    model = _model_of(model)
    config = getattr(model, "config", None)
    name = type(model).__name__
    label_word_ids = getattr(model, "label_word_ids", None)
    if label_word_ids is not None:
        if token_level:
            return set(int(i) for i in label_word_ids), f"the label words {list(label_word_ids)} (MLM labels)"
        return (0, len(label_word_ids)), f"class indices [0, {len(label_word_ids)}) of the label-word head"
    num_labels = getattr(config, "num_labels", None)
    problem = getattr(config, "problem_type", None)
    if "ForTokenClassification" in name or ("ForSequenceClassification" in name and not token_level):
        if num_labels and num_labels > 1 and problem in (None, "single_label_classification"):
            return (0, num_labels), f"class indices [0, {num_labels}) (config.num_labels)"
        return None
    if token_level:
        vocab = _vocab_size(model)
        if vocab:
            return (0, vocab), f"token ids [0, {vocab}) (the vocabulary)"
    return None


def check_training_labels(dataset: Any, model: nn.Module | None, data_collator: Any = None) -> None:
    """Raise a `ValueError` naming the first row whose label the model (or the collator) cannot use."""
    verbalizer = getattr(data_collator, "verbalizer", None)
    columns = getattr(data_collator, "columns", None)
    if verbalizer is not None and isinstance(columns, dict) and "label" in columns:
        values = _arrow_column(dataset, columns["label"])
        if values is None:
            return
        for value in values.unique().to_pylist():
            try:
                verbalizer.class_index(value)
            except ValueError as error:
                raise ValueError(
                    f"Training column {columns['label']!r} (checked before the first step): {error}"
                ) from None
        return
    if model is None:
        return
    for column in LABEL_COLUMNS:
        values = _arrow_column(dataset, column)
        if values is None:
            continue
        import pyarrow as pa

        token_level = pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
        allowed = _allowed_labels(model, token_level)
        if allowed is None:
            return
        bad = _first_bad_row(values, allowed[0])
        if bad is not None:
            row, value = bad
            raise ValueError(
                f"Training row {row} has label {value} in column {column!r}, but {type(_model_of(model)).__name__} "
                f"takes {allowed[1]}, or -100 for no target. Fix or drop such rows (checked before the first step, "
                "so that no weight moves on a dataset that would fail mid-run)."
            )
        return
