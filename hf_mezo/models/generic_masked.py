"""The generic prompt masked LM: single-token label words on any encoder's stock forward, scored at the mask.

See `generic` for how the label-word head rides on the stock forward; this module adds what is masked: the mask
position, the MLM-labels form of the targets, and the head run at the mask only.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils.generic import can_return_tuple

from .generic import GenericPromptLMMixin, align_rows
from .label_words import class_targets, find_mask_positions


class GenericPromptMaskedLMMixin(GenericPromptLMMixin):
    """A `transformers` masked LM with single-token label words through its stock forward.

    The module that holds the output projection (RoBERTa's `lm_head`, BERT's `cls`, DistilBERT's `vocab_projector`)
    gets each row's hidden state at the mask only (a pre-hook gathers its input): it is a per-position map, so the
    rest of the sequence is not needed after the encoder.

    Extra forward inputs: `mask_positions` (batch,) (default: where `labels` ≠ -100, else the mask token), and
    `class_labels` (batch,) as a keyword (default: the class whose label word `labels` hold at the mask).
    """

    def _head_owner(self) -> nn.Module | None:
        """The model's top-level child (outside the encoder) holding the output projection."""
        decoder = self.get_output_embeddings()
        base = self.base_model
        for child in self.children():
            if child is not base and any(m is decoder for m in child.modules()):
                return child
        return None

    @contextlib.contextmanager
    def _head_at(self, positions: torch.Tensor):
        """Within the block the head sees (batch, 1, hidden): each row at its mask. Yields whether it did."""
        owner = self._head_owner()
        seen = []

        def gather(module, args, kwargs):
            hidden = args[0] if args else None
            if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] != positions.shape[0]:
                return None  # not the (batch, length, hidden) encoder output: leave the call alone
            seen.append(True)
            index = positions.to(hidden.device)[:, None, None].expand(-1, 1, hidden.shape[-1])
            return (hidden.gather(1, index), *args[1:]), kwargs

        handle = None if owner is None else owner.register_forward_pre_hook(gather, with_kwargs=True)
        try:
            yield lambda: bool(seen)
        finally:
            if handle is not None:
                handle.remove()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        r"""The stock masked-LM forward, or with label words: class logits (batch × classes) and the LM-BFF loss.

        mask_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            The mask position of each example. Default: where `labels` ≠ -100, else where `input_ids` is the mask.
        class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*, keyword):
            The class of each example. Default: the class whose label word `labels` holds at the mask.
        """
        class_labels = kwargs.pop("class_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        label_mode = self.label_word_ids is not None
        self._refuse_stray_labels(label_mode, class_labels, mask_positions, False)
        if not label_mode:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        positions = find_mask_positions(input_ids, labels, mask_positions, getattr(self.config, "mask_token_id", None))
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        positions = positions.to(reference.device)
        targets = class_targets(self._label_word_tensor(reference.device), positions, labels, class_labels)
        row_tensors = ("token_type_ids", "inputs_embeds")
        aligned = attention_mask is None and kwargs.get("position_ids") is None
        if attention_mask is not None and attention_mask.dim() == 2 and kwargs.get("position_ids") is None:
            tensors, attention_mask, positions, aligned = align_rows(
                {"input_ids": input_ids, **{k: kwargs.get(k) for k in row_tensors}}, attention_mask, positions
            )
            input_ids = tensors.pop("input_ids")
            kwargs.update({k: v for k, v in tensors.items() if v is not None})
        direct = kwargs.get("inputs_embeds") is None and self._runs_direct(input_ids, attention_mask, aligned, kwargs)
        label_words = self._label_word_tensor(reference.device)
        depth = self._generic_depth(direct)
        depth_cached = self._depth_cached(depth, input_ids, attention_mask, kwargs.get("token_type_ids"))
        last_layer = self._last_layer_at(direct, depth, positions)
        with self._label_word_head(label_words), depth_cached, last_layer, self._head_at(positions) as gathered:
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if gathered():
            logits = out.logits[:, 0]
        else:
            rows = torch.arange(out.logits.shape[0], device=out.logits.device)
            logits = out.logits[rows, positions.to(out.logits.device)]
        logits = self._columns(logits, label_words)
        loss = self._label_word_loss(logits, targets, num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)
