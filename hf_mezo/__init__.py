"""hf_mezo: zeroth-order (MeZO) fine-tuning as a drop-in extension of the Hugging Face Trainer."""

from .config import MeZOConfig
from .models import (
    BertForPromptMaskedLM,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
    freeze_all_but_top_layers,
)
from .optimizer import ZerothOrderSGD
from .perturbation import perturbed_forward
from .trainer import MeZOTrainer

__all__ = ["MeZOConfig", "MeZOTrainer", "ZerothOrderSGD", "perturbed_forward"]
__all__ += [
    "BertForPromptMaskedLM",
    "RobertaForPromptMaskedLM",
    "XLMRobertaForPromptMaskedLM",
    "freeze_all_but_top_layers",
]
__version__ = "0.1.0"
