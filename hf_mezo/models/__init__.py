"""Prompt masked LMs for MeZO: a label-word head at the mask and an exact cache of the frozen bottom layers."""

from .depth_cache import DepthCache
from .freezing import encoder_layers, freeze_all_but_top_layers
from .label_words import LabelWordDecoder
from .prompt_mlm import (
    BertForPromptMaskedLM,
    PromptMaskedLMMixin,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
)

__all__ = [
    "BertForPromptMaskedLM",
    "DepthCache",
    "LabelWordDecoder",
    "PromptMaskedLMMixin",
    "RobertaForPromptMaskedLM",
    "XLMRobertaForPromptMaskedLM",
    "encoder_layers",
    "freeze_all_but_top_layers",
]
