"""What hf_mezo must know of a model family, as data: where its layer stack and final norm live.

One table, peft-style (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`): `model_type` → paths relative to
`model.base_model`. The generic prompt LMs need nothing else from a family; the table serves the speed-ups that
must address layers (the depth cache skips the frozen bottom layers; `freeze_all_but_top_layers` trains the top
ones and the final norm that feeds the head; `query_layer` runs the last layer at the label positions only). Every
entry is checked by the tests against the stock forward (cached == uncached == stock). A family the table does not list runs the generic exact path without those speed-ups
and says so once.

Left out on purpose: DeBERTa-v2 (its encoder applies a convolution after layer 0, outside the layer, so a skipped
layer 0 would not skip it) and BLOOM (its blocks return more than their hidden states, so they cannot be skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class FamilyLayout:
    """Paths relative to `model.base_model`: the layer stack (an `nn.ModuleList`) and what follows it (final norms);
    and the recipe (`query_layer.QUERY_LAYER_RECIPES`) that runs its last layer at the label positions, if any."""

    layers: str
    final: tuple[str, ...] = ()
    query_layer: str | None = None


_DECODER = FamilyLayout("layers", ("norm",))
_LLAMA_LIKE = FamilyLayout("layers", ("norm",), query_layer="llama")
_ENCODER = FamilyLayout("encoder.layer", query_layer="bert")

FAMILY_LAYOUTS: dict[str, FamilyLayout] = {
    # decoders
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _DECODER,
    "gemma3_text": _DECODER,
    "phi3": _DECODER,
    "gpt_neox": FamilyLayout("layers", ("final_layer_norm",)),
    "falcon": FamilyLayout("h", ("ln_f",)),
    "gpt2": FamilyLayout("h", ("ln_f",)),
    "opt": FamilyLayout("decoder.layers", ("decoder.final_layer_norm", "decoder.project_out")),
    # encoders
    "bert": _ENCODER,
    "roberta": _ENCODER,
    "xlm-roberta": _ENCODER,
    "electra": _ENCODER,
    "distilbert": FamilyLayout("transformer.layer"),
    "modernbert": FamilyLayout("layers", ("final_norm",)),
}


def _get(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def family_layout(model: nn.Module, *, quiet: bool = False) -> tuple[nn.ModuleList, list[nn.Module]] | None:
    """The layer stack and final modules of `model` from the table, or None (said once) for a family it lacks."""
    model_type = getattr(model.config, "model_type", None)
    layout = FAMILY_LAYOUTS.get(model_type)
    base = getattr(model, "base_model", model)
    layers = None if layout is None else _get(base, layout.layers)
    if not isinstance(layers, nn.ModuleList):
        if not quiet:
            logger.warning_once(
                f"hf_mezo: model_type {model_type!r} is not in hf_mezo.models.families.FAMILY_LAYOUTS; its prompt LM "
                "runs the stock forward exactly, without the depth cache. Add its layer-stack path there to enable it."
            )
        return None
    final = [m for path in layout.final if isinstance(m := _get(base, path), nn.Module)]
    return layers, final


def modules_before(model: nn.Module, layers: nn.ModuleList, final: list[nn.Module]) -> list[nn.Module]:
    """The base model's modules outside the layer stack and the final modules: embeddings, rotary tables, ..."""
    excluded = {id(layers), *(id(m) for m in final)}
    found = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if id(child) in excluded:
                continue
            if any(m is layers for m in child.modules()):
                visit(child)  # an ancestor of the stack (BERT's `encoder`): look inside
            else:
                found.append(child)

    visit(getattr(model, "base_model", model))
    return found
