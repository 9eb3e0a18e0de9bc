"""`AutoModelForPromptCausalLM` / `AutoModelForPromptMaskedLM`: a prompt LM for any `transformers` family.

Like `transformers`' Auto classes they are factories, never instantiated: `from_pretrained` (and `from_config`)
resolve the stock class the config names (`AutoModelForCausalLM` / `AutoModelForMaskedLM`'s own mapping) and build
a subclass of it with the generic label-word mixin (`generic`) in front. The subclass adds no module and renames no
parameter, so stock checkpoints load with no missing or unexpected keys, `save_pretrained` writes checkpoints the
stock classes load, and the label words travel in the config (`label_word_ids`, `mask_token_id`).

`from_model` turns a stock model already built (a tiny test model, a model another library loaded) into its prompt
subclass in place: the same object and Parameters, its class swapped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.auto_factory import _get_model_class

from .depth_cache import DEFAULT_MAX_BYTES
from .generic import GenericPromptLMMixin
from .generic_causal import GenericPromptCausalLMMixin
from .generic_masked import GenericPromptMaskedLMMixin
from .prompt_lm import PromptLMMixin

_PROMPT_CLASSES: dict[tuple[type, type], type] = {}


def prompt_class(stock_class: type[PreTrainedModel], mixin: type[GenericPromptLMMixin]) -> type:
    """The prompt subclass of `stock_class` (built once, registered in this module so pickling finds it)."""
    key = (stock_class, mixin)
    if key not in _PROMPT_CLASSES:
        name = f"{stock_class.__name__}{_SUFFIX}"
        cls = type(name, (mixin, stock_class), {"__module__": __name__, "__doc__": mixin.__doc__})
        _PROMPT_CLASSES[key] = cls
        globals()[name] = cls
    return _PROMPT_CLASSES[key]


_SUFFIX = "WithLabelWords"


def __getattr__(name: str) -> type:
    # A prompt subclass by name in a process that has not built it yet (unpickling): build it now.
    import transformers

    stock_class = getattr(transformers, name[: -len(_SUFFIX)], None) if name.endswith(_SUFFIX) else None
    for auto in (AutoModelForPromptCausalLM, AutoModelForPromptMaskedLM):
        stock_classes = auto._stock_auto._model_mapping.values()
        if any(stock_class in (c if isinstance(c, tuple) else (c,)) for c in stock_classes):
            return prompt_class(stock_class, auto._mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _AutoPromptLM:
    """Factory methods shared by the two Auto prompt classes."""

    _stock_auto: type  # AutoModelForCausalLM or AutoModelForMaskedLM: whose mapping names the stock class
    _mixin: type[GenericPromptLMMixin]

    def __init__(self, *args, **kwargs):
        raise OSError(
            f"{type(self).__name__} is a factory: use {type(self).__name__}.from_pretrained(path, label_word_ids=...), "
            ".from_config(config, ...) or .from_model(stock_model, ...)."
        )

    @classmethod
    def prompt_class_for(cls, config: PretrainedConfig) -> type:
        """The prompt subclass for `config`'s stock class."""
        mapping = cls._stock_auto._model_mapping
        if type(config) not in mapping:
            raise ValueError(
                f"{cls.__name__}: {type(config).__name__} (model_type {config.model_type!r}) has no "
                f"{cls._stock_auto.__name__} class in transformers; "
                f"{'use AutoModelForPromptMaskedLM for an encoder' if cls._stock_auto is AutoModelForCausalLM else 'use AutoModelForPromptCausalLM for a decoder'}."
            )
        return prompt_class(_get_model_class(config, mapping), cls._mixin)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args,
        label_word_ids: Sequence | None = None,
        mask_token_id: int | None = None,
        depth_cache_max_bytes: int = DEFAULT_MAX_BYTES,
        **kwargs,
    ) -> PreTrainedModel:
        """The stock checkpoint at `pretrained_model_name_or_path` in its prompt subclass (kwargs: the stock ones)."""
        config = kwargs.pop("config", None)
        if config is None:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "trust_remote_code") if k in kwargs}
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        loaded = cls.prompt_class_for(config).from_pretrained(
            pretrained_model_name_or_path, *model_args, config=config, **kwargs
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model._init_prompt_lm(label_word_ids, mask_token_id, depth_cache_max_bytes)
        return loaded

    @classmethod
    def from_config(
        cls,
        config: PretrainedConfig,
        *,
        label_word_ids: Sequence | None = None,
        mask_token_id: int | None = None,
        depth_cache_max_bytes: int = DEFAULT_MAX_BYTES,
        **kwargs,
    ) -> PreTrainedModel:
        """A freshly initialized model for `config` (kwargs as `AutoModel.from_config`: dtype, attn_implementation)."""
        return cls.prompt_class_for(config)._from_config(
            config,
            label_word_ids=label_word_ids,
            mask_token_id=mask_token_id,
            depth_cache_max_bytes=depth_cache_max_bytes,
            **kwargs,
        )

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        *,
        label_word_ids: Sequence | None = None,
        mask_token_id: int | None = None,
        depth_cache_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> PreTrainedModel:
        """`model` (a stock `*ForCausalLM` / `*ForMaskedLM`) turned into its prompt subclass in place; returned."""
        if isinstance(model, PromptLMMixin):
            raise TypeError(
                f"{type(model).__name__} is already a prompt LM; set its label words with model.set_label_word_ids()."
            )
        if not isinstance(model, PreTrainedModel) or not isinstance(model, nn.Module):
            raise TypeError(
                f"{cls.__name__}.from_model takes a transformers model, got {type(model).__name__}; for a peft model "
                "wrap its base model first, then add the adapter."
            )
        expected = (
            _get_model_class(model.config, cls._stock_auto._model_mapping)
            if type(model.config) in cls._stock_auto._model_mapping
            else None
        )
        if expected is None or not isinstance(model, expected):
            raise TypeError(
                f"{cls.__name__}.from_model takes the stock {cls._stock_auto.__name__} class of its config "
                f"({getattr(expected, '__name__', 'none')}), got {type(model).__name__}."
            )
        model.__class__ = prompt_class(type(model), cls._mixin)
        model._init_prompt_lm(label_word_ids, mask_token_id, depth_cache_max_bytes)
        return model


class AutoModelForPromptCausalLM(_AutoPromptLM):
    """A prompt causal LM for any `transformers` family: the stock `AutoModelForCausalLM` class plus label words.

    `from_pretrained(path, label_word_ids=..., **stock_kwargs)`, `from_config(config, label_word_ids=...)`,
    `from_model(stock_model, label_word_ids=...)`. A label word is one token id, or a list of ids for a word the
    tokenizer splits (scored by its mean token log-probability, `hf_mezo.models.multi_token`). The forward returns
    class logits (batch × classes) and the cross-entropy over them; see `GenericPromptCausalLMMixin.forward`.
    """

    _stock_auto = AutoModelForCausalLM
    _mixin = GenericPromptCausalLMMixin


class AutoModelForPromptMaskedLM(_AutoPromptLM):
    """A prompt masked LM for any `transformers` family: the stock `AutoModelForMaskedLM` class plus label words.

    `from_pretrained(path, label_word_ids=..., mask_token_id=..., **stock_kwargs)`, `from_config(...)`,
    `from_model(...)`. Label words are single tokens (one vocabulary id per class, scored at the mask).
    """

    _stock_auto = AutoModelForMaskedLM
    _mixin = GenericPromptMaskedLMMixin
