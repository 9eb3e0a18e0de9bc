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
two. What only the family classes (`LlamaForPromptCausalLM`, `RobertaForPromptMaskedLM`, ...) do: the depth cache
and the shared prefix in the same forward.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MaskedLMOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import logging
from transformers.utils.generic import can_return_tuple

from .alignment import RowSpans, gather_rows
from .families import FAMILY_LAYOUTS, family_layout, modules_before
from .generic_depth_cache import cached_frozen_layers
from .generic_shared_prefix import shared_prefix_forward
from .label_words import LabelWordDecoder, class_targets, find_mask_positions, is_multi_token
from .multi_token import multi_token_scores
from .prompt_causal import last_prompt_positions, positions_from_attention_mask
from .prompt_lm import PromptLMMixin, _drops_layers, _drops_out, gathers_parameters
from .query_layer import last_layer_at
from .shared_prefix import DEFAULT_MIN_TOKENS, SharedPrefix, SharedPrefixMixin, find_shared_prefix

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

    def _depth_cached(self, depth: int, input_ids, attention_mask, token_type_ids=None):
        """A context serving the frozen bottom layers (below `depth`) of this forward from the depth cache."""
        if depth == 0:
            return contextlib.nullcontext()
        return cached_frozen_layers(
            self, self.depth_cache, self._stack_layers(), depth, input_ids, attention_mask, token_type_ids
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


def _align(tensors: dict, attention_mask: torch.Tensor, positions: torch.Tensor | None):
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


class GenericPromptCausalLMMixin(SharedPrefixMixin, GenericPromptLMMixin):
    """A `transformers` causal LM with label words (one token or several per class) through its stock forward.

    Speed-ups (single-token words, `input_ids` forwards): the depth cache where the family table locates the layers
    and the bottom layers are frozen; otherwise the shared prefix (`generic_shared_prefix`; `config.share_prefix`,
    `config.share_prefix_min_tokens` as for the family classes).

    Extra forward inputs: `mask_positions` (batch,): each row's last prompt token (default: the token before the
    single label in causal-LM `labels`, else the last attended token); `class_labels` (batch,) as a keyword, or
    class-index `labels` (batch,) as `VerbalizerDataCollator(causal=True)` returns them.
    """

    _multi_token_label_words = True

    def _shared_prefix_plan(self, input_ids, attention_mask, query_positions) -> SharedPrefix | None:
        """The batch's common prefix, or None when sharing is off or could not be exact (the unshared forward runs)."""
        if not self.share_prefix or input_ids.shape[0] < 2:
            return None
        if gathers_parameters(self):
            return None  # sharded (FSDP, ZeRO-3): every rank must run the same forwards, whatever its batch
        if self.training and (any(_drops_out(m) for m in self.modules()) or _drops_layers(self)):
            return None  # each row would draw its own dropout masks on the prefix
        if self.training and torch.is_grad_enabled() and self.is_gradient_checkpointing:
            return None  # checkpointed layers drop the KV cache
        min_tokens = getattr(self.config, "share_prefix_min_tokens", DEFAULT_MIN_TOKENS)
        plan = find_shared_prefix(input_ids, attention_mask, None, min_tokens)
        if plan is None or not bool((query_positions >= plan.length).all()):
            return None
        return plan

    def _shared_or_unshared(self, input_ids, attention_mask, query_positions, plan, depth, kwargs) -> torch.Tensor:
        """Logits at the query positions (batch, 1, ...): through the shared prefix where `plan` is set, else with the
        last layer at the query positions where the family table has a recipe for it."""
        stats = self.shared_prefix_stats
        stats["layer_runs"] += 1
        if plan is not None:
            forward_kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}
            logits = shared_prefix_forward(
                lambda **inputs: self._stock_forward(**inputs, **forward_kwargs), input_ids, query_positions, plan
            )
            if logits is not None:
                stats["shared_layer_runs"] += 1
                stats["shared_tokens"] += plan.length
                stats["last_shared_tokens"] = plan.length
                stats["saved_token_layers"] += (plan.batch - 1) * plan.length * self.config.num_hidden_layers
                return logits
        with self._last_layer_at(True, depth, query_positions):
            out = self._stock_forward(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=query_positions[:, None], **kwargs
            )
        return out.logits

    def _stock_forward(self, **kwargs):
        """The stock forward; `logits_to_keep` sliced here for a family whose forward does not take it."""
        keep = kwargs.pop("logits_to_keep", 0)
        if "past_key_values" in kwargs and "cache" not in kwargs and self._accepts("cache"):
            kwargs["cache"] = kwargs.pop("past_key_values")  # peft's name; transformers 5 says `cache`
        if self._accepts("logits_to_keep"):
            return super().forward(logits_to_keep=keep, **kwargs)
        out = super().forward(**kwargs)
        out.logits = slice_logits_to_keep(out.logits, keep)
        return out

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""The stock causal-LM forward, or with label words: class logits (batch × classes) and the label-word loss.

        mask_positions (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Each row's last prompt token, whose next-token distribution scores the classes.
        class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*, keyword):
            The class of each example. Default: `labels` if it has shape (batch,), else the class whose label word
            causal-LM `labels` (batch, length) hold after the prompt (single-token words).
        """
        class_labels = kwargs.pop("class_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        label_mode = self.label_word_ids is not None
        class_index_labels = labels is not None and labels.dim() == 1
        self._refuse_stray_labels(label_mode, class_labels, mask_positions, class_index_labels)
        if not label_mode:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                **kwargs,
            )
        if class_index_labels:
            class_labels, labels = (labels if class_labels is None else class_labels), None
        multi_token = is_multi_token(self.label_word_ids)
        if multi_token and labels is not None:
            raise ValueError(
                "causal-LM `labels` (batch, length) mark one label-word token; with multi-token label words pass the "
                "class of each row instead (`class_labels`, or class-index `labels` of shape (batch,) as "
                "VerbalizerDataCollator(causal=True) returns them)."
            )
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        new_tokens = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask[:, -length:]
        positions = last_prompt_positions(input_ids, new_tokens, labels, mask_positions, length, batch)
        positions = positions.to(reference.device)
        targets = None  # read before the rows move (`_align`): causal-LM labels hold the word after the prompt
        if class_labels is not None:
            targets = torch.as_tensor(class_labels, device=reference.device).reshape(-1).long()
        elif labels is not None:
            targets = class_targets(self._label_word_tensor(labels.device), positions + 1, labels, None)
        kwargs.pop("logits_to_keep", None)
        kwargs.setdefault("use_cache", False)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))

        if multi_token:
            if cache is not None or inputs_embeds is not None or position_ids is not None:
                raise ValueError(
                    "multi-token label words are scored from `input_ids` and the model's own positions; drop "
                    "`cache`/`past_key_values`, `inputs_embeds` and `position_ids` (or use single-token words)."
                )
            words = [[w] if isinstance(w, int) else w for w in self.label_word_ids]
            forward_kwargs = {k: v for k, v in kwargs.items() if k != "use_cache"}

            def run(**inputs):
                return self._stock_forward(**inputs, **forward_kwargs)

            logits = multi_token_scores(
                run, input_ids, new_tokens, positions, words, share_prompt=self._accepts("position_ids")
            )
        else:
            aligned = attention_mask is None and cache is None and position_ids is None
            if cache is not None and position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
                # A KV cache before the rows (a peft prefix): keep the rows, count positions from their first token.
                position_ids = positions_from_attention_mask(attention_mask)[:, -length:]
            elif position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
                tensors, attention_mask, positions, aligned = _align(
                    {"input_ids": input_ids, "inputs_embeds": inputs_embeds}, attention_mask, positions
                )
                input_ids, inputs_embeds = tensors["input_ids"], tensors["inputs_embeds"]
            direct = inputs_embeds is None and self._runs_direct(input_ids, attention_mask, aligned, kwargs)
            depth = self._generic_depth(direct)
            plan = self._shared_prefix_plan(input_ids, attention_mask, positions) if direct and not depth else None
            label_words = self._label_word_tensor(reference.device)
            with self._label_word_head(label_words), self._depth_cached(depth, input_ids, attention_mask):
                if direct:
                    logits = self._shared_or_unshared(input_ids, attention_mask, positions, plan, depth, kwargs)
                else:
                    logits = self._stock_forward(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        position_ids=position_ids,
                        inputs_embeds=inputs_embeds,
                        logits_to_keep=positions[:, None],
                        **kwargs,
                    ).logits
            logits = self._columns(logits[:, 0], label_words)
        loss = self._label_word_loss(logits, targets, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


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
            tensors, attention_mask, positions, aligned = _align(
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
