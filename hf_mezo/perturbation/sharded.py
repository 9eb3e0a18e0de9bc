"""Sharded: FSDP2 (`fully_shard`) parameters, perturbed after the all-gather with the full z.

During a forward FSDP2 replaces each sharded parameter in its module by the all-gathered full
tensor. A pre-hook on the owning module (appended, so it runs after FSDP2's all-gather) swaps that
tensor's storage for θ + s·z, with z of the *full* parameter (every element gets the z of its
position, whatever the sharding), and a post-hook (prepended, so it runs before FSDP2 reshards) swaps
the gathered values back; the shards are only read. The FSDP2 modules are resharded on entry and
exit: the root keeps its parameters gathered between forwards, and after an update those copies
would be stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..optimizer import add_scaled
from ..shards import is_sharded
from .state import PassState, PerturbationError


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def sharded(model: nn.Module, trainable: list[nn.Parameter], state: PassState) -> Iterator[None]:
    optimizer, direction, scale = state.optimizer, state.direction, state.scale
    ids = {id(p) for p in trainable}
    owners: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in ids:
                owners.setdefault(module, []).append((key, param))
    active: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(gathered) -> (gathered, its own values)

    def pre_hook(entries: list[tuple[str, torch.Tensor]]):
        def hook(module, args):
            mine = []
            for key, shard in entries:
                gathered = module._parameters[key]
                if id(gathered) in active:  # an enclosing module already perturbed this shared parameter
                    continue
                if is_sharded(gathered):
                    raise PerturbationError(
                        f"parameter {optimizer.param_names[id(shard)]!r} is still a sharded DTensor inside its "
                        "module's forward: MeZO perturbs FSDP2 (fully_shard) models only, not tensor parallel ones."
                    )
                z = optimizer.direction(shard, direction).view_as(gathered).to(gathered.device)
                active[id(gathered)] = (gathered, gathered.data)
                gathered.data = add_scaled(gathered, z, scale)
                state.touched.add(id(shard))
                mine.append(gathered)
            module._zo_sharded_restore = mine

        return hook

    def post_hook(module, args, output):
        for gathered in module.__dict__.pop("_zo_sharded_restore", ()):
            gathered.data = active.pop(id(gathered))[1]

    fsdp_modules = _fsdp_modules(model)
    handles = []
    try:
        for module, entries in owners.items():
            handles.append(module.register_forward_pre_hook(pre_hook(entries)))
            handles.append(module.register_forward_hook(post_hook, prepend=True, always_call=True))
        for module in fsdp_modules:
            module.reshard()
        yield
    finally:
        for handle in handles:
            handle.remove()
        for gathered, values in active.values():
            gathered.data = values
        for module in fsdp_modules:
            module.reshard()


@contextlib.contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """An unperturbed pass of an FSDP2 model: resharded on entry and exit like a perturbed one, so that the root's
    gathered copies from before the last update are not reused (one-sided estimators' θ pass)."""
    fsdp_modules = _fsdp_modules(model)
    for module in fsdp_modules:
        module.reshard()
    try:
        yield
    finally:
        for module in fsdp_modules:
            module.reshard()
