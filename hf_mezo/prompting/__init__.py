"""Prompt-based classification with a masked LM: template, verbalizer, and the collator joining them."""

from .collator import VerbalizerDataCollator
from .template import PromptEncoding, PromptTemplate
from .verbalizer import Verbalizer

__all__ = ["PromptEncoding", "PromptTemplate", "Verbalizer", "VerbalizerDataCollator"]
