"""The depth cache: hidden states below the first trainable layer, computed once per distinct input.

Why depth and not a sequence prefix: between the +εz and −εz passes every trainable weight differs, so
nothing a trainable layer computes can be reused, and RoBERTa's attention is bidirectional, so the
keys/values of a shared token prefix depend on the tokens after it. What is exactly reusable is the output
of the frozen layers *below* the first trainable one (the "cut"): their weights are the same in both passes,
in every step and every epoch, and the first trainable layer computes its keys and values from it.

Entries are per example, keyed by the content of the example (input ids, attention mask, token types and
position ids when given) up to its last attended position, so an example hits whatever batch it is shuffled
into and however far it is padded. Why that is exact: a position whose attention mask is 0 is never attended
to, and RoBERTa/BERT position ids depend only on the tokens before a position, so the hidden states of
positions up to the last attended one do not depend on trailing padding. Trailing padded positions of a
served batch are filled with zeros; they are never attended to, so no attended output depends on them.

Never stale: before each use the cache compares a fingerprint of everything below the cut — for each
parameter and buffer its identity, storage address, autograd version counter, dtype, device, shape and
`requires_grad` — plus the cut itself and the attention implementation, and empties itself on any change.
The version counter moves on every in-place write autograd can see (`with torch.no_grad(): p.add_(…)`,
`copy_`, `load_state_dict`, `nn.init`, optimizer steps); replacing a parameter or assigning `p.data = t`
changes identity or address; (un)freezing changes `requires_grad` and the cut. One write is invisible to it,
by PyTorch's design: an in-place op on `p.data` (`p.data.add_(…)`) bypasses the version counter. After such a
write below the cut call `clear()`. MeZO's own perturbation swaps `.data` of trainable parameters only, which
lie above the cut by definition.

Tensors are not all a frozen stack's state: a LayerNorm's `eps`, peft's LoRA `scaling` (`set_scale`), its
active and disabled adapters, a module's `training` flag are plain Python attributes. The fingerprint
therefore also covers every module's non-tensor attributes below the cut (`module_state_fingerprint`):
numbers, strings, booleans, None, dtypes, devices, and lists/tuples/sets/dicts of those. Not covered, and
documented as such: state held in other objects a module merely references (a `config` object read at run
time, a closure), and Python globals. After changing such state below the cut, call `clear()`.

Entries also record the autocast state they were computed under, so bf16-autocast and fp32 forwards never
serve each other. Memory is bounded by `max_bytes` with least-recently-used eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import torch
from torch.nn.utils.rnn import pad_sequence

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~4,000 roberta-large examples of 64 tokens (256 KiB each in fp32)


def _checked_size(max_bytes: int) -> int:
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an integer ≥ 0 (0 disables the depth cache), got {max_bytes!r}.")
    return max_bytes


class DepthCache:
    """An LRU store of per-example hidden states, emptied whenever the fingerprint of the frozen stack changes.

    Args:
        max_bytes: memory bound for the stored hidden states (and their keys); 0 disables the cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = _checked_size(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor, int]] = OrderedDict()
        self._fingerprint: Hashable | None = None
        # Detached views of the fingerprinted tensors. They keep a storage alive after `p.data = other`, so the
        # allocator cannot hand its address to a later tensor and make an A → B → A swap look unchanged.
        self._pinned: list[torch.Tensor] = []
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def bytes_per_example(self) -> float:
        """Mean memory of one stored example (hidden states + key), 0 when empty."""
        return self.bytes_used / len(self._entries) if self._entries else 0.0

    def resize(self, max_bytes: int) -> None:
        """Change the memory bound (0 disables the cache), evicting least-recently-used entries to fit."""
        self.max_bytes = _checked_size(max_bytes)
        self._evict()

    def clear(self) -> None:
        """Drop every entry (statistics are kept)."""
        self._entries.clear()
        self.bytes_used = 0

    def validate(self, fingerprint: Hashable, tensors: Iterable[torch.Tensor]) -> None:
        """Empty the cache unless `fingerprint` equals the one its entries were computed under."""
        if fingerprint != self._fingerprint:
            if self._entries:
                self.invalidations += 1
            self.clear()
            self._fingerprint = fingerprint
            self._pinned = [t.detach() for t in tensors]

    def get(self, key: Hashable) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, hidden: torch.Tensor, key_bytes: int = 0) -> None:
        size = hidden.numel() * hidden.element_size() + key_bytes
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes_used -= self._entries.pop(key)[1]
        self._entries[key] = (hidden, size)
        self.bytes_used += size
        self._evict()

    def _evict(self) -> None:
        while self.bytes_used > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes_used -= evicted
            self.evictions += 1


def tensor_fingerprint(tensors: Iterable[torch.Tensor]) -> tuple:
    """What changes when a tensor is replaced, moved, (un)frozen or written in place (see the module docstring)."""
    return tuple(
        (id(t), t.data_ptr(), t._version, t.requires_grad, t.dtype, t.device, tuple(t.shape)) for t in tensors
    )


_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
# nn.Module bookkeeping (tensors and submodules are fingerprinted elsewhere; hooks are not state of the computation
# MeZO changes, and the perturbation's own hooks come and go on every pass).
_SKIPPED_ATTRIBUTES = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_is_full_backward_hook"}
    | {"_backward_hooks", "_backward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs"}
    | {"_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"}
    | {"_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"}
    | {"training", "forward", "_old_forward", "_zo_perturbation_plan", "_zo_perturbation_plans", "_compiled_call_impl"}
)


_EXACT_SCALAR_TYPES = frozenset(_SCALARS)


