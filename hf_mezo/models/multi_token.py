"""Multi-token label words for a causal LM: class score = mean log-probability of the word's tokens after the prompt.

A label word the tokenizer splits (" marvellous" → " mar", "vell", "ous") cannot be scored by one logit. MeZO's
causal-LM code scores each candidate by its length-normalised log-likelihood; so does this module:

    s_c = (1 / k_c) Σ_j log p(w_c,j | prompt, w_c,<j),

with p the model's full-vocabulary softmax. The class logits are the s_c and the loss is the cross-entropy over
them, as for single-token words (whose fast path keeps raw logits: they differ from log-probabilities by one
constant per row, which the softmax over classes cancels).

The prompt is shared across classes through the stock KV cache: each row's prompt runs once (right-aligned, position
ids counted from its first token), the cache is repeated once per class (`batch_repeat_interleave`, the API beam
search uses), and only the word tokens run C times. Right-aligned prompts leave no holes between prompt and word,
so sliding-window caches keep exactly the tokens the window needs. Where that path is not available — a forward
without `position_ids`, or no cache returned (gradient checkpointing in training turns it off) — every
(row, class) pair runs as one sequence prompt + word, left-aligned, which needs nothing from the family but its
own position rule; it computes the same scores, with the prompt C times.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

from .alignment import RowSpans, gather_rows


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 for half-precision logits (float64 stays float64)."""
    return F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def _word_table(words: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, K) token ids (padded with each word's last token) and (classes,) word lengths."""
    width = max(len(w) for w in words)
    table = torch.tensor([list(w) + [w[-1]] * (width - len(w)) for w in words], dtype=torch.long, device=device)
    return table, torch.tensor([len(w) for w in words], device=device)


def multi_token_scores(
    run: Callable[..., object],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    prompt_ends: torch.Tensor,
    words: Sequence[Sequence[int]],
    share_prompt: bool = True,
) -> torch.Tensor:
    """Class scores (batch × classes): each word's mean token log-probability after each row's prompt.

    Args:
        run: the stock causal-LM forward (keywords: input_ids, attention_mask, position_ids, cache, use_cache,
            logits_to_keep), returning an output with `.logits` and `.cache`.
        input_ids, attention_mask: the batch (either padding side); a row's prompt is its attended tokens up to and
            including `prompt_ends` (its last prompt token).
        words: per class, the word's token ids (one or more).
        share_prompt: run the prompt once per row and the words through its repeated KV cache.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    spans = RowSpans.of(mask)
    starts = torch.zeros(batch, dtype=torch.long, device=device) if spans is None else spans.starts
    counts = prompt_ends.to(device) - starts + 1
    if not bool((counts > 0).all()):
        raise ValueError(f"each row's last prompt token must follow its first attended token; got {prompt_ends}.")
    prompts = RowSpans(starts, counts)
    table, lengths = _word_table(words, device)
    classes, width = table.shape
    if share_prompt:
        scores = _shared_prompt_scores(run, input_ids, prompts, table, lengths)
        if scores is not None:
            return scores
    return _expanded_scores(run, input_ids, prompts, table, lengths, classes, width)


def _mean_word_log_prob(
    log_probs: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor, batch: int
) -> torch.Tensor:
    """log_probs (batch · classes, K, V) at each word's own tokens, averaged over its real tokens → (batch, classes)."""
    classes, width = table.shape
    targets = table.repeat(batch, 1)  # row b·C + c holds word c
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(width, device=table.device)[None] < lengths.repeat(batch)[:, None]
    total = (picked * valid).sum(dim=1)
    return (total / lengths.repeat(batch)).view(batch, classes)


def _shared_prompt_scores(run, input_ids, prompts: RowSpans, table, lengths) -> torch.Tensor | None:
    batch = input_ids.shape[0]
    classes, width = table.shape
    prompt_width = int(prompts.counts.max())
    index, valid = prompts.index(prompt_width, side="right")
    pad = prompt_width - prompts.counts
    positions = (torch.arange(prompt_width, device=index.device)[None] - pad[:, None]).clamp(min=0)
    out = run(
        input_ids=gather_rows(input_ids, index),
        attention_mask=valid.long(),
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(out, "cache", None)
    if cache is None:
        return None
    first = _log_probs(out.logits[:, -1]).repeat_interleave(classes, dim=0)  # (batch · classes, V)
    if width == 1:
        return _mean_word_log_prob(first[:, None], table, lengths, batch)
    cache.batch_repeat_interleave(classes)
    continuation = table[:, :-1].repeat(batch, 1)  # each word but its last token, after the prompt
    continuation_valid = torch.arange(width - 1, device=table.device)[None] < (lengths - 1).repeat(batch)[:, None]
    out = run(
        input_ids=continuation,
        attention_mask=torch.cat([valid.long().repeat_interleave(classes, 0), continuation_valid.long()], dim=1),
        position_ids=prompts.counts.repeat_interleave(classes)[:, None] + torch.arange(width - 1, device=table.device),
        cache=cache,
        use_cache=True,
    )
    log_probs = torch.cat([first[:, None], _log_probs(out.logits)], dim=1)
    return _mean_word_log_prob(log_probs, table, lengths, batch)


def _expanded_scores(run, input_ids, prompts: RowSpans, table, lengths, classes, width) -> torch.Tensor:
    """Every (row, class) as one left-aligned sequence prompt + word: no cache, no position ids."""
    batch = input_ids.shape[0]
    prompt_width = int(prompts.counts.max())
    index, _ = prompts.index(prompt_width, side="left")
    prompt_ids = gather_rows(input_ids, index).repeat_interleave(classes, dim=0)
    counts = prompts.counts.repeat_interleave(classes)
    words = table.repeat(batch, 1)
    sequences = torch.cat([prompt_ids, words], dim=1)
    offsets = torch.arange(prompt_width + width, device=table.device)
    word_offsets = (offsets[None] - counts[:, None]).clamp(min=0, max=width - 1)
    is_word = offsets[None] >= counts[:, None]
    sequences = torch.where(is_word, words.gather(1, word_offsets), sequences)
    word_lengths = lengths.repeat(batch)
    attention_mask = (offsets[None] < (counts + word_lengths)[:, None]).long()
    # Token j of the word is predicted at position count − 1 + j.
    keep = (counts[:, None] - 1 + torch.arange(width, device=table.device)[None]).clamp(max=prompt_width + width - 1)
    out = run(input_ids=sequences, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep)
    return _mean_word_log_prob(_log_probs(out.logits), table, lengths, batch)
