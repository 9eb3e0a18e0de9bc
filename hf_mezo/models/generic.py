"""The generic prompt LMs: label words through the stock forward of any `transformers` causal or masked LM.

Nothing here knows a family. The stock model runs its own forward — its embeddings, position rule, masks, sliding
windows, hybrid layers, soft-capping — and the label-word head rides on two generic mechanisms of `transformers`:

- the output-embeddings accessor (`get_output_embeddings`): the projection is put in a `LabelWordDecoder` holding
  the same Parameter objects (tied embeddings stay shared and untouched) and, during a label-word forward,
  multiplies only the label-word rows; what the family does after it (Gemma's soft-capping, Cohere's logit scale)
  is elementwise and applies unchanged. A head that is not a plain `nn.Linear` over the vocabulary (DeBERTa-v2's
  non-legacy head multiplies by the embedding matrix inline) gives full-vocabulary logits, read at the label
  words: the same numbers, without the saving (said once in the log);
- `logits_to_keep` (causal LMs): a (batch, 1) tensor of positions keeps the final norm and head at each row's last
  prompt token only.

Padding: rows with left padding are moved to the left edge first (`alignment`), so every family's own position
rule gives each row the positions it has alone; right-padded batches pass through untouched. With a KV cache
passed in (a peft prefix) the rows stay put and position ids count from each row's first attended token.

Speed-ups that need to address layers read them from one table (`families.FAMILY_LAYOUTS`): the depth cache
(`generic_depth_cache`) and the last layer at the label positions (`query_layer`). The shared prefix
(`generic_shared_prefix`) needs only the KV-cache API. A family the table lacks runs the exact path without the first
two. What only the family classes (`LlamaForPromptCausalLM`, `RobertaForPromptMaskedLM`, ...) do: share the prefix
above the cut in a forward the depth cache serves.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers.utils import logging

from .alignment import RowSpans, gather_rows
from .families import FAMILY_LAYOUTS, family_layout, modules_before
from .generic_depth_cache import cached_frozen_layers
from .label_words import LabelWordDecoder
from .prompt_lm import PromptLMMixin, gathers_parameters
from .query_layer import last_layer_at

logger = logging.get_logger(__name__)


class GenericPromptLMMixin(PromptLMMixin):
    """Label words on the stock forward of any `transformers` LM (see the module docstring)."""

    def _wrap_decoder(self) -> None:
        decoder = self.get_output_embeddings()
        if isinstance(decoder, LabelWordDecoder):
            return
        vocab_size = self.config.vocab_size
        if type(decoder) is nn.Linear and decoder.out_features == vocab_size:
            super()._wrap_decoder()
            return
        logger.warning_once(
            f"{type(self).__name__}: the output embeddings are {type(decoder).__name__}, not an nn.Linear over the "
            f"{vocab_size}-token vocabulary; label words are read from full-vocabulary logits (same scores, no "
            "head saving)."
        )

    # ---- the family table: the depth cache where the table locates the layer stack ----------------------------

    def _stack_layers(self) -> nn.ModuleList:
        found = family_layout(self, quiet=True)
        if found is None:
            raise TypeError(
                f"model_type {self.config.model_type!r} is not in hf_mezo.models.families.FAMILY_LAYOUTS: hf_mezo does "
                "not know where its layer stack lives (the depth cache is off for it)."
            )
        return found[0]

    def _embedding_modules(self) -> list[nn.Module]:
        layers = self._stack_layers()  # raises, naming the table, for a family it lacks
        return modules_before(self, layers, family_layout(self, quiet=True)[1])

    def _generic_depth(self, direct: bool) -> int:
        """The depth the cache serves in this forward (0: none)."""
        if direct and self.depth_cache.enabled and family_layout(self) is not None:
            return self._cacheable_depth()
        return 0

    def _depth_cached(self, depth: int, input_ids, attention_mask, token_type_ids=None, plan=None):
        """A context serving the frozen bottom layers (below `depth`) of this forward from the depth cache; it yields
        whether it serves."""
        if depth == 0:
            return contextlib.nullcontext(False)
        return cached_frozen_layers(
            self, self.depth_cache, self._stack_layers(), depth, input_ids, attention_mask, token_type_ids, plan
        )

    def _last_layer_at(self, direct: bool, depth: int, positions: torch.Tensor):
        """A context running the last layer at `positions` only, where the table names a recipe for the family."""
        layout = FAMILY_LAYOUTS.get(getattr(self.config, "model_type", None))
        if not direct or layout is None or layout.query_layer is None:
            return contextlib.nullcontext()
        layers = self._stack_layers()
        if depth >= len(layers) or gathers_parameters(layers[-1]):
            return contextlib.nullcontext()  # the last layer is served from the cache, or sharded (runs whole)
        return last_layer_at(layers[-1], layout.query_layer, positions)

    def _runs_direct(self, input_ids, attention_mask, aligned: bool, kwargs: dict) -> bool:
        """Whether the depth cache may serve this call: plain `input_ids` of rows starting at position 0, the family's
        own positions, no KV cache, no per-layer outputs."""
        if input_ids is None or not aligned or (attention_mask is not None and attention_mask.dim() != 2):
            return False
        if self.config.output_attentions or self.config.output_hidden_states:
            return False
        allowed = {"use_cache", "return_dict", "token_type_ids"}
        return not [k for k, v in kwargs.items() if k not in allowed and v is not None and v is not False]

    # ---- the label-word head ------------------------------------------------------------------------------------

    def _label_word_head(self, label_words: torch.Tensor):
        """Within the block the output projection computes the label-word rows only (where it can)."""
        decoder = self.get_output_embeddings()
        if isinstance(decoder, LabelWordDecoder):
            return decoder.restricted_to(label_words)
        return contextlib.nullcontext()

    def _columns(self, logits: torch.Tensor, label_words: torch.Tensor) -> torch.Tensor:
        """Class logits from the head's output: already the label-word columns, or picked from the vocabulary."""
        if isinstance(self.get_output_embeddings(), LabelWordDecoder):
            return logits
        return logits.index_select(-1, label_words.to(logits.device))

    def _accepts(self, name: str) -> bool:
        """Whether the stock forward names `name` (it may swallow unknown keywords in `**kwargs` and ignore them)."""
        cache = type(self).__dict__.get("_stock_parameters")
        if cache is None:
            cache = frozenset(inspect.signature(super().forward).parameters)
            type(self)._stock_parameters = cache
        return name in cache

    def _refuse_stray_labels(self, label_mode: bool, class_labels, mask_positions, class_index_labels: bool) -> None:
        if not label_mode and (class_labels is not None or mask_positions is not None or class_index_labels):
            raise ValueError(
                "Got `class_labels`/`mask_positions` (or class-index `labels` of shape (batch,)) but the model has no "
                "label words, so it would return full-vocabulary logits and ignore them. Set them first: "
                "model.set_label_word_ids(label_word_ids)."
            )


def align_rows(tensors: dict, attention_mask: torch.Tensor, positions: torch.Tensor | None):
    """Move left-padded rows to the left edge: `tensors` (batch, length[, ...]) and the query positions alike.

    Returns them with the new mask and whether every row now starts at position 0 (False: a row has holes and
    was left where it was)."""
    spans = RowSpans.of(attention_mask)
    if spans is None or spans.left_aligned:
        return tensors, attention_mask, positions, spans is not None
    index, valid = spans.index(attention_mask.shape[1], side="left")
    moved = {name: None if t is None else gather_rows(t, index) for name, t in tensors.items()}
    if positions is not None:
        positions = positions - spans.starts.to(positions.device)
    return moved, valid.to(attention_mask.dtype), positions, True
