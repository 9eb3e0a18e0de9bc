"""MeZO with `peft` adapters: LoRA and prefix tuning with the MeZO paper's settings.

MeZO composes with parameter-efficient tuning without any glue: `peft` freezes the base model and
marks only the adapter parameters trainable, `MeZOTrainer` perturbs and updates exactly the
parameters with `requires_grad=True`, and the Trainer saves a `PeftModel` the peft way
(`adapter_config.json` + `adapter_model.safetensors`), to be loaded back with
`PeftModel.from_pretrained(base_model, output_dir)`.

    model = get_peft_model(AutoModelForMaskedLM.from_pretrained("roberta-large"), lora_config_for_mezo())
    args = MeZOConfig(output_dir="out", **MEZO_PAPER_SETTINGS["lora"], ...)
    MeZOTrainer(model=model, args=args, ...).train()

The MeZO paper's settings (RoBERTa-large, prompt-based fine-tuning, k = 16/512; Malladi et al., 2023):

| method          | adapter                     | learning rate               | ε    |
|-----------------|-----------------------------|-----------------------------|------|
| MeZO (full)     | —                           | 1e-6 (1e-7 some tasks)      | 1e-3 |
| MeZO + LoRA     | r = 8, α = 16, query/value  | 1e-4 (5e-5 some tasks)      | 1e-3 |
| MeZO + prefix   | 5 virtual tokens            | 1e-2                        | 1e-1 |

The perturbation reaches every adapter parameter: LoRA's `lora_A`/`lora_B` linears run inside the
wrapped layer, LoRA-on-embedding's `lora_embedding_A/B` (held in a `ParameterDict`) are perturbed by
the embedding layer that reads them, and prefix tuning's `prompt_encoder.<adapter>.embedding` (plus
its MLP with `prefix_projection=True`) runs inside the `PeftModel`'s forward.

peft 0.21 on `RobertaForMaskedLM`: LoRA works with `task_type=None` or "FEATURE_EXTRACTION"; prefix
tuning needs "FEATURE_EXTRACTION" (`task_type=None` raises a `KeyError`), so that is the default here.
Prefix tuning in the paper starts from the key/value activations of real tokens rather than peft's
N(0, 1) rows; `init_prefix_from_tokens` does that for decoders (through their cache) and BERT-family
encoders, whatever head the model has (a label-word head included).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig
from torch import nn

# Learning rate and ε of each method in the MeZO paper, as `MeZOConfig` keyword arguments.
MEZO_PAPER_SETTINGS: dict[str, dict[str, float]] = {
    "full": {"learning_rate": 1e-6, "zo_eps": 1e-3},
    "lora": {"learning_rate": 1e-4, "zo_eps": 1e-3},
    "prefix": {"learning_rate": 1e-2, "zo_eps": 1e-1},
}


def lora_config_for_mezo(
    r: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | str | None = None,
    task_type: str | None = "FEATURE_EXTRACTION",
    **kwargs: Any,
) -> LoraConfig:
    """A `LoraConfig` with the MeZO paper's LoRA: r = 8, α = 16, on the attention query and value.

    `target_modules=None` lets peft pick the query/value projections for the model type ("query",
    "value" for RoBERTa; "q_proj", "v_proj" for OPT/Llama). LoRA dropout defaults to 0: MeZO runs its
    passes with dropout off, so a dropout rate would only matter to a backprop baseline.
    """
    if r < 1:
        raise ValueError(f"LoRA rank r must be ≥ 1, got {r!r}; the MeZO paper uses r=8.")
    kwargs.setdefault("lora_dropout", 0.0)
    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
        task_type=task_type,
        **kwargs,
    )


def prefix_config_for_mezo(
    num_virtual_tokens: int = 5, task_type: str = "FEATURE_EXTRACTION", **kwargs: Any
) -> PrefixTuningConfig:
    """A `PrefixTuningConfig` with the MeZO paper's prefix: 5 virtual tokens of keys and values per layer.

    `task_type` must be set (peft 0.21 raises a `KeyError` for `None`); "FEATURE_EXTRACTION" keeps the
    base model's own head and loss, e.g. `RobertaForMaskedLM`'s.
    """
    if num_virtual_tokens < 1:
        raise ValueError(f"num_virtual_tokens must be ≥ 1, got {num_virtual_tokens!r}; the MeZO paper uses 5.")
    if task_type is None:
        raise ValueError('prefix tuning needs a task_type (peft raises KeyError for None); use "FEATURE_EXTRACTION".')
    return PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type=task_type, **kwargs)


def _key_value_projections(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(key, value) linears of each self-attention layer, bottom to top (BERT-family names)."""
    pairs = []
    for module in model.modules():
        key, value = getattr(module, "key", None), getattr(module, "value", None)
        if isinstance(key, nn.Linear) and isinstance(value, nn.Linear):
            pairs.append((key, value))
    return pairs


