"""Module-scoped perturbation: each module sees θ ± εz for its own parameters only while it runs.

Why not perturb in place (θ += εz; θ −= 2εz; θ += εz) like the reference implementation? Because
floating-point addition is not invertible: fl(fl(θ + εz) − εz) ≠ θ for a few percent of elements,
so every step leaves ~1-ulp noise behind (the reference's drift), and a step with lr = 0 does not
leave the model unchanged. Exact in-place restore would need a copy of θ.

Here the parameters are never written during the two forward passes. A forward pre-hook on each
module that owns trainable parameters swaps `param.data` for a freshly computed θ + s·z (drawn from
the seeded stream into a new tensor), and a forward hook swaps the original storage back. The
original tensor is untouched, so the restore is bit-exact, and the extra memory is one module's
parameters at a time (the z buffer that is needed anyway), not a copy of the model. Large
`nn.Linear`/`nn.Embedding` weights (the tied vocabulary matrix) are not even swapped whole: their
modules compute with the perturbation streamed block by block (`streamed`), bit-identically.

Parameters shared by several modules (tied embeddings / LM decoder) are perturbed by each module
that runs with them; the same seed gives the same z, and a module nested in another that already
perturbed a shared parameter leaves it alone. Parameters held by a container that has no `forward`
(`nn.ParameterDict`/`ParameterList`, e.g. peft's LoRA on embeddings, `lora_embedding_A`) are
perturbed by the nearest enclosing module that does run. A parameter that the forward reads outside
its owner's `forward` is not perturbed; `transformers` models and peft adapters (LoRA, prefix and
prompt tuning) read theirs inside, and a forward that leaves a trainable parameter untouched warns
once, since MeZO would then update it along z with a projected gradient that does not involve it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .optimizer import ZerothOrderSGD
from .streamed import streamed_forward, streams


def _runs_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # containers (ParameterDict, ModuleList, ...) never run


def _owned_trainable(model: nn.Module, trainable: set[int]) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module whose forward hooks perturb them, its trainable parameters), in `model.modules()` order."""
    owners: dict[int, tuple[nn.Module, list[nn.Parameter]]] = {}
    ancestors: dict[int, nn.Module] = {}  # id(module) -> nearest module at or above it that runs forward
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in ancestors:
            parent = ancestors.get(id(model.get_submodule(name.rpartition(".")[0]))) if name else None
            ancestors[id(module)] = module if _runs_forward(module) or parent is None else parent
        params = [p for p in module._parameters.values() if p is not None and id(p) in trainable]
        if params:
            owner = ancestors[id(module)]
            held = owners.setdefault(id(owner), (owner, []))[1]
            held.extend(p for p in params if all(p is not q for q in held))
    return list(owners.values())


@contextlib.contextmanager
def perturbed_forward(model: nn.Module, optimizer: ZerothOrderSGD, direction: int, scale: float) -> Iterator[set[int]]:
    """Within the block, forwards of `model` see θ + scale·z_direction for the optimizer's parameters.

    Yields the set of ids of parameters that have been perturbed at least once (for coverage checks).
    """
    trainable = {id(p) for _, p, _ in optimizer.named_trainable_parameters()}
    active: dict[int, torch.Tensor] = {}  # id(param) -> original storage, while perturbed
    touched: set[int] = set()
    handles = []

    def pre_hook(params: list[nn.Parameter]):
        def hook(module, args):
            mine = []
            for p in params:
                if id(p) in active:  # an enclosing module already perturbed this shared parameter
                    continue
                perturbed = optimizer.perturbed(p, direction, scale)
                active[id(p)] = p.data
                p.data = perturbed
                touched.add(id(p))
                mine.append(p)
            module._zo_restore = mine

        return hook

    def post_hook(module, args, output):
        for p in module.__dict__.pop("_zo_restore", ()):
            p.data = active.pop(id(p))

    streamed: list[nn.Module] = []

    def stream(module: nn.Module, weight: nn.Parameter) -> None:
        perturbed_call = streamed_forward(module, optimizer, direction, scale, lambda: touched.add(id(weight)))
        plain_call = type(module).forward.__get__(module)

        def forward(*args, **kwargs):
            # A shared weight that an enclosing module already swapped is perturbed as it is.
            return (plain_call if id(weight) in active else perturbed_call)(*args, **kwargs)

        module.forward = forward
        streamed.append(module)

    for module, params in _owned_trainable(model, trainable):
        swapped = [p for p in params if not streams(module, p)]
        if len(swapped) < len(params):
            stream(module, module.weight)
        if swapped:
            handles.append(module.register_forward_pre_hook(pre_hook(swapped)))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
    try:
        with torch.no_grad():
            yield touched
        if touched and len(touched) < len(trainable):
            untouched = [n for n, p, _ in optimizer.named_trainable_parameters() if id(p) not in touched]
            warnings.warn(
                f"MeZO: {len(untouched)} trainable parameter(s) were not perturbed by this forward, e.g. "
                f"{untouched[:3]}: the model did not use them, or read them outside their module's forward. MeZO "
                "would move them along z with a projected gradient that does not depend on them (a random walk). "
                "Freeze them (requires_grad=False), or make their owning module call them.",
                RuntimeWarning,
                stacklevel=3,
            )
    finally:
        for handle in handles:
            handle.remove()
        for module in streamed:
            del module.forward
        # Anything still swapped (a forward that raised inside a module) goes back to its original storage.
        for _, p, _ in optimizer.named_trainable_parameters():
            if id(p) in active:
                p.data = active.pop(id(p))
