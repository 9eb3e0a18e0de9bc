"""The depth cache on the stock forward: frozen bottom layers skipped, their output served per example.

The family classes run their layers one by one and can start the stack anywhere. The generic prompt LMs run the
stock forward, so the cache works around it, with two hooks on the layers the table (`families`) locates:

- a forward with any example not yet cached runs whole, as stock; a hook on the last frozen layer (below the
  "cut", the first layer holding a trainable parameter) keeps each new example's hidden states there;
- a forward whose examples are all cached runs the stock forward with the frozen layers' `forward` replaced for its
  duration: the last one returns the cached hidden states (batch, length, hidden), the ones below return their input
  untouched — nothing is computed in them. The embeddings and masks above still run (a lookup, cheap).

A forward that fills the cache may share a prompt prefix (its two calls are merged back into rows); a served one
runs unshared, over the top layers only.

Why it is exact: the same as `depth_cache` (weights below the cut are the same in both ±εz passes and every step;
the fingerprint of everything below the cut empties the cache on any change). Rows are left-aligned before the
forward (`generic`), so a row's entry is its first n attended positions, which do not depend on trailing padding
(masked keys; under causal attention never reached). A skipped layer must hand its hidden states on and nothing
else: a tensor, or a tuple whose other entries are None. A family whose layers return more (attention weights
that are always computed) is never served from the cache. Forwards inside the family's stack that run between
layers (DeBERTa-v2's convolution after layer 0) would not be skipped: such families are not in the table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .depth_cache import DepthCache, autocast_state
from .shared_prefix import SharedPrefix

_UNSUPPORTED = "unsupported"


def _output_template(output) -> str | int:
    """'tensor', the tuple length (hidden states first, the rest None), or 'unsupported'."""
    if isinstance(output, torch.Tensor):
        return "tensor"
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        if all(entry is None for entry in output[1:]):
            return len(output)
    return _UNSUPPORTED


def _formatted(hidden: torch.Tensor, template: str | int):
    return hidden if template == "tensor" else (hidden, *([None] * (template - 1)))


def _row_keys(input_ids, attention_mask, token_type_ids) -> tuple[list, list[int]]:
    batch, length = input_ids.shape
    counts = [length] * batch if attention_mask is None else attention_mask.ne(0).sum(dim=1).tolist()
    ids = input_ids.detach().to("cpu", torch.int64)
    types = None if token_type_ids is None else token_type_ids.detach().to("cpu", torch.int64)
    context = autocast_state(input_ids.device)
    keys = [
        (
            context,
            n,
            ids[i, :n].numpy().tobytes(),
            b"" if types is None else types[i, :n].numpy().tobytes(),
        )
        for i, n in enumerate(counts)
    ]
    return keys, counts


@contextlib.contextmanager
def cached_frozen_layers(
    owner: nn.Module,
    cache: DepthCache,
    layers: nn.ModuleList,
    depth: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    plan: SharedPrefix | None = None,
) -> Iterator[bool]:
    """Around the stock forward of left-aligned rows: serve layers [0, depth) from `cache`, or fill it. Yields
    whether it serves; a served forward must be one call over the whole (batch, length) rows.

    A filling forward may instead share a prefix (`plan`, `generic_shared_prefix`): its two calls, the prefix
    (1, P) and the rows' own tokens (batch, S), are merged back into rows (`SharedPrefix.merge`) before they are
    stored. (A served forward does not share: skipped layers would leave the KV cache without their entries, and
    the cache's length is what the stock forward counts positions from.) `owner` keeps the frozen layers' output
    format (`_depth_cache_template`) between forwards.
    """
    if getattr(owner, "_depth_cache_template", None) == _UNSUPPORTED:
        yield False
        return
    keys, counts = _row_keys(input_ids, attention_mask, token_type_ids)
    entries = [cache.get(key) for key in keys]
    frozen = list(layers[:depth])
    batch, length = input_ids.shape
    if all(entry is not None for entry in entries):
        hidden = entries[0].new_zeros((batch, length, entries[0].shape[-1]))
        for i, entry in enumerate(entries):
            hidden[i, : counts[i]] = entry
        template = owner._depth_cache_template

        def skip(*args, **kwargs):
            passed = args[0] if args else kwargs["hidden_states"]
            return _formatted(passed, template)

        def serve(*args, **kwargs):
            return _formatted(hidden, template)

        for layer in frozen[:-1]:
            layer.forward = skip
        frozen[-1].forward = serve
        try:
            yield True
        finally:
            for layer in frozen:
                del layer.forward
        return

    outputs = []

    def capture(module, args, output):
        outputs.append(output)

    handle = frozen[-1].register_forward_hook(capture)
    try:
        yield False
    finally:
        handle.remove()
    if not outputs:
        return
    template = _output_template(outputs[0])
    if getattr(owner, "_depth_cache_template", None) not in (None, template):
        template = _UNSUPPORTED  # layers that answer in different formats: never serve
    owner._depth_cache_template = template
    if template == _UNSUPPORTED:
        cache.clear()
        return
    tensors = [(output if template == "tensor" else output[0]).detach() for output in outputs]
    shapes = [tuple(t.shape[:2]) for t in tensors]
    if shapes == [(batch, length)]:
        hidden = tensors[0]
    elif plan is not None and shapes == [(1, plan.length), (batch, plan.suffix_index.shape[1])]:
        hidden = plan.merge(tensors[0], tensors[1], length)
    else:
        return  # calls this cache does not know how to read: store nothing
    for i, (key, entry) in enumerate(zip(keys, entries)):
        if entry is None:
            cache.put(key, hidden[i, : counts[i]].clone(), key_bytes=len(key[2]) + len(key[3]))
