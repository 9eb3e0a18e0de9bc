"""What one perturbed pass holds: the original storage of every parameter currently at θ + s·z.

All strategies (module swap, streamed, whole-forward, the read monitor) share one `PassState`, so a
parameter is perturbed by whoever reaches it first and left alone by the others: a module nested in
one that already swapped a shared parameter, a streamed matrix that is already held whole, a module
swap of a parameter the read monitor moved to whole-forward. θ itself is never written: `hold` swaps
`param.data` for a freshly computed θ + s·z and `release` swaps the original tensor back, so the
restore is bit-exact.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn


class PerturbationError(ValueError):
    """A trainable parameter cannot be seen at exactly θ ± εz by the whole forward: g would be wrong.

    A `ValueError`: it is raised for a model or setup MeZO cannot train as given, with the fix named.
    """


class PassState:
    def __init__(self, optimizer, direction: int, scale: float):
        self.optimizer, self.direction, self.scale = optimizer, direction, scale
        self.active: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}  # id(param) -> (param, original storage)
        self.touched: set[int] = set()  # ids of parameters perturbed at least once in this pass
        self.streaming: set[int] = set()  # ids of streamed weights whose module is computing now
        self.module_runs: Counter[int] = Counter()  # id(owner module) -> forwards in this pass
        self._internal = 0

    @property
    def internal(self) -> bool:
        """True while the perturbation's own code reads parameters (the read monitor ignores those reads)."""
        return self._internal > 0

    @contextlib.contextmanager
    def internal_reads(self) -> Iterator[None]:
        self._internal += 1
        try:
            yield
        finally:
            self._internal -= 1

    def hold(self, param: nn.Parameter) -> bool:
        """Swap in θ + s·z for `param` unless it is already perturbed; whether this call swapped it."""
        if id(param) in self.active:
            return False
        with self.internal_reads(), torch.no_grad():
            perturbed = self.optimizer.perturbed(param, self.direction, self.scale)
            self.active[id(param)] = (param, param.data)
            param.data = perturbed
        self.touched.add(id(param))
        return True

    def release(self, param: nn.Parameter) -> None:
        with self.internal_reads():
            param.data = self.active.pop(id(param))[1]

    def release_all(self) -> None:
        for param, _ in list(self.active.values()):
            self.release(param)
