"""Fill a prompt model's depth cache before training, with a progress bar.

With `zo_train_top_layers`, the prompt LMs (`hf_mezo.models`) cache the frozen bottom layers' output per
example (`depth_cache`). Filled lazily, the first epoch pays for every example's bottom layers: on a
real model that is minutes without a word, and the Trainer's time estimate, taken from the first
steps, is wrong by the ratio of the two speeds. `fill_depth_cache` runs the training set through the
model once beforehand — eval mode, no gradients, in order (no sampler, so no random state is used) —
with a `tqdm` bar that follows transformers' progress-bar setting and `disable_tqdm`.
"""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader
from transformers.utils import logging

logger = logging.get_logger(__name__)


def depth_cache_of(model: torch.nn.Module):
    """The model's `DepthCache` (through a peft wrapper), or None."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base, "depth_cache", None)


@torch.no_grad()
def fill_depth_cache(trainer, dataset=None, desc: str = "Caching the frozen layers") -> int:
    """Forward `dataset` (default: the trainer's training set) once so the model's depth cache holds it.

    Returns the number of examples forwarded (0 when the model has no enabled depth cache, nothing frozen, or
    `max_steps` ends training before it has seen every example, where a lazy fill costs less). Batches are
    the trainer's collator over `per_device_train_batch_size` rows; autocast is the trainer's, so the
    cache keys match those of the training forwards.
    """
    model, cache = trainer.model, depth_cache_of(trainer.model)
    if cache is None or not cache.enabled or all(p.requires_grad for p in model.parameters()):
        return 0  # no cache, or nothing frozen to cache
    dataset = trainer.train_dataset if dataset is None else dataset
    args = trainer.args
    rows_trained = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if 0 < rows_trained * args.world_size < len(dataset):
        return 0  # training will not see every example: filling the whole set would cost more than it saves
    if trainer.args.remove_unused_columns and isinstance(dataset, datasets.Dataset):  # as the Trainer's loader
        dataset = trainer._remove_unused_columns(dataset, description="training")
    loader = DataLoader(dataset, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator)
    was_training = model.training
    model.eval()
    try:
        bar = logging.tqdm(loader, desc=desc, unit="batch", disable=trainer.args.disable_tqdm)
        for batch in bar:
            with trainer.accelerator.autocast():
                model(**trainer._prepare_inputs(batch))
    finally:
        model.train(was_training)
    logger.info(f"depth cache: {len(cache)} examples, {cache.bytes_per_example():.0f} bytes each")
    return len(dataset)
