"""Streamed perturbation of large `nn.Linear` / `nn.Embedding` weights: never materialize θ + εz whole.

Swapping a module's weight for θ + εz costs one extra copy of that weight while the module runs. For
most modules that is small, but a masked LM's tied word-embedding / output-decoder matrix is 30% of
roberta-base (154 MB in fp32), and the decoder runs exactly when the full-vocabulary logits are
alive, which is the forward's memory peak. So for weights of at least `STREAM_MIN_NUMEL` elements:

- `nn.Linear`: the output is computed in blocks of rows, y[..., r₀:r₁] = x·(W + εz)[r₀:r₁]ᵀ + b, each
  block perturbed just before its matmul; the extra memory is one block.
- `nn.Embedding`: the unperturbed rows are looked up, then each looked-up row gets εz added, drawing
  z only for the blocks of rows the batch uses (rows no token touches draw nothing).
- the label-word decoder (`models.LabelWordDecoder`, restricted to a few rows): only those rows are
  perturbed, so the vocabulary matrix costs a few rows of z instead of all of them.

Both give bit-for-bit the values of the whole-weight swap (`ZerothOrderSGD.perturbed_slice` does the
same elementwise arithmetic on a slice), so the choice is invisible to the result.

The streamed computation replaces the module's own `forward` for the pass. A module under an
Accelerate hook (`device_map`, `cpu_offload`: `add_hook_to_module` wraps `forward` and keeps the
original as `_old_forward`) gets `_old_forward` replaced instead, so the hook still moves inputs and
outputs in the perturbed pass, and both attributes are put back as they were afterwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..directions import CHUNK_NUMEL
from ..optimizer import add_scaled
from .state import PassState

# Weights at least this large (16 MiB in fp32) are streamed rather than swapped.
STREAM_MIN_NUMEL = 1 << 22
# Target elements of z per block: big enough for efficient matmuls, small next to activations.
BLOCK_NUMEL = 1 << 20


def streams(module: nn.Module, param: nn.Parameter) -> bool:
    """Whether `param` is `module`'s weight and large enough, in a module type we can stream exactly."""
    if param.numel() < STREAM_MIN_NUMEL or getattr(module, "weight", None) is not param or param.dim() != 2:
        return False
    if "forward" in module.__dict__ and not accelerate_hooked(module):
        return False  # someone else's instance-level forward: computing the layer ourselves would bypass it
    if type(module) is nn.Linear or hasattr(module, "active_rows"):  # the label-word head's decoder
        return True
    return type(module) is nn.Embedding and module.max_norm is None


def block_rows(row_numel: int, target: int = BLOCK_NUMEL) -> int:
    """Rows per block: a multiple of the rows that span whole z chunks when that is close to `target`.

    Block boundaries inside a chunk make both neighbours draw that chunk; aligned blocks draw each once.
    """
    aligned = CHUNK_NUMEL // math.gcd(CHUNK_NUMEL, row_numel)  # rows per whole number of chunks
    if aligned * row_numel <= 4 * target:
        return aligned * max(1, round(target / (aligned * row_numel)))
    return max(1, target // row_numel)


def accelerate_hooked(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")


def streamed_forward(module: nn.Module, state: PassState) -> Callable[..., torch.Tensor]:
    """A replacement `forward` for `module` that sees its weight perturbed by scale·z_direction."""
    optimizer, direction, scale = state.optimizer, state.direction, state.scale
    weight = module.weight

    def on_use() -> None:
        state.touched.add(id(weight))

    rows, row_numel = weight.shape
    step_rows = block_rows(row_numel)

    def perturbed_rows(r0: int, r1: int) -> torch.Tensor:
        return optimizer.perturbed_slice(weight, direction, scale, r0 * row_numel, r1 * row_numel).view(
            r1 - r0, row_numel
        )

    def linear(x: torch.Tensor) -> torch.Tensor:
        on_use()
        active_rows = getattr(module, "active_rows", None)
        if active_rows is not None:  # a label-word decoder reads a few rows: perturb just those
            rows_weight = torch.stack([perturbed_rows(r, r + 1)[0] for r in active_rows.tolist()])
            return F.linear(x, rows_weight, None if module.bias is None else module.bias[active_rows])
        out = None
        for r0 in range(0, rows, step_rows):
            r1 = min(rows, r0 + step_rows)
            bias = None if module.bias is None else module.bias[r0:r1]
            y = F.linear(x, perturbed_rows(r0, r1), bias)
            if out is None:  # allocated from the first block so autocast's output dtype is respected
                out = y.new_empty(*y.shape[:-1], rows)
            out[..., r0:r1] = y
        return out

    def embedding(ids: torch.Tensor) -> torch.Tensor:
        on_use()
        out = F.embedding(
            ids, weight, module.padding_idx, None, module.norm_type, module.scale_grad_by_freq, module.sparse
        )
        flat_ids, flat_out = ids.reshape(-1), out.view(-1, row_numel)
        for block in torch.unique(flat_ids // step_rows).tolist():
            r0, r1 = block * step_rows, min(rows, (block + 1) * step_rows)
            where = ((flat_ids >= r0) & (flat_ids < r1)).nonzero().squeeze(1)
            local = flat_ids[where] - r0
            z = optimizer.direction(weight, direction, start=r0 * row_numel, end=r1 * row_numel).view(
                r1 - r0, row_numel
            )
            flat_out[where] = add_scaled(flat_out[where], z[local], scale)
        return out

    return embedding if type(module) is nn.Embedding else linear


@contextlib.contextmanager
def streaming(
    modules: list[tuple[nn.Module, nn.Parameter]],
    state: PassState,
    build: Callable[[nn.Module, PassState], Callable[..., torch.Tensor]] | None = None,
) -> Iterator[None]:
    """Within the block, each module computes with its weight streamed at θ + s·z (unless already held).

    `build(module, state)` makes the perturbed computation (`streamed_forward`; the low-rank transient term
    of `low_rank` shares this installation).
    """
    build = streamed_forward if build is None else build  # looked up at call time (tests wrap it)
    restores = []
    try:
        for module, weight in modules:
            restores.append(_install(module, weight, state, build))
        yield
    finally:
        for restore in reversed(restores):
            restore()


def _install(module: nn.Module, weight: nn.Parameter, state: PassState, build) -> Callable[[], None]:
    attribute = "_old_forward" if accelerate_hooked(module) else "forward"
    had_own = attribute in module.__dict__
    previous = module.__dict__.get(attribute)
    plain_call = previous if had_own else type(module).forward.__get__(module)
    perturbed_call = build(module, state)

    def forward(*args, **kwargs):
        state.module_runs[id(module)] += 1
        if id(weight) in state.active:  # already held (whole-forward, or an enclosing swap): use it as it is
            return plain_call(*args, **kwargs)
        state.streaming.add(id(weight))
        try:
            return perturbed_call(*args, **kwargs)
        finally:
            state.streaming.discard(id(weight))

    setattr(module, attribute, forward)

    def restore() -> None:
        if had_own:
            setattr(module, attribute, previous)
        else:
            delattr(module, attribute)

    return restore
