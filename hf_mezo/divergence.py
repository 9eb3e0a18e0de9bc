"""Non-finite training stops, naming the last good step; nothing non-finite is logged as a number or saved.

A MeZO step whose perturbed losses are non-finite is skipped (`ZerothOrderSGD.step`): one overflow at
θ + εz in low precision should not end a run. But a run of them, or weights that are themselves
non-finite, can only produce more of the same: the stock loop would go on skipping every step, log
the loss through its `logging_nan_inf_filter` (0 right after a log), write the broken weights into
every later checkpoint and still report evaluation metrics. `NonFiniteGuard` turns that into one
`NonFiniteTrainingError` that names the step, the parameter or the run, and the last good step to
resume from; the trainer consults it after every optimizer step and before every save and evaluation.

The last good step is the last one whose weights are known finite: checked (a save, an evaluation, a
skipped step), or implied by the next step's finite losses (a finite L(θ ± εz) needs a finite θ).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .shards import is_sharded

# Consecutive skipped (non-finite) steps after which training stops: a transient overflow skips one or
# two; three in a row is divergence or a loss that is non-finite at these weights.
MAX_NON_FINITE_STEPS = 3

_CHECK_BLOCK = 1 << 24  # elements checked at a time: no bool temporary the size of a vocabulary matrix


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite weights or a run of non-finite losses; nothing non-finite was saved."""


@torch.no_grad()
def first_non_finite(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or ±inf (this process's shard), or None."""
    for name, tensor in named_tensors:
        local = tensor.detach()
        if is_sharded(local):
            local = local.to_local()
        if not local.is_floating_point() or local.device.type == "meta":
            continue
        flat = local.reshape(-1)
        for start in range(0, flat.numel(), _CHECK_BLOCK):
            if not torch.isfinite(flat[start : start + _CHECK_BLOCK]).all():
                return name
    return None


class NonFiniteGuard:
    """Per-run bookkeeping: the last good step, the current run of skipped steps, a skipped step not yet logged."""

    def __init__(self) -> None:
        self.last_good_step: int | None = None
        self.skipped_run: list[int] = []
        self.unlogged_skip = False

    def _resume_point(self, step: int) -> int:
        return self.last_good_step if self.last_good_step is not None else max(step - 1, 0)

    def verified(self, step: int) -> None:
        """The weights after `step` were checked finite."""
        self.last_good_step = max(step, self.last_good_step or 0)

    def weights_error(self, step: int, name: str, where: str) -> NonFiniteTrainingError:
        return NonFiniteTrainingError(
            f"MeZO stopped at step {step} before {where}: parameter {name!r} holds non-finite values (NaN or inf). "
            f"Last good step: {self._resume_point(step)}. Nothing non-finite was written; resume from a checkpoint "
            "at or before that step with a lower learning_rate (or zo_eps), or check what wrote to the weights."
        )

    def after_step(self, step: int, losses_finite: bool, non_finite_parameter) -> None:
        """Account for optimizer step `step` (global step after it); raise `NonFiniteTrainingError` to stop.

        `non_finite_parameter()` names a parameter holding a non-finite value, or returns None; it is called
        only when the step's losses were non-finite (a read of every weight).
        """
        if losses_finite:
            self.verified(step - 1)  # the passes of `step` evaluated finite losses around finite weights
            self.skipped_run = []
            return
        self.unlogged_skip = True
        name = non_finite_parameter()
        if name is not None:
            raise self.weights_error(step, name, "its next step")
        self.verified(step)  # the skipped update left finite weights unchanged
        self.skipped_run.append(step)
        if len(self.skipped_run) >= MAX_NON_FINITE_STEPS:
            first_good = self.skipped_run[0] - 1
            raise NonFiniteTrainingError(
                f"MeZO stopped at step {step}: the perturbed losses were non-finite in {len(self.skipped_run)} "
                f"consecutive steps ({self.skipped_run[0]}–{step}) while the weights are finite, so each update was "
                f"skipped. Last good step: {first_good} (the last with finite losses). The loss itself is non-finite "
                "at these weights: check the loss or objective on these batches (an overflow in float16/bfloat16: "
                "keep zo_float32_logits, or lower zo_eps)."
            )
