"""`eval_mode(model)`: every module's `training` flag off for a block (dropout off), without a mode switch's side work.

MeZO's passes must all compute the same function of θ, so they run with dropout off — every step, twice around the
passes. `model.eval()` / `model.train()` would do that, but on a `transformers` model each call is more than a flag:
`PreTrainedModel.train()` moves the hub-kernels mode between inference and training, and re-kernelizes the model on
every change (with `kernels` installed: a visible share of a MeZO step on a one-layer forward).
The passes need only the flags. The kernel mode stays the one training set, whose kernels compute the same forward
(no pass here runs a backward).

On exit the flags are put back; if any module was not in training mode at entry, `model.train()` then runs as the
stock `Trainer.training_step` would have (it calls it at the start of every step), kernel mode included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every module of `model` in eval mode; leave it in training mode afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        if not all(training for _, training in modes):
            model.train()
