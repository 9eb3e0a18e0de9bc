"""`MeZOSFTTrainer`: TRL's `SFTTrainer` trained with MeZO; `MeZOSFTConfig` = `SFTConfig` + the `zo_*` fields.

Needs `trl` (`pip install hf_mezo[trl]`); `import hf_mezo` does not import this module until one of
its names is used.

What the two perturbed passes evaluate is `SFTTrainer.compute_loss` itself: its completion-only or
assistant-only masking, packing and padding-free batches, `loss_type`, `compute_loss_func`. Two
things need care:

- The fused LM head. `SFTTrainer` patches the model's `forward` (`trl.trainer.utils.add_fused_lm_head`)
  so that `model(..., fused_lm_head=True)` projects through `lm_head.weight` in chunks with its own
  kernel, reading the weight inside the causal LM's forward rather than the head module's, in
  float32 whatever the model's dtype. A module-scoped perturbation misses that read (the tied
  embedding's hook restores the weight before the head reads it; an untied head is never perturbed),
  and float32 rounding would swamp L₊ − L₋ of a float64 model. `MeZOSFTTrainer` answers the same
  call from the model's own forward instead (`scope_fused_lm_head`): the head runs as a module, on
  the positions that have a target only (`logits_to_keep`), in the model's precision (float32 for
  bf16/fp16 weights, `zo_float32_logits`), and the per-token fields SFTTrainer reads are computed
  from those logits. The kernel's point, not storing the logits for the backward pass, does not
  arise: MeZO has no backward pass.
- Gradient accumulation. `SFTTrainer` divides the summed token losses by `num_items_in_batch` (the
  step's token count, across processes with `average_tokens_across_devices`); each micro-batch's
  loss is then already its share of the step's mean, and MeZO uses it as it is.

Its `mean_token_accuracy`/`entropy`/`num_tokens` metrics are logged once per micro-batch (the mean of
the perturbed passes), not once per pass.
"""

from __future__ import annotations

import functools
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import is_peft_available

from .config import ZerothOrderArguments
from .label_words import IGNORE_INDEX
from .trainer import MeZOMixin

try:
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "hf_mezo.MeZOSFTTrainer needs TRL: `pip install hf_mezo[trl]` (or `pip install trl`)."
    ) from error


@dataclass
class MeZOSFTConfig(ZerothOrderArguments, SFTConfig):
    """Arguments for `MeZOSFTTrainer`: everything `trl.SFTConfig` has, plus the `zo_*` fields
    (`ZerothOrderArguments`). Works with `HfArgumentParser` / `trl.TrlParser`."""


def _patched_module(model: nn.Module) -> nn.Module:
    """The module whose `forward` `SFTTrainer` replaced with the fused-head one (the base model under peft)."""
    if is_peft_available():
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    return model


def scope_fused_lm_head(module: nn.Module) -> None:
    """Re-patch the causal LM `SFTTrainer` patched: its fused-head call answered by the model's own forward.

    `fused_lm_head=False` (generation, plain calls) goes to the forward TRL installed, which calls the
    original. `fused_lm_head=True` returns TRL's `FusedCausalLMOutput` (log_probs, entropy, is_top1,
    label_mask: zero where the label is -100; loss = −Σ log_probs / num_items_in_batch), computed from
    the logits of the model's own forward, where the LM head runs as a module and so sees MeZO's
    perturbation. A bound method like TRL's, so that Accelerate's autocast wrapping rebinds it.
    """
    trl_forward = vars(module)["forward"].__func__
    model_forward = type(module).forward

    @functools.wraps(model_forward)  # `generate` validates its kwargs against the signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return trl_forward(
                self, *args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch, **kwargs
            )
        targets = labels[:, 1:] if shift_labels is None else shift_labels  # logits[:, t] predicts targets[:, t]
        mask = targets != IGNORE_INDEX
        positions = mask.any(0).nonzero().flatten()  # logits only where some row has a target
        kwargs["use_cache"] = False
        outputs = model_forward(self, *args, logits_to_keep=positions, **kwargs)
        logits = outputs.logits
        kept_targets, kept_mask = targets[:, positions].to(logits.device), mask[:, positions].to(logits.device)
        log_softmax = logits.log_softmax(-1)
        picked = log_softmax.gather(-1, kept_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        is_top1 = logits.argmax(-1) == kept_targets

        def scatter(values: torch.Tensor) -> torch.Tensor:
            full = values.new_zeros(mask.shape)
            full[:, positions] = values.masked_fill(~kept_mask, 0)
            return full

        log_probs = scatter(picked)
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = getattr(outputs, "aux_loss", None) if kwargs.get("output_router_logits") else None
        if aux_loss is not None:
            loss = loss + getattr(self.config.get_text_config(), "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=scatter(entropy),
            is_top1=scatter(is_top1),
            label_mask=mask,
            aux_loss=aux_loss,
        )

    module.forward = types.MethodType(forward, module)


class MeZOSFTTrainer(MeZOMixin, SFTTrainer):
    """TRL's `SFTTrainer` with MeZO's zeroth-order step; same arguments as `SFTTrainer`, plus `objective=`.

    Pass a `MeZOSFTConfig` (a plain `SFTConfig` gets the paper's MeZO defaults). To MeZO-train your own
    `SFTTrainer` subclass, put this class first: `class MyMeZO(MeZOSFTTrainer, MySFTTrainer)`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled:
            raise ValueError(
                "MeZOSFTTrainer does not support FSDP yet (its exactness is verified unsharded and data-parallel "
                "only). Use data parallelism (accelerate_configs/multi_gpu.yaml), or MeZOTrainer with FSDP."
            )
        patched = _patched_module(self.model)
        if "forward" in vars(patched):  # the fused-head forward TRL installed on the instance
            scope_fused_lm_head(patched)

    def _micro_batch_weight(self, inputs: dict[str, Any], num_items_in_batch) -> tuple[float, Any]:
        # SFTTrainer.compute_loss normalizes by the step's token count itself when given it.
        if num_items_in_batch is not None:
            return 1.0, num_items_in_batch
        return super()._micro_batch_weight(inputs, num_items_in_batch)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        # The passes run in eval mode (dropout off), so SFTTrainer.compute_loss files their metrics under "eval",
        # once per pass. Collect them aside and log them under "train", once for the micro-batch.
        eval_metrics, passes = self._metrics["eval"], defaultdict(list)
        self._metrics["eval"] = passes
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._metrics["eval"] = eval_metrics
        train = self._metrics["train"]
        for key, values in passes.items():
            if key != "num_tokens" and values:
                train[key].append(sum(values) / len(values))
        if passes:
            self._total_train_tokens += self._count_tokens(inputs) // self._tp_size
        train["num_tokens"] = [self._total_train_tokens]
        return loss

    def _count_tokens(self, inputs: dict[str, Any]) -> int:
        """The micro-batch's input tokens across processes, counted as SFTTrainer.compute_loss counts them."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:  # padding-free: one packed row
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:
            return 0
        return int(self.accelerator.gather_for_metrics(local.to(self.args.device)).sum().item())