def _cached_key_values(body: nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each layer's (keys, values), (1, kv_heads, n, head_dim), from a decoder's cache; None for an encoder."""
    outputs = body(input_ids=input_ids, use_cache=True)
    cache = outputs.get("cache", None) if hasattr(outputs, "get") else None
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    return [(layer.keys, layer.values) for layer in layers]


def _projected_key_values(body: nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (key, value) linear outputs, (n, hidden), hooked in a BERT-family encoder."""
    pairs = _key_value_projections(body)
    activations: dict[nn.Module, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda m, a, out: activations.setdefault(m, out[0])) for p in pairs for m in p]
    try:
        body(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return [(activations[key], activations[value]) for key, value in pairs]


@torch.no_grad()
def init_prefix_from_tokens(
    model: PeftModel, token_ids: Sequence[int] | torch.Tensor | None = None, *, seed: int = 0
) -> torch.Tensor:
    """Set a prefix-tuning adapter's virtual keys/values to those of real tokens (the paper's initialization).

    Runs the frozen base model's body (the transformer without its head, so a label-word head or any other
    head is not involved) once on `token_ids` (one id per virtual token; default: ids drawn uniformly from
    the vocabulary with a generator seeded by `seed`) and copies each layer's keys and values into the
    prefix, in peft's layout [k₀, v₀, k₁, v₁, ...] per virtual token. Decoders (Llama, Qwen2, OPT, GPT-2,
    ...) give them through their cache — the keys as attention uses them, rotary position included — so
    a causal LM with this prefix computes, for the tokens after it, exactly what it computes after the
    real tokens. BERT-family encoders (`key`/`value` linears) give them through forward hooks. Needs
    `prefix_projection=False`. Returns the token ids used.
    """
    config = model.active_peft_config
    if not isinstance(config, PrefixTuningConfig) or config.prefix_projection:
        raise ValueError("init_prefix_from_tokens needs an active prefix-tuning adapter with prefix_projection=False.")
    base = model.get_base_model()
    n = config.num_virtual_tokens
    if token_ids is None:
        generator = torch.Generator().manual_seed(seed)
        token_ids = torch.randint(0, base.config.vocab_size, (n,), generator=generator)
    token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if token_ids.numel() != n:
        raise ValueError(
            f"init_prefix_from_tokens needs one token id per virtual token ({n}), got {token_ids.numel()}."
        )
    body = getattr(base, "base_model", base)
    embedding = model.prompt_encoder[model.active_adapter].embedding
    input_ids = token_ids.unsqueeze(0).to(embedding.weight.device)
    was_training = base.training
    try:
        base.eval()
        cached = _cached_key_values(body, input_ids)
        if cached is not None:
            # (1, kv_heads, n, head_dim) → (n, kv_heads·head_dim), the layout peft views the prefix in.
            layers = [tuple(t[0].transpose(0, 1).reshape(n, -1) for t in pair) for pair in cached]
        else:
            layers = _projected_key_values(body, input_ids)
    finally:
        base.train(was_training)
    if len(layers) != config.num_layers:
        raise ValueError(
            f"{type(base).__name__}: found keys/values of {len(layers)} attention layers, the prefix adapter has "
            f"{config.num_layers}; init_prefix_from_tokens supports decoders with a cache and BERT-family encoders. "
            "Leave the prefix at peft's initialization (do not call init_prefix_from_tokens) for this model."
        )
    prefix = torch.cat([t for pair in layers for t in pair], dim=-1)  # (n, layers·2·token_dim)
    embedding.weight.copy_(prefix.to(embedding.weight.dtype))
    return token_ids
