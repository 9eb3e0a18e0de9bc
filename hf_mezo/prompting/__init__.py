"""Prompt-based classification with a masked or causal LM: template, verbalizer, and the collator joining them."""

from .collator import VerbalizerDataCollator
from .template import CausalPromptTemplate, PromptEncoding, PromptTemplate
from .verbalizer import Verbalizer

__all__ = ["CausalPromptTemplate", "PromptEncoding", "PromptTemplate", "Verbalizer", "VerbalizerDataCollator"]
