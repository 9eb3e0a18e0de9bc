"""The read monitor: on a plan's first pass, where does the forward read each trainable parameter?

Module-scoped perturbation is exact only if every read of a parameter happens while its owner runs.
Whether a model keeps to that cannot be seen from its module tree: `DebertaV2ForMaskedLM` with
`legacy=False` computes its logits as `matmul(h, word_embeddings.weight.t())` inside the head, and a
custom tied head may call `F.linear(h, embeddings.weight)`. So the first pass runs under a
`TorchFunctionMode` that sees every torch function and tensor method with its arguments:

- a trainable parameter passed to an op while it is not perturbed (its owner is not running and it
  is not held) is a read *outside its owner*: it is perturbed on the spot and held for the rest of
  the pass, so this first pass is already exact, and the plan moves it to whole-forward;
- a trainable parameter written in place by the forward (`param.add_`, `out=param`) cannot be held
  at θ ± εz: `PerturbationError`, before the loss is used;
- metadata queries (`.shape`, `.dtype`, `.size()`, ...) are not reads.

How often each owner runs is counted by the module swap's hooks; owners run more than once move to
whole-forward as well. Later passes run without the monitor (it costs Python work on every op).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .state import PassState, PerturbationError

_METADATA_PROPERTIES = frozenset(
    {"dtype", "shape", "device", "requires_grad", "is_cuda", "is_leaf", "ndim", "layout", "grad_fn", "is_sparse"}
    | {"is_quantized", "is_meta", "names", "itemsize", "nbytes", "grad", "_base", "is_nested", "is_cpu"}
)
_METADATA_METHODS = frozenset(
    {"size", "dim", "numel", "stride", "data_ptr", "element_size", "is_contiguous", "get_device", "nelement"}
    | {"is_floating_point", "is_complex", "storage_offset", "__len__", "untyped_storage", "is_pinned", "_is_view"}
    | {"__hash__", "__eq__", "__repr__", "__format__", "requires_grad_", "retain_grad", "register_hook"}
)


def _is_metadata(func) -> bool:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        return getattr(getattr(func, "__self__", None), "__name__", "") in _METADATA_PROPERTIES
    return name in _METADATA_METHODS


def _writes_first_argument(func, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in ("__setitem__", "__iadd__", "__isub__")


class ReadMonitor(TorchFunctionMode):
    """Records outside reads (`outside`) and reads at all (`read`) of the given trainable parameters."""

    def __init__(self, state: PassState, trainable: list[nn.Parameter], names: dict[int, str]):
        super().__init__()
        self.state = state
        self.trainable = {id(p): p for p in trainable}
        self.names = names
        self.outside: set[int] = set()
        self.read: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.state.internal and not _is_metadata(func):
            self._check(func, args, kwargs)
        return func(*args, **kwargs)

    def _check(self, func, args, kwargs) -> None:
        written = [kwargs.get("out")]
        if args and _writes_first_argument(func, kwargs):
            written.append(args[0])
        for tensor in tree_leaves(written):
            if isinstance(tensor, torch.Tensor) and self.trainable.get(id(tensor)) is tensor:
                raise PerturbationError(
                    f"the forward writes trainable parameter {self.names[id(tensor)]!r} in place "
                    f"({getattr(func, '__name__', func)}): MeZO cannot keep it at θ ± εz for the pass, and the "
                    "write would be undone by the restore. Freeze it (requires_grad=False), or compute the "
                    "modified value into a new tensor instead of writing the parameter."
                )
        for tensor in tree_leaves((args, kwargs)):
            if not isinstance(tensor, torch.Tensor) or self.trainable.get(id(tensor)) is not tensor:
                continue
            key = id(tensor)
            self.read.add(key)
            if key not in self.state.active and key not in self.state.streaming:
                self.outside.add(key)
                self.state.hold(tensor)  # perturbed from here to the end of the pass (whole-forward)
