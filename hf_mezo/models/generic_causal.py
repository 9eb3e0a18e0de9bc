"""The generic prompt causal LM: label words (one token or several per class) on any decoder's stock forward.

See `generic` for how the label-word head rides on the stock forward; this module adds what is causal: the
last-prompt-token position (per-row `logits_to_keep`), multi-token words (`multi_token`), the shared prefix
(`generic_shared_prefix`) and causal-LM labels.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

from .generic import GenericPromptLMMixin, align_rows
from .generic_shared_prefix import shared_prefix_forward
from .label_words import class_targets, is_multi_token
from .multi_token import multi_token_scores
from .prompt_causal import last_prompt_positions, positions_from_attention_mask
from .prompt_lm import _drops_layers, _drops_out, gathers_parameters
from .shared_prefix import DEFAULT_MIN_TOKENS, SharedPrefix, SharedPrefixMixin, find_shared_prefix


class GenericPromptCausalLMMixin(SharedPrefixMixin, GenericPromptLMMixin):
    """A `transformers` causal LM with label words (one token or several per class) through its stock forward.

    Speed-ups (single-token words, `input_ids` forwards): the depth cache where the family table locates the layers
    and the bottom layers are frozen; the shared prefix (`generic_shared_prefix`; `config.share_prefix`,
    `config.share_prefix_min_tokens` as for the family classes) in forwards the depth cache does not serve, including
    those that fill it.

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
                tensors, attention_mask, positions, aligned = align_rows(
                    {"input_ids": input_ids, "inputs_embeds": inputs_embeds}, attention_mask, positions
                )
                input_ids, inputs_embeds = tensors["input_ids"], tensors["inputs_embeds"]
            direct = inputs_embeds is None and self._runs_direct(input_ids, attention_mask, aligned, kwargs)
            depth = self._generic_depth(direct)
            plan = self._shared_prefix_plan(input_ids, attention_mask, positions) if direct else None
            label_words = self._label_word_tensor(reference.device)
            depth_cached = self._depth_cached(depth, input_ids, attention_mask, plan=plan)
            with self._label_word_head(label_words), depth_cached as served:
                if direct:  # served frozen layers leave the KV cache incomplete: then the top layers run unshared
                    plan = None if served else plan
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
