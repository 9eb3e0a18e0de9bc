"""examples/run_sst2.py on a tiny causal LM (Llama, full roberta/GPT-2 BPE vocabulary): the saved test accuracy is
the saved model's accuracy recomputed here with the stock class, one whole prompt at a time."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_mezo.data import load_sst2

from .conftest import import_run_sst2
from .test_prompting_causal import GREAT, TERRIBLE, TINY_CAUSAL, gpt2_style_tokenizer

TEST_ROWS = 24


def save_tiny_causal(path, model_class, config_class):
    torch.manual_seed(0)
    model_class(config_class(**TINY_CAUSAL)).save_pretrained(path)
    gpt2_style_tokenizer(padding_side="left").save_pretrained(path)  # left padding, as causal tokenizers often do
    return path


@pytest.fixture(scope="module")
def tiny_causal_dir(tmp_path_factory):
    return save_tiny_causal(tmp_path_factory.mktemp("tiny-llama"), LlamaForCausalLM, LlamaConfig)


def _args(model_dir, output_dir, *extra):
    return [
        f"--model_name_or_path={model_dir}",
        "--k=16",
        "--data_seed=42",
        "--template={sentence} It was",
        "--label_words={'0':'terrible','1':'great'}",
        "--do_train",
        "--max_steps=3",
        "--per_device_train_batch_size=8",
        "--learning_rate=1e-2",
        "--lr_scheduler_type=constant",
        "--logging_steps=1",
        "--save_strategy=no",
        f"--max_test_samples={TEST_ROWS}",
        "--per_device_eval_batch_size=8",
        "--report_to=none",
        "--seed=0",
        f"--output_dir={output_dir}",
        *extra,
    ]


def _hand_accuracy(model, tokenizer):
    correct = 0
    with torch.no_grad():
        for row in load_sst2(k=16, seed=42)["test"].select(range(TEST_ROWS)):
            ids = torch.tensor([tokenizer(row["sentence"].strip() + " It was")["input_ids"]])
            logits = model(input_ids=ids).logits[0, -1]
            correct += int(int(logits[GREAT] > logits[TERRIBLE]) == row["label"])
    return correct / TEST_ROWS


@pytest.mark.parametrize("trainer", ["mezo", "ft"])
def test_causal_run_top_layer(tiny_causal_dir, tmp_path, trainer):
    output_dir = tmp_path / trainer
    metrics = import_run_sst2().main(
        _args(tiny_causal_dir, output_dir, f"--trainer={trainer}", "--zo_train_top_layers=1")
    )
    saved = json.loads((output_dir / "test_results.json").read_text())
    assert metrics == pytest.approx(saved) and saved["test_samples"] == TEST_ROWS
    trained = LlamaForCausalLM.from_pretrained(output_dir).eval()  # the stock class reads the checkpoint
    assert saved["test_accuracy"] == pytest.approx(_hand_accuracy(trained, AutoTokenizer.from_pretrained(output_dir)))
    initial = LlamaForCausalLM.from_pretrained(tiny_causal_dir).state_dict()
    changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, initial[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm.")) for n in changed), changed


def test_causal_run_with_lora(tiny_causal_dir, tmp_path):
    from peft import PeftModel

    output_dir = tmp_path / "lora"
    metrics = import_run_sst2().main(_args(tiny_causal_dir, output_dir, "--trainer=mezo", "--lora"))
    base = LlamaForCausalLM.from_pretrained(tiny_causal_dir)
    model = PeftModel.from_pretrained(base, output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    assert metrics["test_accuracy"] == pytest.approx(_hand_accuracy(model, tokenizer))


def test_causal_model_without_prompt_class_is_refused(tiny_causal_dir, tmp_path):
    with pytest.raises(ValueError, match="causal LM .*'llama'.*without --no_label_word_head"):
        import_run_sst2().main(_args(tiny_causal_dir, tmp_path, "--no_label_word_head"))


def test_causal_run_with_prefix(tiny_causal_dir, tmp_path):
    """peft's prefix reaches the model as a KV cache and a mask spanning it: positions and the scored token follow."""
    from peft import PeftModel

    output_dir = tmp_path / "prefix"
    metrics = import_run_sst2().main(_args(tiny_causal_dir, output_dir, "--trainer=mezo", "--prefix"))
    base = LlamaForCausalLM.from_pretrained(tiny_causal_dir)
    model = PeftModel.from_pretrained(base, output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_dir)
    assert metrics["test_accuracy"] == pytest.approx(_hand_accuracy(model, tokenizer))


def test_causal_family_without_its_own_class_runs_generic(tmp_path):
    """A causal family with no hf_mezo class (Mistral) runs through AutoModelForPromptCausalLM: the saved accuracy
    is the stock MistralForCausalLM's on the saved checkpoint, and only the top layer and final norm moved."""
    from transformers import MistralConfig, MistralForCausalLM

    model_dir = save_tiny_causal(tmp_path / "tiny-mistral", MistralForCausalLM, MistralConfig)
    assert MistralConfig.model_type not in import_run_sst2().PROMPT_CAUSAL_CLASSES
    output_dir = tmp_path / "run"
    metrics = import_run_sst2().main(_args(model_dir, output_dir, "--trainer=mezo", "--zo_train_top_layers=1"))
    trained = MistralForCausalLM.from_pretrained(output_dir).eval()
    assert metrics["test_accuracy"] == pytest.approx(
        _hand_accuracy(trained, AutoTokenizer.from_pretrained(output_dir))
    )
    initial = MistralForCausalLM.from_pretrained(model_dir).state_dict()
    changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, initial[n])}
    assert changed and all(n.startswith(("model.layers.1.", "model.norm.")) for n in changed), changed