def _plain_value(value, depth: int = 0):
    """A hashable copy of `value` if it is plain data (scalars and small containers of them), else None."""
    if type(value) in _EXACT_SCALAR_TYPES or isinstance(value, _SCALARS):  # the exact-type test: the common case
        return value
    if depth < 3 and isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_plain_value(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, (set, frozenset)):
        return ("set", *sorted(repr(_plain_value(v, depth + 1)) for v in value))
    if depth < 3 and isinstance(value, dict):
        return ("dict", *sorted((repr(k), repr(_plain_value(v, depth + 1))) for k, v in value.items()))
    return None


def module_state_fingerprint(modules: Iterable[torch.nn.Module]) -> tuple:
    """The plain-data attributes of each module in `modules` (submodules included only when listed: the caller
    has walked the tree already): norm eps, peft scaling, ... In each module's attribute order (insertion order:
    an attribute deleted and set again moves, which reads as a change and only costs a refill)."""
    state = []
    for module in modules:
        attributes = []
        for key, value in vars(module).items():
            if key not in _SKIPPED_ATTRIBUTES:
                plain = _plain_value(value)
                if plain is not None:
                    attributes.append((key, plain))
        state.append((id(module), type(module).__qualname__, tuple(attributes)))
    return tuple(state)


def autocast_state(device: torch.device) -> tuple:
    """The autocast setting a computation on `device` runs under: part of every entry's key."""
    if not torch.is_autocast_enabled(device.type):
        return (device.type, None)
    return (device.type, torch.get_autocast_dtype(device.type))


def cached_frozen_stack(
    cache: DepthCache,
    run_stack: Callable[..., torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    trim_leading: bool = False,
) -> torch.Tensor:
    """Hidden states (batch, length, hidden) of the frozen stack, served from `cache` where possible.

    `run_stack(input_ids=, attention_mask=, token_type_ids=, position_ids=)` computes the frozen stack (embeddings
    and the layers below the cut) for a batch. Only examples not in the cache are computed, as one batch trimmed
    to their longest attended length, and stored; the batch is then assembled from the entries.

    `trim_leading` (causal LMs, whose tokenizers often pad on the left): an entry also starts at the row's first
    attended position, so a left-padded and a right-padded copy of an example share it. Exact when nothing before
    that position can reach the stored ones: causal attention never looks ahead, padded positions are masked, and
    the caller passes position ids counted from the first attended token (part of the key). Missing rows are
    computed shifted to the left edge; positions outside each row's span are zeros in the result.
    """
    batch, length = input_ids.shape
    if position_ids is not None:
        position_ids = position_ids.expand(batch, -1)
    # Keys are built on the CPU: one small device-to-host copy of the ids per forward.
    ids, types, positions = (
        None if t is None else t.detach().to("cpu", torch.int64) for t in (input_ids, token_type_ids, position_ids)
    )
    attended = None if attention_mask is None else attention_mask.detach().to("cpu").ne(0)
    if attended is None:
        starts, ends = [0] * batch, [length] * batch
    else:
        # [first attended, one past the last attended); a row with nothing attended keeps its full length.
        any_attended = attended.any(dim=1).tolist()
        last = (length - attended.flip(1).long().argmax(dim=1)).tolist()
        first = attended.long().argmax(dim=1).tolist() if trim_leading else [0] * batch
        starts = [f if a else 0 for f, a in zip(first, any_attended)]
        ends = [n if a else length for n, a in zip(last, any_attended)]
    context = autocast_state(input_ids.device)

    def span(t: torch.Tensor | None, i: int) -> bytes:
        return b"" if t is None else t[i, starts[i] : ends[i]].numpy().tobytes()

    keys = [
        (context, ends[i] - starts[i], tuple(span(t, i) for t in (ids, attended, types, positions)))
        for i in range(batch)
    ]
    hidden_rows: list[torch.Tensor | None] = [cache.get(key) for key in keys]

    missing: dict[Hashable, int] = {}  # key -> first row holding it (a batch may repeat an example)
    for i, (key, row) in enumerate(zip(keys, hidden_rows)):
        if row is None and key not in missing:
            missing[key] = i
    if missing:
        rows = list(missing.values())
        width = max(ends[i] - starts[i] for i in rows)

        def select(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if not any(starts[i] for i in rows):
                return t.index_select(0, torch.tensor(rows, device=t.device))[:, :width]
            shifted = t.new_zeros((len(rows), width))  # each row's span moved to the left edge
            for j, i in enumerate(rows):
                shifted[j, : ends[i] - starts[i]] = t[i, starts[i] : ends[i]]
            return shifted

        with torch.no_grad():
            computed = run_stack(
                input_ids=select(input_ids),
                attention_mask=select(attention_mask),
                token_type_ids=select(token_type_ids),
                position_ids=select(position_ids),
            )
        fresh = {}
        for j, (key, i) in enumerate(missing.items()):
            fresh[key] = computed[j, : ends[i] - starts[i]].clone()
            cache.put(key, fresh[key], key_bytes=sum(len(part) for part in key[2]))
        hidden_rows = [fresh[key] if row is None else row for key, row in zip(keys, hidden_rows)]

    if not any(starts):
        hidden = pad_sequence(hidden_rows, batch_first=True)
        if hidden.shape[1] < length:
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - hidden.shape[1]))
        return hidden
    first_row = hidden_rows[0]
    hidden = first_row.new_zeros((batch, length, first_row.shape[-1]))
    for i, row in enumerate(hidden_rows):
        hidden[i, starts[i] : ends[i]] = row
    return hidden
