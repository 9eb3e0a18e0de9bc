"""Prompt masked LMs for MeZO: the stock RoBERTa / XLM-RoBERTa / BERT masked LMs plus two exact shortcuts.

- Label-word head (`set_label_word_ids`): with label words set, the forward returns class logits
  (batch × classes) and the LM-BFF loss. Only the mask position is needed after the last layer's
  self-attention, so the rest of that layer and the head's transform run at the mask only, and the
  decoder multiplies only the label-word rows. Without label words the forward is the stock one.
- Depth cache (`depth_cache`): the embeddings and encoder layers below the first layer that holds a
  trainable parameter run once per distinct example; their output is reused by both ±εz passes of a MeZO
  step and across steps and epochs. See `depth_cache` for why this is exact and never stale. It serves only
  eval-mode (or dropout-free) forwards of `input_ids`; on a cache-served forward without label words the
  full-vocabulary logits at padded positions (attention mask 0) are unspecified, all others are the stock ones.

The module tree and parameter names are the stock class's, so `from_pretrained` loads stock checkpoints with
no missing or unexpected keys and `save_pretrained` writes checkpoints the stock classes load; the label words
travel in the config (`config.label_word_ids`, `config.mask_token_id`), which the stock classes ignore.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import BertForMaskedLM, RobertaForMaskedLM, XLMRobertaForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils.generic import can_return_tuple

from ..label_words import class_targets, find_mask_positions
from .depth_cache import cached_frozen_stack
from .freezing import encoder_layers
from .prompt_lm import PromptLMMixin, gathers_parameters


class PromptMaskedLMMixin(PromptLMMixin):
    """The label-word head and the depth cache, for a `transformers` masked LM of the BERT family.

    Extra constructor (and `from_pretrained`) arguments:
        label_word_ids: one vocabulary id per class (overrides `config.label_word_ids`); None keeps the config's.
        mask_token_id: the tokenizer's mask id, used to find the mask when neither `mask_positions` nor `labels`
            are given (overrides `config.mask_token_id`).
        depth_cache_max_bytes: memory bound of the depth cache; 0 disables it.

    Extra forward inputs: `mask_positions` (batch,), and `class_labels` (batch,) passed as a keyword. `class_labels`
    is read from `**kwargs` rather than named in the signature because the Trainer treats every forward argument
    whose name contains "label" as a label column, and would skip the evaluation loss for batches without it.
    """

    _lm_head_name: str  # attribute holding the head whose forward maps hidden states to vocabulary logits

    def _stack_layers(self) -> nn.ModuleList:
        return encoder_layers(self)

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.base_model.embeddings]

    # ---- encoder: stock modules, run layer by layer ------------------------------------------------------------

    def _runs_layer_by_layer(self, input_ids, attention_mask, inputs_embeds, encoder_hidden_states, kwargs) -> bool:
        """Whether this call may run the encoder's modules directly (else: the stock base model's forward)."""
        if input_ids is None or inputs_embeds is not None or encoder_hidden_states is not None:
            return False
        if self.config.is_decoder or (attention_mask is not None and attention_mask.dim() != 2):
            return False  # causal masks, or a prepared 4-D mask that may mix positions
        requested = [k for k, v in kwargs.items() if v is not None and v is not False]
        # Per-layer outputs (or packed-sequence kwargs) are the stock forward's business.
        return not (requested or self.config.output_attentions or self.config.output_hidden_states)

    def _attention_mask(self, hidden, attention_mask):
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def _encode(self, depth, input_ids, attention_mask, token_type_ids, position_ids, query_positions=None):
        """The encoder output (batch, length, hidden), or (batch, hidden) at `query_positions` only.

        The layers below `depth` come from the depth cache. With `query_positions`, the last layer runs its
        self-attention over all positions (its keys and values need them) but the attention output projection,
        LayerNorm and feed-forward block — 3/4 of a layer — at the queried positions only.
        """
        layers = encoder_layers(self)
        embeddings = self.base_model.embeddings

        def run_frozen_stack(input_ids, attention_mask, token_type_ids, position_ids):
            hidden = embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
            mask = self._attention_mask(hidden, attention_mask)
            for layer in layers[:depth]:
                hidden = layer(hidden, mask, position_ids=position_ids)
            return hidden

        if depth:
            hidden = cached_frozen_stack(
                self.depth_cache, run_frozen_stack, input_ids, attention_mask, token_type_ids, position_ids
            )
        else:
            hidden = embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        top = layers[depth:]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if len(top) == 0:
            return hidden if query_positions is None else hidden[rows, query_positions]
        mask = self._attention_mask(hidden, attention_mask)
        for layer in top[:-1]:
            hidden = layer(hidden, mask, position_ids=position_ids)
        last = top[-1]
        if query_positions is None:
            return last(hidden, mask, position_ids=position_ids)
        if gathers_parameters(last):  # a sharded layer runs whole
            return last(hidden, mask, position_ids=position_ids)[rows, query_positions]
        # The stock layer's forward, with everything after self-attention at the queried positions only.
        attended, _ = last.attention.self(hidden, attention_mask=mask, position_ids=position_ids)
        attention_output = last.attention.output(attended[rows, query_positions], hidden[rows, query_positions])
        return last.feed_forward_chunk(attention_output)

    # ---- forward -------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
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
        direct = self._runs_layer_by_layer(input_ids, attention_mask, inputs_embeds, encoder_hidden_states, kwargs)
        depth = self._cacheable_depth() if direct else 0
        label_mode = self.label_word_ids is not None
        if not label_mode and (class_labels is not None or mask_positions is not None):
            raise ValueError(
                "Got `class_labels`/`mask_positions` but the model has no label words, so it would return "
                "full-vocabulary logits and ignore them. Set them first: model.set_label_word_ids(label_word_ids)."
            )
        if not label_mode and depth == 0:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return super().forward(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                labels=labels,
                **kwargs,
            )

        positions = None
        if label_mode:
            positions = find_mask_positions(
                input_ids, labels, mask_positions, getattr(self.config, "mask_token_id", None)
            )
        hidden_states = attentions = None
        if direct:
            if positions is not None:
                positions = positions.to(input_ids.device)
            features = self._encode(depth, input_ids, attention_mask, token_type_ids, position_ids, positions)
        else:
            outputs = self.base_model(
                input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=True,
                **kwargs,
            )
            features = outputs.last_hidden_state
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
            if positions is not None:
                positions = positions.to(features.device)
                features = features[torch.arange(features.shape[0], device=features.device), positions]

        head = getattr(self, self._lm_head_name)
        if not label_mode:  # the stock head and loss, on the cached encoder's output
            logits = head(features)
            loss = None
            if labels is not None:
                labels = labels.to(logits.device)
                loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
            return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

        logits, label_words = self._label_word_logits(head, features)  # transform, then the label-word rows
        targets = class_targets(label_words, positions, labels, class_labels)
        loss = self._label_word_loss(logits, targets, num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)


class RobertaForPromptMaskedLM(PromptMaskedLMMixin, RobertaForMaskedLM):
    """`RobertaForMaskedLM` with a label-word head and a depth cache (roberta-base/large, model_type "roberta")."""

    _lm_head_name = "lm_head"


class XLMRobertaForPromptMaskedLM(PromptMaskedLMMixin, XLMRobertaForMaskedLM):
    """`XLMRobertaForMaskedLM` with a label-word head and a depth cache."""

    _lm_head_name = "lm_head"


class BertForPromptMaskedLM(PromptMaskedLMMixin, BertForMaskedLM):
    """`BertForMaskedLM` with a label-word head and a depth cache."""

    _lm_head_name = "cls"
