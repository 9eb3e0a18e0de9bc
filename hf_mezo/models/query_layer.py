"""The last layer at the label positions only: an optional fast path the family table turns on, per layer design.

A label-word forward reads one position per row after the last layer. Attention needs every position's keys and
values, but nothing after it does: the rest of the last layer (a BERT layer's attention output, LayerNorm and
feed-forward block — 3/4 of it; a Llama layer's MLP) can run at the label positions only. The family classes do it
in their own layer loop; the generic prompt LMs, which run the stock forward, do it by replacing the last layer's
`forward` for the duration of one forward with a recipe that calls the layer's own submodules in the stock order.

The recipe returns the layer's input with the label positions overwritten by their true outputs: every other
position is stale. Exact for what the label-word head reads (the label positions: a causal LM's final norm and head
at `logits_to_keep`, a masked LM's head at the mask), and used only where nothing else reads the last layer's
output (`generic` asks for no hidden states or attentions). Each recipe is named by `FamilyLayout.query_layer` and
tested equal to the stock forward for every family that names it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def _bert_rows(layer: nn.Module, rows, positions, hidden, args, kwargs) -> torch.Tensor | None:
    """BERT/RoBERTa/ELECTRA layer: self-attention everywhere, then `attention.output` and the feed-forward block at
    the label positions (the stock `BertLayer.forward`, less the cross-attention an encoder-only LM never has)."""
    encoder_hidden_states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    if encoder_hidden_states is not None or getattr(layer, "is_decoder", False):
        return None
    mask = args[0] if args else kwargs.get("attention_mask")
    extra = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "encoder_attention_mask")}
    attended, _ = layer.attention.self(hidden, attention_mask=mask, **extra)
    attention_output = layer.attention.output(attended[rows, positions], hidden[rows, positions])
    return layer.feed_forward_chunk(attention_output)


def _llama_rows(layer: nn.Module, rows, positions, hidden, args, kwargs) -> torch.Tensor | None:
    """Llama-style pre-norm layer: attention everywhere, the residual add and MLP at the label positions."""
    if args or kwargs.get("cache") is not None or kwargs.get("use_cache"):
        return None
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)
    hidden_rows = hidden[rows, positions] + attended[rows, positions]
    return hidden_rows + layer.mlp(layer.post_attention_layernorm(hidden_rows))


QUERY_LAYER_RECIPES: dict[str, Callable[..., torch.Tensor | None]] = {"bert": _bert_rows, "llama": _llama_rows}


@contextlib.contextmanager
def last_layer_at(layer: nn.Module, recipe: str, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, `layer` computes its output at `positions` (batch,) only (see the module docstring); a call
    the recipe does not cover (a KV cache, cross-attention) runs the stock layer."""
    compute_rows = QUERY_LAYER_RECIPES[recipe]

    def forward(*args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        at = positions.to(hidden.device)
        values = compute_rows(layer, rows, at, hidden, args[1:], kwargs)
        if values is None:
            return type(layer).forward(layer, hidden, *args[1:], **kwargs)
        return hidden.index_put((rows, at), values.to(hidden.dtype))

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward
