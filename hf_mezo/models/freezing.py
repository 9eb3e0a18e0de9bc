"""Train only the top K layers and the LM head: fewer perturbed parameters, and a frozen bottom to cache."""

from __future__ import annotations

from torch import nn

from .families import family_layout

# For a family the table (`families.FAMILY_LAYOUTS`) lacks: the usual names of a layer stack, relative to
# `model.base_model`, and of the final norm(s) beside it.
_STACKS = ("encoder.layer", "layers", "decoder.layers", "h")
_FINAL_MODULES = ("norm", "final_layer_norm", "project_out", "ln_f")


def _stack_and_final(model: nn.Module) -> tuple[nn.ModuleList, list[nn.Module]] | None:
    """The layer stack and the final modules that feed the head: from the family table, else found by the
    structural names below (a family the table lacks)."""
    found = family_layout(model, quiet=True)
    if found is not None:
        return found
    owner_and_layers = _stack_owner(model)
    if owner_and_layers is None:
        return None
    owner, layers = owner_and_layers
    if owner is getattr(model.base_model, "encoder", None):  # an encoder: nothing after the stack feeds the head
        return layers, []
    return layers, [m for name in _FINAL_MODULES if isinstance(m := getattr(owner, name, None), nn.Module)]


def _stack_owner(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    for path in _STACKS:
        owner = getattr(model, "base_model", None)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        layers = getattr(owner, name, None)
        if isinstance(layers, nn.ModuleList):
            return owner, layers
    return None


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The layer stack of a `transformers` model: a BERT-family encoder (`base_model.encoder.layer`) or a
    decoder-only LM (Llama/Qwen2/Mistral `model.layers`, OPT `model.decoder.layers`, GPT-2 `transformer.h`)."""
    found = _stack_and_final(model)
    if found is None:
        raise TypeError(
            f"{type(model).__name__} has no layer stack hf_mezo knows (base_model.encoder.layer, base_model.layers, "
            "base_model.decoder.layers or base_model.h); freeze_all_but_top_layers and the depth cache expect a "
            "BERT-family encoder or a Llama/Qwen2/OPT/GPT-2 decoder. For a peft model, restrict the adapter "
            "instead: LoraConfig(layers_to_transform=[...])."
        )
    return found[0]


def freeze_all_but_top_layers(model: nn.Module, k: int) -> list[str]:
    """Set `requires_grad` so that only the top `k` layers and the LM head train; returns their names.

    Trainable: every parameter of the top `k` layers; every parameter outside the base model (the LM head: for
    RoBERTa `lm_head.dense`, `lm_head.layer_norm` and the output bias `lm_head.bias`) except the decoder weight;
    and for a decoder-only LM the final norm that feeds the head (Llama `model.norm`, OPT
    `decoder.final_layer_norm` / `project_out`, GPT-2 `transformer.ln_f`), which is part of the head's computation
    though the base model holds it. Frozen: the embeddings and the layers below, and the decoder weight.

    The decoder weight is deliberately frozen when it is the input word-embedding matrix (tied: RoBERTa, SmolLM2,
    OPT, GPT-2): training it would change the input of every layer — nothing below the top layers could be cached —
    and it is the largest matrix of the model (50,265 × 1,024 for roberta-large), all of whose coordinates MeZO
    would perturb while the label-word head reads only |classes| of its rows. An untied LM head (Mistral, Llama-2)
    is an ordinary head parameter and trains. A masked LM's output bias is not tied and trains; only its label-word
    entries affect the label-word head. Cost: prompts rely on the pretrained label-word embeddings, which MeZO's
    full-parameter setting would also tune.

    Args:
        model: a `transformers` masked LM of the BERT family or a decoder-only LM (stock or `hf_mezo.models`).
        k: number of top layers to train, 0 ≤ k ≤ number of layers (0: the head only).
    """
    layers = encoder_layers(model)
    _, final = _stack_and_final(model)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(layers):
        raise ValueError(f"k must be an integer in [0, {len(layers)}] (the number of top layers to train), got {k!r}.")
    prefix = model.base_model_prefix + "."
    embedding_weight = model.get_input_embeddings().weight
    model.requires_grad_(False)
    for layer in layers[len(layers) - k :]:
        layer.requires_grad_(True)
    for module in final:  # a decoder's final norm (and OPT's project_out) feeds the head
        module.requires_grad_(True)
    # named_parameters() lists a tied parameter once, under whichever owner registered first (XLM-R registers the
    # head first), so the tied decoder weight is recognized by identity, not by name.
    for name, param in model.named_parameters():
        if not name.startswith(prefix) and param is not embedding_weight:
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]
