"""One perturbation mechanism: within `perturbed(...)`, every forward of the model sees θ + s·z.

MeZO's estimate g = (L₊ − L₋) / 2ε is only right if both passes see exactly θ ± εz for every
trainable parameter, wherever the forward reads it. This package decides per parameter how
(`plan`: module swap, streamed, low-rank transient, whole-forward, sharded), checks the decision on the first pass with
a read monitor (`reads`), and never writes θ: each strategy swaps `param.data` for a new tensor and
back, so the restore is bit-exact. It sits above the optimizer, which only draws z and applies
updates, and imports nothing of the process-level machinery (`hf_mezo.distributed`).

Refused, with `PerturbationError` before any forward: `nn.DataParallel` (its replicas are copied
before any hook runs, so GPUs ≥ 1 would evaluate θ; use `accelerate launch`), offloaded trainable
parameters (Accelerate's `cpu_offload`/`disk_offload` keep them as `meta` placeholders and load a
new tensor per forward; freeze them or keep them on a device), and a forward that writes a
trainable parameter in place.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from ..shards import is_sharded
from .low_rank import low_rank_forward
from .module_swap import swapping
from .plan import Plan, plan_for
from .reads import ReadMonitor
from .sharded import resharded, sharded
from .state import PassState, PerturbationError
from .streamed import streaming
from .whole_forward import held

__all__ = ["PerturbationError", "check_perturbable", "perturbed", "perturbed_forward", "unperturbed"]


def check_perturbable(model: nn.Module, named_trainable: list[tuple[str, nn.Parameter]]) -> None:
    """Raise `PerturbationError` (a `ValueError`) if MeZO cannot give these parameters θ ± εz in `model`'s forward.

    Called by `MeZOTrainer` before any work, and by `perturbed` on every pass.
    """
    if isinstance(model, nn.DataParallel):
        raise PerturbationError(
            "MeZO cannot perturb a model under torch.nn.DataParallel: it copies the parameters to the other GPUs "
            "before any hook runs, so those replicas would evaluate θ instead of θ ± εz. Launch one process per GPU "
            "with `accelerate launch` (or torchrun): processes then exchange n scalars a step."
        )
    offloaded = [name for name, p in named_trainable if p.is_meta]
    if offloaded:
        raise PerturbationError(
            f"trainable parameter(s) {offloaded[:3]} are offloaded (meta placeholders, e.g. Accelerate's cpu_offload/"
            "disk_offload or a device_map with 'cpu'/'disk' offload): MeZO would perturb and update a placeholder "
            "while each forward loads the stored weights. Keep trainable parameters on an execution device "
            "(device_map without offload for them), or freeze them (requires_grad=False)."
        )


@contextlib.contextmanager
def perturbed(model: nn.Module, optimizer, direction: int, scale: float) -> Iterator[set[int]]:
    """Within the block, forwards of `model` see θ + scale·z_direction for the optimizer's trainable parameters.

    Yields the set of ids of parameters perturbed at least once so far (grows as the forward runs).
    """
    names = {}
    trainable = []
    for name, param, _ in optimizer.named_trainable_parameters():
        names[id(param)] = name
        trainable.append(param)
    state = PassState(optimizer, direction, scale)
    if any(is_sharded(p) for p in trainable):
        with torch.no_grad(), sharded(model, trainable, state):
            yield state.touched
        return
    check_perturbable(model, [(names[id(p)], p) for p in trainable])
    plan = plan_for(model, trainable, optimizer)
    monitor = None if plan.learned else ReadMonitor(state, trainable, names)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(held(plan.whole, state))
            stack.enter_context(streaming(plan.streamed, state))
            stack.enter_context(streaming(plan.transient, state, build=low_rank_forward))
            stack.enter_context(swapping(plan.swapped, state))
            if monitor is not None:
                stack.enter_context(monitor)
            yield state.touched
    finally:
        state.release_all()  # anything still held (the monitor's holds, a forward that raised) goes back
    if monitor is not None and state.touched:
        plan.learn(monitor.outside, state.module_runs, names)
        _warn_unread(plan, trainable, names, monitor.read | state.touched)


@contextlib.contextmanager
def unperturbed(model: nn.Module, optimizer) -> Iterator[None]:
    """Within the block, forwards of `model` see θ itself (the unperturbed pass of one-sided estimators), under
    no_grad; an FSDP2-sharded model is resharded around it as around a perturbed pass."""
    with torch.no_grad():
        if any(is_sharded(p) for _, p, _ in optimizer.named_trainable_parameters()):
            with resharded(model):
                yield
        else:
            yield


def _warn_unread(plan: Plan, trainable: list[nn.Parameter], names: dict[int, str], read: set[int]) -> None:
    unread = [names[id(p)] for p in trainable if id(p) not in read]
    if unread:
        warnings.warn(
            f"MeZO: {len(unread)} trainable parameter(s) were not perturbed by this forward, e.g. {unread[:3]}: "
            "the model did not read them. MeZO would move them along z with a projected gradient that does not "
            "depend on them (a random walk). Freeze them (requires_grad=False).",
            RuntimeWarning,
            stacklevel=4,
        )


# The name this context had before the perturbation package; kept for existing callers.
perturbed_forward = perturbed
