"""Low-precision (bf16/fp16) weights: a float32 loss, so that L₊ − L₋ is not rounded away.

A model loaded with `dtype=torch.bfloat16` computes its logits, and hence its loss, in bf16. The
loss is then a bf16 number: at L ≈ 0.69 its spacing is 2⁻⁸ ≈ 3.9e-3, while the two MeZO passes
differ by about ε·|∇L·z|, typically 1e-4 to 1e-2 for ε = 1e-3. So L₊ − L₋ is rounded to 0 or a
few multiples of one spacing, and g = (L₊ − L₋)/2ε is exactly 0 on many steps and a coarse multiple
of 3.9e-3/2ε = 1.95 on the others.

The fix here: the module that produces the logits (the output embeddings / LM head, or the
classification head) gets a forward hook casting its output to float32, so the model's own loss
(cross-entropy over a softmax, then a mean over items) runs in float32. The logits themselves are
still rounded to bf16 by the head's matmul (relative error 2⁻⁹ each), but those roundings are a
fixed function of the perturbed weights, the reduction adds thousands of them, and the loss is no
longer a coarse grid. Measured in `benchmarks/bf16_loss_resolution.py` and
`tests/test_low_precision.py`. The hook only changes dtypes (float32 logits cost 2× the bf16 logits'
memory for the duration of one forward), and is installed only around MeZO's perturbed passes.

Updates of bf16/fp16 weights are accumulated in float32 and rounded once, stochastically by default
(`ZerothOrderSGD`, `zo_stochastic_rounding`): an update far below half a unit in the last place
moves a weight by one unit with the matching probability, so it survives in expectation instead of
being rounded away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

LOW_PRECISION = (torch.bfloat16, torch.float16)

# Heads of `transformers` task models that have no output embeddings (their outputs are the logits).
_HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head")


def logits_module(model: nn.Module) -> nn.Module | None:
    """The module whose output is the model's logits: the output embeddings, else a known task head."""
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    if isinstance(head, nn.Module):
        return head
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    for name in _HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, nn.Module):
            return head
    return None


def _to_float32(module: nn.Module, args, output):
    if torch.is_tensor(output) and output.dtype in LOW_PRECISION:
        return output.float()
    return None  # anything else (already float32, or a structure we do not know) passes unchanged


@contextlib.contextmanager
def float32_logits(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module | None]:
    """Within the block, the model's logits (and so its loss) are float32 even if its weights are bf16/fp16.

    Yields the hooked module, or None when there is nothing to do (disabled, or no logits module found).
    """
    head = logits_module(model) if enabled else None
    handle = head.register_forward_hook(_to_float32) if head is not None else None
    try:
        yield head
    finally:
        if handle is not None:
            handle.remove()
