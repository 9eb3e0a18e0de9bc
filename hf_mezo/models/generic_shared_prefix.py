"""The shared prefix on the stock forward: a token prefix common to every row runs once, through the KV-cache API.

The family classes share a prefix by running their layers with a prepared 4-D mask (`shared_prefix`). The generic
causal LMs use only what every `transformers` causal LM offers: the prefix runs as one row with `use_cache=True`,
its cache is repeated over the batch (`Cache.batch_repeat_interleave`, the API beam search uses; it repeats
key/value heads, so GQA repeats the small tensors), and the rows' own tokens run on top of it with a 2-D mask
(prefix, then each row's tokens) and the family's own positions, which continue after the cache. It is chunked
prefill, as `generate` does it, so each family's masks — sliding windows and hybrid layers included — are its own.

Exact by the argument in `shared_prefix`: under causal attention the prefix's hidden states, keys and values are the
same in every row (rows are left-aligned first, so the prefix sits at the same positions). Recomputed in every
forward with that pass's weights, so nothing crosses from the +εz pass to the −εz pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .shared_prefix import SharedPrefix


def shared_prefix_forward(
    run: Callable[..., object],
    input_ids: torch.Tensor,
    query_positions: torch.Tensor,
    plan: SharedPrefix,
) -> torch.Tensor | None:
    """Logits at each row's `query_positions` (batch, 1, ...), the prefix computed once; None if the family's
    forward returned no cache (then the caller runs unshared).

    `run` is the stock causal-LM forward (keywords input_ids, attention_mask, cache, use_cache, logits_to_keep); the
    rows of `input_ids` start at position 0 and `plan` is their common prefix.
    """
    batch = input_ids.shape[0]
    prefix = input_ids[:1, : plan.length]
    out = run(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    if cache is None:
        return None
    cache.batch_repeat_interleave(batch)
    suffix = input_ids.gather(1, plan.suffix_index)
    attention_mask = torch.cat(
        [torch.ones((batch, plan.length), dtype=torch.long, device=input_ids.device), plan.suffix_valid.long()], dim=1
    )
    keep = (query_positions - plan.length)[:, None]
    return run(
        input_ids=suffix, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=keep
    ).logits
