"""Low-rank transient: a factored direction on a Linear/Embedding weight is added to the output, not the weight.

With factored directions (`hf_mezo.methods`: LOZO's s·U·Vᵀ, ZO-Muon's √(m/r)·P·S), the perturbed layer

    y = x·(W + c·s·A·Bᵀ)ᵀ + b = x·Wᵀ + b + c·s·(x·B)·Aᵀ

needs neither a copy of W nor a draw of m·n random numbers: the pass draws the two small factors (cached
for the step) and adds a rank-r term, r·(m + n) multiply-adds per token. Exact in real arithmetic (tests
compare it with the materialised W ± εz in float64); for an `nn.Embedding` the looked-up rows get
c·s·A[ids]·Bᵀ. The bias, if trainable, is swapped by the module swap as usual.

Used for float32/float64 weights only: a bf16/fp16 weight's perturbation is what rounding θ ± εz to its grid
leaves, which the update follows (`optimizer.applied_direction`); those keep the materialised swap.
The installation (instance `forward`, or Accelerate's `_old_forward`) is the streamed strategy's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..directions import draw_dtype
from .state import PassState
from .streamed import accelerate_hooked


def applies(module: nn.Module, param: nn.Parameter, optimizer) -> bool:
    """Whether `param` is `module`'s weight, with factored directions, in a module type computed exactly here."""
    if getattr(module, "weight", None) is not param or not optimizer.factored(param):
        return False
    if draw_dtype(param.dtype) != param.dtype:
        return False
    if "forward" in module.__dict__ and not accelerate_hooked(module):
        return False  # someone else's instance-level forward: computing the layer ourselves would bypass it
    return type(module) is nn.Linear or (type(module) is nn.Embedding and module.max_norm is None)


def low_rank_forward(module: nn.Module, state: PassState) -> Callable[..., torch.Tensor]:
    """A replacement `forward` adding the low-rank perturbation term to the module's stock output."""
    optimizer, direction, scale = state.optimizer, state.direction, state.scale
    weight = module.weight

    def factors() -> tuple[torch.Tensor, torch.Tensor, float]:
        state.touched.add(id(weight))
        with state.internal_reads():
            left, right, s = optimizer.factors(weight, direction)
        return left, right, scale * s

    def linear(x: torch.Tensor) -> torch.Tensor:
        left, right, alpha = factors()
        y = F.linear(x, weight, module.bias)
        if y.dtype != left.dtype or not y.is_contiguous():  # autocast: add in the output's dtype
            return y + F.linear(F.linear(x, right.t().to(x.dtype)), left.to(x.dtype)) * alpha
        # In place, one (tokens × r) temporary: no second output-sized tensor (the vocabulary head's is the largest).
        y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]).to(right.dtype) @ right, left.t(), alpha=alpha)
        return y

    def embedding(ids: torch.Tensor) -> torch.Tensor:
        left, right, alpha = factors()
        out = F.embedding(
            ids, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
        rows = F.embedding(ids.reshape(-1), left)
        out.view(-1, out.shape[-1]).addmm_(rows, right.t().to(rows.dtype), alpha=alpha)
        return out

    return embedding if type(module) is nn.Embedding else linear
