"""Module swap: each module sees θ ± εz for its own parameters only while it runs.

Why not perturb in place (θ += εz; θ −= 2εz; θ += εz) like the reference implementation? Because
floating-point addition is not invertible: fl(fl(θ + εz) − εz) ≠ θ for a few percent of elements,
so every step leaves ~1-ulp noise behind, and a step with lr = 0 does not leave the model unchanged.

Here a forward pre-hook on each owning module swaps `param.data` for a freshly computed θ + s·z and a
forward hook (`always_call`, so also when the forward raises) swaps the original storage back. The
extra memory is one module's parameters at a time. The hooks are ordinary `nn.Module` hooks, so they
run outside an Accelerate hook's `forward` wrapper (`device_map`, offload), which stays in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .state import PassState


@contextlib.contextmanager
def swapping(owners: list[tuple[nn.Module, list[nn.Parameter]]], state: PassState) -> Iterator[None]:
    stacks: dict[int, list[list[nn.Parameter]]] = {}  # id(module) -> what each (possibly re-entrant) run swapped

    def pre_hook(params: list[nn.Parameter]):
        def hook(module, args):
            state.module_runs[id(module)] += 1
            stacks.setdefault(id(module), []).append([p for p in params if state.hold(p)])

        return hook

    def post_hook(module, args, output):
        stack = stacks.get(id(module))
        if stack:
            for p in stack.pop():
                state.release(p)

    handles = []
    try:
        for module, params in owners:
            handles.append(module.register_forward_pre_hook(pre_hook(params)))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
