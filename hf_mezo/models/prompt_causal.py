"""Prompt causal LMs for MeZO: Llama (SmolLM2), Qwen2, OPT and GPT-2 with a label-word head and their fast paths.

MeZO's headline setting (OPT, `large_models/`): SST-2 as ``"<sentence> It was"``, classified by the next-token
logits of the label words (" terrible" / " great") at the prompt's last token, with a cross-entropy over those
logits (`train_as_classification`). These classes add to the stock ``*ForCausalLM``:

- Label-word head (`set_label_word_ids`): the forward returns class logits (batch × classes) and that loss. The
  final norm and the LM head (for Llama and Qwen2 also the last layer's MLP) run at each row's last prompt token
  only, and the head multiplies only the label-word rows (tied embeddings stay shared: the head reads the same
  Parameter object). The position is `mask_positions`
  when given, else the token before the single label in causal-LM `labels`, else each row's last attended token —
  right or left padding alike.
- Position ids default to counting from each row's first attended token (as `generate` does), so a left-padded row
  sees the positions it would see alone. (Stock Llama, Qwen2 and GPT-2 count from the left edge of the batch.)
- Depth cache (`depth_cache`): the embeddings and decoder layers below the first trainable layer run once per
  distinct example (`hf_mezo.models.depth_cache`, the same cache as the masked LMs). Entries span each row's
  attended tokens, so left and right padding of one example share an entry. Served only for eval-mode (or
  dropout-free) forwards of `input_ids` without a KV cache; on a cache-served forward without label words the
  logits at padded positions are unspecified.
- Shared prefix (`hf_mezo.models.shared_prefix`, on by default, `config.share_prefix`): a token prefix common to
  every row (an instruction, demonstrations) is computed once per forward at batch size 1 and its keys/values
  shared; above the depth-cache cut in every pass, below it once per batch of cache misses. Exact; where it
  cannot be (dropout, sliding windows, other attention kernels, short prefixes, one row) the forward runs unshared.

Module tree and parameter names are the stock class's: stock checkpoints load with no missing or unexpected keys,
and `save_pretrained` writes checkpoints the stock classes load (the label words travel in the config).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM, Qwen2ForCausalLM
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.generic import can_return_tuple

from .depth_cache import cached_frozen_stack
from .label_words import IGNORE_INDEX, class_targets
from .prompt_lm import PromptLMMixin, gathers_parameters
from .shared_prefix import SharedPrefixMixin

# Forward keywords the layer-by-layer path understands; any other non-empty keyword goes to the stock forward.
_DIRECT_KWARGS = frozenset({"use_cache", "return_dict", "logits_to_keep"})


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first attended token (padded positions get 0)."""
    attended = attention_mask.ne(0).long()
    return ((attended.cumsum(dim=1) - 1) * attended).clamp(min=0)


def last_prompt_positions(
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    mask_positions: torch.Tensor | None,
    length: int,
    batch: int,
) -> torch.Tensor:
    """Per row, the position whose next-token logits score the classes (batch,).

    `mask_positions` if given; else, with causal-LM `labels` (-100 except the label word), the position before the
    label; else the last attended position (the last position without an attention mask).
    """
    if mask_positions is not None:
        positions = torch.as_tensor(mask_positions).reshape(-1).long()
        if positions.numel() != batch or not bool(((positions >= 0) & (positions < length)).all()):
            raise ValueError(
                f"mask_positions must hold one position in [0, {length}) per example ({batch}), got "
                f"{positions.tolist()}; for a causal LM it is each row's last prompt token."
            )
        return positions
    if labels is not None:
        where = labels.ne(IGNORE_INDEX)
        counts = where.sum(dim=1)
        first = where.long().argmax(dim=1)
        if not bool((counts == 1).all()) or not bool((first >= 1).all()):
            raise ValueError(
                f"causal-LM labels for the label-word head need exactly one label (≠ -100) per row, after the first "
                f"position (the label word follows the prompt); found {counts.tolist()}. Pass `class_labels` "
                "(and `mask_positions`) instead."
            )
        return first - 1
    if attention_mask is None:
        return torch.full(
            (batch,), length - 1, dtype=torch.long, device=input_ids.device if input_ids is not None else None
        )
    attended = attention_mask.ne(0)
    if not bool(attended.any(dim=1).all()):
        raise ValueError("a row of attention_mask attends to no token: the label-word head has no prompt to score.")
    return (length - 1 - attended.flip(1).long().argmax(dim=1)).long()


