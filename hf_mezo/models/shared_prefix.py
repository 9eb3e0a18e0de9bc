"""Shared-prefix keys and values: a token prefix common to every row of a batch is computed once, at batch size 1.

Why it is exact. Under causal attention a token's hidden states depend only on the tokens before it (padding is
masked), so when every row's attended tokens start with the same `P` tokens at the same positions, those tokens'
hidden states, keys and values are the same in every row, in every layer. They are computed once (batch 1) into a
`transformers` `DynamicCache`; the cache is repeated to the batch (it holds key/value heads, so GQA models repeat
`num_key_value_heads`, not query heads), and each row's remaining tokens run with their own position ids (offset
by the prefix, counted from the row's first attended token) and a mask that shows them the whole prefix plus their
own earlier tokens. The result equals the unshared forward up to float rounding (≤ 1e-5 in fp32 in the tests).

Why it is safe for MeZO. The prefix is recomputed in every forward pass, with the weights of that pass (θ + εz or
θ − εz): nothing crosses from one pass to the other.

Where it does not apply (the exact unshared forward runs instead): the switch off (`config.share_prefix = False`),
a common prefix shorter than `config.share_prefix_min_tokens` (or no row would keep a token of its own), a batch
of one row, active dropout or LayerDrop (rows would draw different masks on the prefix), attention other than
`sdpa`/`eager` (the explicit 4-D mask), sliding-window layers (their window would also need cutting), gradient
checkpointing in training (it drops the cache), attention masks with holes inside a row, and caller position ids
that differ across rows on the prefix. Forwards that do not take the layer-by-layer path (a peft prefix's KV cache,
`inputs_embeds`, `output_attentions`) never share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .prompt_lm import _drops_layers, _drops_out

DEFAULT_MIN_TOKENS = 8
_MASKED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class SharedPrefix:
    """Where a batch's common prefix and each row's remaining ("suffix") tokens sit in the padded batch."""

    length: int  # P, the shared tokens
    starts: torch.Tensor  # (batch,) each row's first attended position: the prefix is [start, start + P)
    suffix_index: torch.Tensor  # (batch, S) positions of each row's suffix tokens (padding repeats a valid one)
    suffix_valid: torch.Tensor  # (batch, S) which of them are real tokens

    @property
    def batch(self) -> int:
        return self.suffix_index.shape[0]

    def _prefix_index(self) -> torch.Tensor:
        return self.starts[:1, None] + torch.arange(self.length, device=self.starts.device)

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, length, …) → the prefix of row 0 (1, P, …) and the suffixes (batch, S, …), left-aligned."""
        prefix = hidden[:1].gather(1, _expand_index(self._prefix_index(), hidden))
        suffix = hidden.gather(1, _expand_index(self.suffix_index, hidden))
        return prefix, suffix

    def merge(self, prefix: torch.Tensor, suffix: torch.Tensor, length: int) -> torch.Tensor:
        """The inverse of `split`, back to (batch, length, hidden); padded positions are zeros."""
        out = suffix.new_zeros((self.batch, length, suffix.shape[-1]))
        prefix_index = self.starts[:, None] + torch.arange(self.length, device=self.starts.device)
        out.scatter_(1, _expand_index(prefix_index, out), prefix.expand(self.batch, -1, -1))
        valid = self.suffix_valid[..., None].to(suffix.dtype)
        out.scatter_add_(1, _expand_index(self.suffix_index, out), suffix * valid)
        return out

    def prefix_mask(self, dtype: torch.dtype, implementation: str) -> torch.Tensor:
        """(1, 1, P, P): plain causal attention inside the prefix."""
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=self.starts.device).tril()
        return _as_implementation(causal[None, None], dtype, implementation)

    def suffix_mask(self, dtype: torch.dtype, implementation: str) -> torch.Tensor:
        """(batch, 1, S, P + S): every suffix token sees the whole prefix and its row's real tokens up to itself."""
        width = self.suffix_index.shape[1]
        device = self.starts.device
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        own = causal[None] & self.suffix_valid[:, None, :]
        prefix = torch.ones(self.batch, width, self.length, dtype=torch.bool, device=device)
        return _as_implementation(torch.cat([prefix, own], dim=-1)[:, None], dtype, implementation)


def _expand_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.reshape(*index.shape, *([1] * (like.dim() - 2))).expand(*index.shape, *like.shape[2:])


