"""Train only the top K encoder layers and the LM head: fewer perturbed parameters, and a frozen bottom to cache."""

from __future__ import annotations

from torch import nn


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder's layer stack of a `transformers` BERT-family model (`model.base_model.encoder.layer`)."""
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `base_model.encoder.layer` stack; freeze_all_but_top_layers and the "
            "depth cache expect a transformers BERT-family encoder (BERT, RoBERTa, XLM-RoBERTa). For a peft model, "
            "restrict the adapter instead: LoraConfig(layers_to_transform=[...])."
        )
    return layers


def freeze_all_but_top_layers(model: nn.Module, k: int) -> list[str]:
    """Set `requires_grad` so that only the top `k` encoder layers and the LM head train; returns their names.

    Trainable: every parameter of the top `k` encoder layers, and every parameter outside the base model (the
    LM head: for RoBERTa `lm_head.dense`, `lm_head.layer_norm` and the output bias `lm_head.bias`) except the
    decoder weight. Frozen: the embeddings and the layers below, and the decoder weight.

    The decoder weight is deliberately frozen: it is the input word-embedding matrix (tied), so training it would
    change the input of every layer — nothing below the top layers could be cached — and it is the largest
    matrix of the model (50,265 × 1,024 for roberta-large), all of whose coordinates MeZO would perturb while the
    label-word head reads only |classes| of its rows. The output bias is not tied and trains; only its label-word
    entries affect the label-word head, the others drift with the random directions and only matter for
    full-vocabulary predictions. Cost: prompts rely on the pretrained label-word embeddings, which MeZO's
    full-parameter setting would also tune.

    Args:
        model: a `transformers` masked LM of the BERT family (stock or `hf_mezo.models`).
        k: number of top encoder layers to train, 0 ≤ k ≤ number of layers (0: the head only).
    """
    layers = encoder_layers(model)
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(layers):
        raise ValueError(f"k must be an integer in [0, {len(layers)}] (the number of top layers to train), got {k!r}.")
    prefix = model.base_model_prefix + "."
    embedding_weight = model.get_input_embeddings().weight
    model.requires_grad_(False)
    for layer in layers[len(layers) - k :]:
        layer.requires_grad_(True)
    # named_parameters() lists a tied parameter once, under whichever owner registered first (XLM-R registers the
    # head first), so the tied decoder weight is recognized by identity, not by name.
    for name, param in model.named_parameters():
        if not name.startswith(prefix) and param is not embedding_weight:
            param.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]
