"""Buffers a model's forward writes, detected on the first MeZO step and named once.

MeZO runs both perturbed passes in eval mode, so a BatchNorm's running statistics are never updated
(`refusals.warn_frozen_running_statistics` names those modules up front). A module that writes a buffer in
eval mode anyway — a step counter, a running average of its own — writes it twice per micro-batch, once
at θ + εz and once at θ − εz, where the stock Trainer would write it once at θ in train mode. That is
not MeZO's to fix, but it must not be silent: `BufferWatch` takes a checksum of every buffer before
training and compares after the first optimizer step, and logs one warning naming the buffers that
changed. One read of the buffers, twice per run.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .distributed import parameter_checksums
from .refusals import shown_names

logger = logging.get_logger(__name__)


class BufferWatch:
    """Checksums of a model's floating and integer buffers at the start of training, compared once later."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [name for name, buffer in model.named_buffers() if buffer is not None and buffer.numel()]
        buffers = dict(model.named_buffers())
        self.before = parameter_checksums(buffers[name] for name in self.names)

    def written(self) -> list[str]:
        """Names of the buffers whose bits changed since the watch started."""
        buffers = dict(self.model.named_buffers())
        present = [name for name in self.names if name in buffers]
        after = parameter_checksums(buffers[name] for name in present)
        before = {name: value for name, value in zip(self.names, self.before.tolist())}
        return [name for name, value in zip(present, after.tolist()) if before[name] != value]

    @torch.no_grad()
    def warn_if_written(self) -> list[str]:
        changed = self.written()
        if changed:
            shown = shown_names(changed)
            logger.warning(
                f"The first MeZO step changed the buffer(s) {shown}: the model's forward writes them even in eval "
                "mode, so under MeZO they are written twice per micro-batch (at θ + εz and at θ − εz) instead of once "
                "at θ. If they are statistics of the data, compute them in a separate pass (torch.no_grad, train mode) "
                "instead; if they only count calls, expect twice the count."
            )
        return changed