def _as_implementation(mask: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor:
    """`sdpa` takes a boolean mask (True = attend); `eager` adds a float mask (0 or the dtype's minimum)."""
    if implementation == "sdpa":
        return mask
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def find_shared_prefix(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    min_tokens: int = DEFAULT_MIN_TOKENS,
) -> SharedPrefix | None:
    """The longest token prefix common to every row's attended tokens, or None where sharing cannot be exact.

    Either padding side: each row's attended tokens are aligned at their first position before comparing. The
    prefix stops one token short of the shortest row, so every row keeps a token of its own (its label position).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if batch < 2:
        return None
    if attention_mask is None:
        attended = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        attended = attention_mask.ne(0)
    counts = attended.sum(dim=1)
    starts = attended.long().argmax(dim=1)
    last = length - 1 - attended.flip(1).long().argmax(dim=1)
    if not bool((counts > 0).all()) or not bool((last - starts + 1 == counts).all()):
        return None  # a row attends to nothing, or has holes: positions would not be contiguous
    offsets = torch.arange(length, device=device)
    aligned_index = (starts[:, None] + offsets).clamp(max=length - 1)
    aligned_valid = offsets[None] < counts[:, None]
    aligned = input_ids.gather(1, aligned_index)
    same = (aligned == aligned[:1]) & aligned_valid & aligned_valid[:1]
    if position_ids is not None:
        positions = position_ids.expand(batch, -1).gather(1, aligned_index)
        same &= positions == positions[:1]
    common = int(same.all(dim=0).long().cumprod(dim=0).sum())
    shared = min(common, int(counts.min()) - 1)
    if shared < max(min_tokens, 1):
        return None
    width = int(counts.max()) - shared
    suffix_offsets = torch.arange(width, device=device)
    suffix_valid = suffix_offsets[None] < (counts - shared)[:, None]
    suffix_index = torch.minimum(starts[:, None] + shared + suffix_offsets, last[:, None])
    return SharedPrefix(shared, starts, suffix_index, suffix_valid)


class SharedPrefixMixin:
    """Runs a range of decoder layers with the batch's common prefix computed once (see the module docstring).

    The host class provides `_stack_layers()`, `_layer_inputs(hidden, attention_mask, position_ids, masks=,
    cache=)` and `_run_layer(layer, index, hidden, inputs)` (the prompt causal LMs do). Switch and threshold live
    in the config (`share_prefix`, default True; `share_prefix_min_tokens`, default 8) so they travel with
    checkpoints; `shared_prefix_stats` counts forwards, shared forwards, shared tokens and saved token-layers
    (token × layer evaluations not computed: (batch − 1) · P per layer run).
    """

    @property
    def share_prefix(self) -> bool:
        return bool(getattr(self.config, "share_prefix", True))

    @share_prefix.setter
    def share_prefix(self, enabled: bool) -> None:
        self.config.share_prefix = bool(enabled)

    @property
    def shared_prefix_stats(self) -> dict:
        if "_shared_prefix_stats" not in self.__dict__:
            self.reset_shared_prefix_stats()
        return self.__dict__["_shared_prefix_stats"]

    def reset_shared_prefix_stats(self) -> None:
        self.__dict__["_shared_prefix_stats"] = {
            "layer_runs": 0,
            "shared_layer_runs": 0,
            "shared_tokens": 0,
            "last_shared_tokens": 0,
            "saved_token_layers": 0,
        }

    def _shared_prefix_plan(self, input_ids, attention_mask, position_ids) -> SharedPrefix | None:
        """The plan for this call, or None when sharing is off or cannot be exact (the unshared forward runs)."""
        config = self.config
        if not self.share_prefix or input_ids is None:
            return None
        if config._attn_implementation not in _MASKED_IMPLEMENTATIONS:
            return None
        if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()
        ):
            return None
        if self.training and (any(_drops_out(m) for m in self.modules()) or _drops_layers(self)):
            return None  # each row would draw its own dropout masks on the prefix
        if (
            self.training
            and torch.is_grad_enabled()
            and any(getattr(layer, "gradient_checkpointing", False) for layer in self._stack_layers())
        ):
            return None  # checkpointed layers drop the KV cache (the backward replay would write it twice)
        min_tokens = getattr(config, "share_prefix_min_tokens", DEFAULT_MIN_TOKENS)
        return find_shared_prefix(input_ids, attention_mask, position_ids, min_tokens)

    def _run_layers_shared(self, start, stop, hidden, position_ids, plan: SharedPrefix) -> torch.Tensor:
        """Layers [start, stop) on (batch, length, hidden) inputs, the prefix at batch size 1."""
        implementation = self.config._attn_implementation
        prefix_hidden, suffix_hidden = plan.split(hidden)
        prefix_positions, suffix_positions = plan.split(position_ids.expand(plan.batch, -1).unsqueeze(-1))
        prefix_positions, suffix_positions = prefix_positions.squeeze(-1), suffix_positions.squeeze(-1)
        cache = DynamicCache(config=self.config)
        layers = self._stack_layers()
        mask = plan.prefix_mask(hidden.dtype, implementation)
        inputs = self._layer_inputs(prefix_hidden, None, prefix_positions, masks=mask, cache=cache)
        for index in range(start, stop):
            prefix_hidden = self._run_layer(layers[index], index, prefix_hidden, inputs)
        cache.batch_repeat_interleave(plan.batch)  # key/value heads, so GQA repeats the small tensors
        mask = plan.suffix_mask(hidden.dtype, implementation)
        inputs = self._layer_inputs(suffix_hidden, None, suffix_positions, masks=mask, cache=cache)
        for index in range(start, stop):
            suffix_hidden = self._run_layer(layers[index], index, suffix_hidden, inputs)
        stats = self.shared_prefix_stats
        stats["shared_layer_runs"] += 1
        stats["shared_tokens"] += plan.length
        stats["last_shared_tokens"] = plan.length
        stats["saved_token_layers"] += (plan.batch - 1) * plan.length * (stop - start)
        return plan.merge(prefix_hidden, suffix_hidden, hidden.shape[1])