class PromptCausalLMMixin(SharedPrefixMixin, PromptLMMixin):
    """The label-word head and the depth cache, for a `transformers` decoder-only LM.

    Constructor arguments as `PromptLMMixin` (`label_word_ids`, `depth_cache_max_bytes`). Extra forward inputs:
    `mask_positions` (batch,): the last prompt token of each row; `class_labels` (batch,) as a keyword (read from
    `**kwargs` so the Trainer does not take it for its label column and skip the evaluation loss).

    A family names its decoder (`_decoder`: the module holding embeddings, layers and final norm) and fills in
    `_stack_layers`, `_embedding_modules`, `_embed`, `_layer_inputs`/`_run_layer` and `_final_norm`.
    """

    _lm_head_name = "lm_head"
    _model_types: tuple[str, ...] = ()  # the `model_type`s whose forward this class reproduces layer by layer
    _sliding_layers = False  # whether it builds sliding-window masks (from `config.layer_types`)

    def _check_family(self) -> None:
        """Refuse a config this class would compute differently from the stock model: another family's checkpoint
        (a Mistral checkpoint loads into `LlamaForPromptCausalLM` without a key error) or attention windows the
        class does not build. The generic `AutoModelForPromptCausalLM` runs that family's own forward."""
        model_type = getattr(self.config, "model_type", None)
        window = getattr(self.config, "sliding_window", None)
        layer_types = getattr(self.config, "layer_types", None) or ()
        sliding = "sliding_attention" in layer_types or (window is not None and not layer_types)
        if model_type not in self._model_types or (sliding and not self._sliding_layers):
            raise ValueError(
                f"{type(self).__name__} reproduces the {'/'.join(self._model_types)} forward layer by layer; this "
                f"config is model_type {model_type!r} (sliding_window={window!r}), which it would compute "
                "differently. Load it with hf_mezo.AutoModelForPromptCausalLM.from_pretrained(path, "
                "label_word_ids=...), which runs the family's own forward."
            )

    def _init_prompt_lm(self, *args, **kwargs) -> None:
        self._check_family()
        super()._init_prompt_lm(*args, **kwargs)

    def _decoder(self) -> nn.Module:
        raise NotImplementedError

    def _embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _layer_inputs(self, hidden, attention_mask, position_ids, masks=None, cache=None) -> dict:
        """What every layer needs besides its hidden states: the causal masks (by layer type) and positions.

        `masks`/`cache` (shared-prefix path): a prepared 4-D mask for every layer, and the KV cache to read/extend.
        """
        if masks is not None:
            return {"masks": {"full_attention": masks}, "position_ids": position_ids, "cache": cache}
        mask_kwargs = {
            "config": self.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "cache": None,
            "position_ids": position_ids,
        }
        masks = {"full_attention": create_causal_mask(**mask_kwargs)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
        return {"masks": masks, "position_ids": position_ids, "cache": cache}

    def _layer_mask(self, inputs: dict, index: int):
        layer_types = getattr(self.config, "layer_types", None)
        return inputs["masks"][layer_types[index] if layer_types else "full_attention"]

    def _run_layer(self, layer: nn.Module, index: int, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        return layer(
            hidden,
            attention_mask=self._layer_mask(inputs, index),
            position_ids=inputs["position_ids"],
            cache=inputs["cache"],
        )

    def _run_layers(self, start: int, stop: int, hidden, attention_mask, position_ids, input_ids=None) -> torch.Tensor:
        if start >= stop:  # everything below the head is cached: no masks or rotary tables to build
            return hidden
        plan = self._shared_prefix_plan(input_ids, attention_mask, position_ids)
        self.shared_prefix_stats["layer_runs"] += 1
        if plan is not None:
            return self._run_layers_shared(start, stop, hidden, position_ids, plan)
        inputs = self._layer_inputs(hidden, attention_mask, position_ids)
        layers = self._stack_layers()
        for index in range(start, stop):
            hidden = self._run_layer(layers[index], index, hidden, inputs)
        return hidden

    # ---- forward -------------------------------------------------------------------------------------------

    def _runs_layer_by_layer(self, input_ids, attention_mask, inputs_embeds, kwargs) -> bool:
        """Whether this call may run the decoder's modules directly (else: the stock model's forward)."""
        if input_ids is None or inputs_embeds is not None:
            return False
        if attention_mask is not None and attention_mask.dim() != 2:
            return False  # a prepared 4-D mask: the stock forward's business
        if kwargs.get("use_cache") or self.config.output_attentions or self.config.output_hidden_states:
            return False
        return not [k for k, v in kwargs.items() if k not in _DIRECT_KWARGS and v is not None and v is not False]

    def _run_last_layer_at(self, layer, index, hidden, inputs, query_positions) -> torch.Tensor:
        """The last layer's output at `query_positions` only (batch, hidden); by default the whole layer, gathered."""
        output = self._run_layer(layer, index, hidden, inputs)
        return output[torch.arange(output.shape[0], device=output.device), query_positions]

    def _hidden_states(self, depth, input_ids, attention_mask, position_ids, query_positions=None) -> torch.Tensor:
        """The last layer's output before the final norm: (batch, length, hidden), or (batch, hidden) at
        `query_positions`. Layers below `depth` come from the depth cache."""

        def run_frozen_stack(input_ids, attention_mask, token_type_ids, position_ids):
            hidden = self._embed(input_ids, position_ids)
            return self._run_layers(0, depth, hidden, attention_mask, position_ids, input_ids)

        if depth:
            hidden = cached_frozen_stack(
                self.depth_cache, run_frozen_stack, input_ids, attention_mask, None, position_ids, trim_leading=True
            )
        else:
            hidden = self._embed(input_ids, position_ids)
        layers = self._stack_layers()
        if query_positions is None:
            return self._run_layers(depth, len(layers), hidden, attention_mask, position_ids, input_ids)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if depth == len(layers):
            return hidden[rows, query_positions]
        if self._shared_prefix_plan(input_ids, attention_mask, position_ids) is not None:
            # The shared-prefix path runs every layer whole: the rows' suffixes attend to the prefix's cached keys
            # and values, so the last layer's MLP-at-the-query shortcut does not apply there.
            hidden = self._run_layers(depth, len(layers), hidden, attention_mask, position_ids, input_ids)
            return hidden[rows, query_positions]
        hidden = self._run_layers(depth, len(layers) - 1, hidden, attention_mask, position_ids, input_ids)
        inputs = self._layer_inputs(hidden, attention_mask, position_ids)
        return self._run_last_layer_at(layers[-1], len(layers) - 1, hidden, inputs, query_positions)

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
            Each row's last prompt token, whose next-token logits score the classes. Default: the token before the
            single label in `labels`, else the last attended token.
        class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*, keyword):
            The class of each example. Default: `labels` if it has shape (batch,) (the causal collator's), else the
            class whose label word causal-LM `labels` (batch, length) hold after the prompt.
        """
        class_labels = kwargs.pop("class_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        label_mode = self.label_word_ids is not None
        class_index_labels = labels is not None and labels.dim() == 1
        if not label_mode and (class_labels is not None or mask_positions is not None or class_index_labels):
            raise ValueError(
                "Got `class_labels`/`mask_positions` (or class-index `labels` of shape (batch,)) but the model has no "
                "label words, so it would return full-vocabulary logits and ignore them. Set them first: "
                "model.set_label_word_ids(label_word_ids)."
            )
        if class_index_labels:  # VerbalizerDataCollator(causal=True): `labels` holds the class of each row
            if class_labels is None:
                class_labels = labels
            labels = None
        reference = input_ids if input_ids is not None else inputs_embeds
        length = reference.shape[1]
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            # With a KV cache (a peft prefix, generation) the mask spans cached + new tokens: keep the new ones'.
            position_ids = positions_from_attention_mask(attention_mask)[:, -length:]
        direct = self._runs_layer_by_layer(input_ids, attention_mask, inputs_embeds, kwargs)
        depth = self._cacheable_depth() if direct else 0
        if not label_mode and depth == 0:
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

        batch = reference.shape[0]
        head = getattr(self, self._lm_head_name)
        positions = None
        if label_mode:
            new_tokens = None if attention_mask is None or attention_mask.dim() != 2 else attention_mask[:, -length:]
            positions = last_prompt_positions(input_ids, new_tokens, labels, mask_positions, length, batch)
            positions = positions.to(reference.device)
        if direct:
            if position_ids is None:
                position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
            hidden = self._hidden_states(depth, input_ids, attention_mask, position_ids, positions)
            if not label_mode:  # the stock head and loss, on the cached decoder's output
                logits = head(self._final_norm(hidden))
                loss = None
                if labels is not None:
                    loss = self.loss_function(logits, labels, self.config.vocab_size)
                return CausalLMOutputWithPast(loss=loss, logits=logits)
        else:
            kwargs.setdefault("use_cache", False)
            if "past_key_values" in kwargs and "cache" not in kwargs:  # peft's name; transformers 5 says `cache`
                kwargs["cache"] = kwargs.pop("past_key_values")
            outputs = self.base_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                return_dict=True,
                **{k: v for k, v in kwargs.items() if k not in ("logits_to_keep", "return_dict")},
            )
            hidden = outputs.last_hidden_state  # the final norm already applied
            positions = positions.to(hidden.device)
            hidden = hidden[torch.arange(batch, device=hidden.device), positions]
        features = self._final_norm(hidden) if direct else hidden  # direct: the final norm at the last token only
        logits, label_words = self._label_word_logits(head, features)
        targets = None
        if class_labels is not None:
            targets = class_targets(label_words, positions, None, class_labels)
        elif labels is not None:  # causal-LM labels: the label word is the token after the prompt
            targets = class_targets(label_words, positions + 1, labels, None)
        loss = self._label_word_loss(logits, targets, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class _RotaryDecoderMixin(PromptCausalLMMixin):
    """Llama-style decoders (`model.embed_tokens`, `model.layers`, `model.rotary_emb`, `model.norm`)."""

    def _decoder(self) -> nn.Module:
        return self.model

    def _stack_layers(self) -> nn.ModuleList:
        return self.model.layers

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.model.embed_tokens, self.model.rotary_emb]

    def _embed(self, input_ids, position_ids):
        return self.model.embed_tokens(input_ids)

    def _layer_inputs(self, hidden, attention_mask, position_ids, masks=None, cache=None) -> dict:
        inputs = super()._layer_inputs(hidden, attention_mask, position_ids, masks, cache)
        inputs["position_embeddings"] = self.model.rotary_emb(hidden, position_ids=position_ids)
        return inputs

    def _run_layer(self, layer, index, hidden, inputs):
        return layer(
            hidden,
            attention_mask=self._layer_mask(inputs, index),
            position_ids=inputs["position_ids"],
            position_embeddings=inputs["position_embeddings"],
            cache=inputs["cache"],
        )

    def _run_last_layer_at(self, layer, index, hidden, inputs, query_positions):
        """The stock decoder layer's forward with its MLP block (and residuals) at `query_positions` only: the
        attention needs every position's keys and values, nothing after it does."""
        if gathers_parameters(layer):  # a sharded layer runs whole
            return super()._run_last_layer_at(layer, index, hidden, inputs, query_positions)
        attended, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden),
            attention_mask=self._layer_mask(inputs, index),
            position_ids=inputs["position_ids"],
            position_embeddings=inputs["position_embeddings"],
        )
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        hidden = hidden[rows, query_positions] + attended[rows, query_positions]
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _final_norm(self, hidden):
        return self.model.norm(hidden)


