"""Metrics for prompt-based SST-2: the local `evaluate` module and the Trainer's `compute_metrics`."""

from .label_words import (
    SST2_METRIC_PATH,
    build_compute_metrics,
    class_indices,
    label_word_logits,
    load_sst2_metric,
    mask_positions_from_labels,
)

__all__ = [
    "SST2_METRIC_PATH",
    "build_compute_metrics",
    "class_indices",
    "label_word_logits",
    "load_sst2_metric",
    "mask_positions_from_labels",
]
