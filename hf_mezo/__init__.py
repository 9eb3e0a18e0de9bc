"""hf_mezo: zeroth-order (MeZO) fine-tuning as a drop-in extension of the Hugging Face Trainer."""

from .adapters import MEZO_PAPER_SETTINGS, init_prefix_from_tokens, lora_config_for_mezo, prefix_config_for_mezo
from .config import MeZOConfig, ZerothOrderArguments
from .data import load_sst2
from .metrics import build_compute_metrics, load_sst2_metric
from .models import (
    AutoModelForPromptCausalLM,
    AutoModelForPromptMaskedLM,
    BertForPromptMaskedLM,
    GPT2ForPromptCausalLM,
    LlamaForPromptCausalLM,
    OPTForPromptCausalLM,
    Qwen2ForPromptCausalLM,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
    freeze_all_but_top_layers,
)
from .objectives import generation_objective, negative_accuracy, negative_f1, token_f1
from .optimizer import ZerothOrderSGD
from .perturbation import PerturbationError, perturbed, perturbed_forward
from .precision import float32_logits
from .prompting import CausalPromptTemplate, PromptTemplate, Verbalizer, VerbalizerDataCollator
from .seed_log import SeedLogError, load_seed_log, replay_seed_log, write_seed_log_dir
from .seq2seq import MeZOSeq2SeqConfig, MeZOSeq2SeqTrainer
from .trainer import MeZOMixin, MeZOTrainer

__all__ = ["MeZOConfig", "MeZOTrainer", "PerturbationError", "ZerothOrderSGD", "perturbed", "perturbed_forward"]
__all__ += [
    "CausalPromptTemplate",
    "PromptTemplate",
    "Verbalizer",
    "VerbalizerDataCollator",
    "build_compute_metrics",
    "load_sst2",
    "load_sst2_metric",
]
__all__ += [
    "AutoModelForPromptCausalLM",
    "AutoModelForPromptMaskedLM",
    "BertForPromptMaskedLM",
    "GPT2ForPromptCausalLM",
    "LlamaForPromptCausalLM",
    "OPTForPromptCausalLM",
    "Qwen2ForPromptCausalLM",
    "RobertaForPromptMaskedLM",
    "XLMRobertaForPromptMaskedLM",
    "freeze_all_but_top_layers",
]
__all__ += [
    "MEZO_PAPER_SETTINGS",
    "float32_logits",
    "generation_objective",
    "init_prefix_from_tokens",
    "lora_config_for_mezo",
    "negative_accuracy",
    "negative_f1",
    "prefix_config_for_mezo",
    "token_f1",
]
__all__ += ["SeedLogError", "load_seed_log", "replay_seed_log", "write_seed_log_dir"]
__all__ += ["MeZOMixin", "ZerothOrderArguments", "MeZOSeq2SeqConfig", "MeZOSeq2SeqTrainer"]
__all__ += ["MeZOSFTConfig", "MeZOSFTTrainer"]
__version__ = "0.1.0"

_NEEDS_TRL = {"MeZOSFTConfig", "MeZOSFTTrainer"}


def __getattr__(name: str):
    # TRL is optional (hf_mezo[trl]): hf_mezo.sft, which imports it, loads on first use of its names.
    if name in _NEEDS_TRL:
        from . import sft

        return getattr(sft, name)
    raise AttributeError(f"module 'hf_mezo' has no attribute {name!r}")
