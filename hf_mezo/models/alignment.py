"""Move each row's attended tokens to the left edge of the batch (right padding), or to the right edge.

Why: a family's own position rule (rotary or learned positions counted from the left edge, OPT's offset, ALiBi)
then gives each row exactly the positions it has alone, with no position ids to pass — some forwards take none,
or take them in `**kwargs` and ignore them. Trailing padding is masked and, under causal attention, never
reached; so a left-aligned row is scored as it is alone, whatever family runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowSpans:
    """Each row's attended tokens as one contiguous span [starts, starts + counts) of the padded batch."""

    starts: torch.Tensor  # (batch,)
    counts: torch.Tensor  # (batch,)

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> RowSpans | None:
        """The spans, or None when a row attends to nothing or has holes (then nothing is moved)."""
        attended = attention_mask.ne(0)
        counts = attended.sum(dim=1)
        starts = attended.long().argmax(dim=1)
        last = attended.shape[1] - 1 - attended.flip(1).long().argmax(dim=1)
        if not bool((counts > 0).all()) or not bool((last - starts + 1 == counts).all()):
            return None
        return cls(starts, counts)

    @property
    def left_aligned(self) -> bool:
        return not bool(self.starts.any())

    def index(self, width: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, width) source positions that put every span at the `side` edge, and which of them are real."""
        offsets = torch.arange(width, device=self.starts.device)
        if side == "left":
            valid = offsets[None] < self.counts[:, None]
            source = self.starts[:, None] + offsets[None]
        else:
            pad = width - self.counts
            valid = offsets[None] >= pad[:, None]
            source = self.starts[:, None] + offsets[None] - pad[:, None]
        last = self.starts + self.counts - 1
        return torch.minimum(source.clamp(min=0), last[:, None]), valid


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tensor` (batch, length, ...) read at `index` (batch, width) along the sequence dimension."""
    expanded = index.reshape(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, expanded)
