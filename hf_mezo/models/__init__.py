"""Prompt LMs for MeZO (masked and causal): label words on any family's stock forward (`AutoModelForPrompt*`), and
the family classes with an exact cache of the frozen bottom layers and a shared prompt prefix."""

from .auto import AutoModelForPromptCausalLM, AutoModelForPromptMaskedLM
from .depth_cache import DepthCache
from .freezing import encoder_layers, freeze_all_but_top_layers
from .generic_causal import GenericPromptCausalLMMixin
from .generic_masked import GenericPromptMaskedLMMixin
from .label_words import LabelWordDecoder
from .prompt_causal import (
    GPT2ForPromptCausalLM,
    LlamaForPromptCausalLM,
    OPTForPromptCausalLM,
    PromptCausalLMMixin,
    Qwen2ForPromptCausalLM,
)
from .prompt_lm import PromptLMMixin
from .prompt_mlm import (
    BertForPromptMaskedLM,
    PromptMaskedLMMixin,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
)
from .shared_prefix import SharedPrefix, SharedPrefixMixin, find_shared_prefix

__all__ = [
    "AutoModelForPromptCausalLM",
    "AutoModelForPromptMaskedLM",
    "BertForPromptMaskedLM",
    "DepthCache",
    "GPT2ForPromptCausalLM",
    "GenericPromptCausalLMMixin",
    "GenericPromptMaskedLMMixin",
    "LabelWordDecoder",
    "LlamaForPromptCausalLM",
    "OPTForPromptCausalLM",
    "PromptCausalLMMixin",
    "PromptLMMixin",
    "PromptMaskedLMMixin",
    "Qwen2ForPromptCausalLM",
    "RobertaForPromptMaskedLM",
    "SharedPrefix",
    "SharedPrefixMixin",
    "XLMRobertaForPromptMaskedLM",
    "encoder_layers",
    "find_shared_prefix",
    "freeze_all_but_top_layers",
]