class LlamaForPromptCausalLM(_RotaryDecoderMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` (Llama, SmolLM2) with a label-word head and a depth cache.

    Checkpoints of other families (Mistral, ...) are refused: use `AutoModelForPromptCausalLM`."""

    _model_types = ("llama",)


class Qwen2ForPromptCausalLM(_RotaryDecoderMixin, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` with a label-word head and a depth cache (sliding-window layers keep their masks)."""

    _model_types = ("qwen2",)
    _sliding_layers = True


class OPTForPromptCausalLM(PromptCausalLMMixin, OPTForCausalLM):
    """`OPTForCausalLM` (the MeZO paper's model) with a label-word head and a depth cache."""

    _model_types = ("opt",)

    def _decoder(self) -> nn.Module:
        return self.model.decoder

    def _stack_layers(self) -> nn.ModuleList:
        return self.model.decoder.layers

    def _embedding_modules(self) -> list[nn.Module]:
        decoder = self.model.decoder
        return [m for m in (decoder.embed_tokens, decoder.embed_positions, decoder.project_in) if m is not None]

    def _embed(self, input_ids, position_ids):
        decoder = self.model.decoder
        embeds = decoder.embed_tokens(input_ids)
        positions = decoder.embed_positions(None, 0, position_ids=position_ids)
        if decoder.project_in is not None:
            embeds = decoder.project_in(embeds)
        return embeds + positions.to(embeds.device)

    def _final_norm(self, hidden):
        decoder = self.model.decoder
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return hidden


class GPT2ForPromptCausalLM(PromptCausalLMMixin, GPT2LMHeadModel):
    """`GPT2LMHeadModel` with a label-word head and a depth cache."""

    _model_types = ("gpt2",)

    def _decoder(self) -> nn.Module:
        return self.transformer

    def _stack_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def _embedding_modules(self) -> list[nn.Module]:
        return [self.transformer.wte, self.transformer.wpe, self.transformer.drop]

    def _embed(self, input_ids, position_ids):
        transformer = self.transformer
        return transformer.drop(transformer.wte(input_ids) + transformer.wpe(position_ids))

    def _final_norm(self, hidden):
        return self.transformer.ln_f(hidden)
