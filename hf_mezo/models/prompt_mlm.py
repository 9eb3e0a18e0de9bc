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

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import BertForMaskedLM, RobertaForMaskedLM, XLMRobertaForMaskedLM
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import MaskedLMOutput
from transformers.utils.generic import can_return_tuple

from .depth_cache import (
    DEFAULT_MAX_BYTES,
    DepthCache,
    cached_frozen_stack,
    module_state_fingerprint,
    tensor_fingerprint,
)
from .freezing import encoder_layers
from .label_words import (
    LabelWordDecoder,
    class_targets,
    find_mask_positions,
    label_word_loss,
    validate_label_word_ids,
)


def _sharded_parameter_types() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return ()
    return FSDPModule, FullyShardedDataParallel, DTensor


def _gathers_parameters(module: nn.Module) -> bool:
    """Whether `module` holds sharded parameters that hooks around its forward gather (FSDP 1/2, ZeRO-3).

    Such a module must run whole, and on every rank alike: calling its children directly would read shards,
    and a cache hit on one rank with a miss on another would leave the others waiting in its collectives.
    """
    types = _sharded_parameter_types()
    if any(isinstance(m, types) for m in module.modules()):
        return True
    return any(isinstance(p, types) or hasattr(p, "ds_id") for p in module.parameters())


class PromptMaskedLMMixin:
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

    def __init__(
        self,
        config,
        *args,
        label_word_ids: Sequence[int] | None = None,
        mask_token_id: int | None = None,
        depth_cache_max_bytes: int = DEFAULT_MAX_BYTES,
        **kwargs,
    ):
        super().__init__(config, *args, **kwargs)
        self._wrap_decoder()
        self.depth_cache = DepthCache(depth_cache_max_bytes)
        self._label_word_tensors: dict[torch.device, torch.Tensor] = {}
        self.set_label_word_ids(
            label_word_ids if label_word_ids is not None else getattr(config, "label_word_ids", None),
            mask_token_id=mask_token_id if mask_token_id is not None else getattr(config, "mask_token_id", None),
        )

    # ---- label words --------------------------------------------------------------------------------------

    @property
    def label_word_ids(self) -> list[int] | None:
        """The label word of each class (vocabulary ids), or None for the stock full-vocabulary head."""
        return getattr(self.config, "label_word_ids", None)

    def set_label_word_ids(self, label_word_ids: Sequence[int] | None, mask_token_id: int | None = None) -> None:
        """Switch the head to class logits over `label_word_ids` (one id per class); None restores the stock head.

        Both values are stored in the config, so they are saved with the model and restored by `from_pretrained`.
        """
        self.config.label_word_ids = validate_label_word_ids(label_word_ids, self.config.vocab_size)
        if mask_token_id is not None:
            if not isinstance(mask_token_id, int) or not 0 <= mask_token_id < self.config.vocab_size:
                raise ValueError(
                    f"mask_token_id must be a token id in [0, {self.config.vocab_size}), got {mask_token_id!r}; "
                    "pass tokenizer.mask_token_id."
                )
            self.config.mask_token_id = mask_token_id
        self._label_word_tensors = {}

    def _label_word_tensor(self, device: torch.device) -> torch.Tensor:
        if device not in self._label_word_tensors:
            self._label_word_tensors[device] = torch.tensor(self.label_word_ids, dtype=torch.long, device=device)
        return self._label_word_tensors[device]

    def _wrap_decoder(self) -> None:
        """Put the decoder in a LabelWordDecoder that holds the same Parameter objects, in place.

        Not through `set_output_embeddings`: BERT's also makes the head's own `bias` the decoder's bias object,
        a tie that `from_pretrained` does itself after loading; made before, it leaves a checkpoint without an
        MLM head with that bias uninitialized (on the meta device).
        """
        decoder = self.get_output_embeddings()
        for module in self.modules():
            for child_name, child in module.named_children():
                if child is decoder:
                    setattr(module, child_name, LabelWordDecoder.from_linear(decoder))
                    return
        raise TypeError(f"{type(self).__name__}: the output embeddings are not a submodule; cannot wrap them.")

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        if not isinstance(new_embeddings, LabelWordDecoder):
            new_embeddings = LabelWordDecoder.from_linear(new_embeddings)
        super().set_output_embeddings(new_embeddings)

    # ---- encoder: stock modules, run layer by layer ------------------------------------------------------------

    def frozen_depth(self) -> int:
        """Encoder layers below the first one holding a trainable parameter (0 if the embeddings train)."""
        if any(p.requires_grad for p in self.base_model.embeddings.parameters()):
            return 0
        for index, layer in enumerate(encoder_layers(self)):
            if any(p.requires_grad for p in layer.parameters()):
                return index
        return len(encoder_layers(self))

    def _runs_layer_by_layer(self, input_ids, attention_mask, inputs_embeds, encoder_hidden_states, kwargs) -> bool:
        """Whether this call may run the encoder's modules directly (else: the stock base model's forward)."""
        if input_ids is None or inputs_embeds is not None or encoder_hidden_states is not None:
            return False
        if self.config.is_decoder or (attention_mask is not None and attention_mask.dim() != 2):
            return False  # causal masks, or a prepared 4-D mask that may mix positions
        requested = [k for k, v in kwargs.items() if v is not None and v is not False]
        # Per-layer outputs (or packed-sequence kwargs) are the stock forward's business.
        return not (requested or self.config.output_attentions or self.config.output_hidden_states)

    def _cacheable_depth(self) -> int:
        """The depth the cache may serve for this call: 0 unless every condition for exactness holds."""
        if not self.depth_cache.enabled:
            return 0
        if getattr(self, "_is_replica", False) or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return 0  # nn.DataParallel rebuilds its replicas every forward; tracing must see the full graph
        depth = self.frozen_depth()
        if depth == 0:
            self.depth_cache.validate((0,), ())  # everything trains: release the entries
            return 0
        frozen = [self.base_model.embeddings, *encoder_layers(self)[:depth]]
        if isinstance(self, _sharded_parameter_types()) or any(_gathers_parameters(m) for m in frozen):
            return 0  # sharded training (FSDP, ZeRO-3): each rank must run every layer's collectives
        if any(isinstance(m, nn.Dropout) and m.training and m.p > 0 for module in frozen for m in module.modules()):
            return 0  # active dropout makes the frozen stack random: nothing to reuse
        tensors = [t for module in frozen for t in (*module.parameters(), *module.buffers())]
        fingerprint = (
            depth,
            self.config._attn_implementation,
            tensor_fingerprint(tensors),
            module_state_fingerprint(frozen),
        )
        self.depth_cache.validate(fingerprint, tensors)
        return depth

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
        if _gathers_parameters(last):  # a sharded layer runs whole
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

        label_words = self._label_word_tensor(features.device)
        decoder = self.get_output_embeddings()
        if not isinstance(decoder, LabelWordDecoder):
            raise TypeError(
                f"The output embeddings are a {type(decoder).__name__}; the label-word head needs a "
                "LabelWordDecoder. Replace them with `model.set_output_embeddings(...)`, which wraps them."
            )
        with decoder.restricted_to(label_words):
            logits = head(features)  # the stock head's own forward: transform, then the label-word rows
        targets = class_targets(label_words, positions, labels, class_labels)
        loss = None if targets is None else label_word_loss(logits, targets, num_items_in_batch)
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
