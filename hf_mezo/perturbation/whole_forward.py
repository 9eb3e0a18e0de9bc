"""Whole-forward: a parameter held at θ ± εz from the start of the forward to its end.

The module swap perturbs a parameter only while its owner runs, which is right exactly when every
read of the parameter happens inside that owner's `forward`. Three cases need more:

- a parameter read outside its owner (a functional tied head, `F.linear(h, embeddings.weight)`, as
  `DebertaV2ForMaskedLM(legacy=False)` does): the owner's swap would leave that read at θ;
- an owner whose forward runs several times per pass (ALBERT's one shared layer, run once per depth):
  the swap is exact but redraws z at every run;
- a compiled model (`torch_compile=True`, `model.compile()`): Dynamo would trace into the hooks. Held
  before the compiled call, the parameters are plain inputs of the graph and the perturbation stays
  outside it.

Holding costs one extra copy of the tensor for the duration of the forward, and since `param.data`
is swapped (never written) the restore is bit-exact, as for the module swap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .state import PassState


@contextlib.contextmanager
def held(params: list[nn.Parameter], state: PassState) -> Iterator[None]:
    mine = [p for p in params if state.hold(p)]
    try:
        yield
    finally:
        for p in mine:
            if id(p) in state.active:
                state.release(p)
