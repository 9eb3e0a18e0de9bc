"""MeZO with peft adapters: only adapter tensors move, g matches autograd, adapters save and load the peft way."""

import json
import warnings

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, RobertaForMaskedLM, Trainer

from hf_mezo import MeZOTrainer, ZerothOrderSGD, load_sst2, perturbed_forward
from hf_mezo.adapters import (
    MEZO_PAPER_SETTINGS,
    init_prefix_from_tokens,
    lora_config_for_mezo,
    prefix_config_for_mezo,
)

from .conftest import REPO, hand_prompt_accuracy, import_run_sst2, mezo_args, snapshot, tiny_roberta_config


def _masked_lm(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return RobertaForMaskedLM(tiny_roberta_config()).to(dtype)


def _mlm_dataset(n=8, length=8, seed=0):
    """Random sentences with two labelled (to-be-predicted) positions each, -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    labels = torch.full_like(ids, -100)
    labels[:, 2:4] = ids[:, 2:4]
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    )


def _args(tmp_path, **overrides):
    return mezo_args(tmp_path, **{"per_device_eval_batch_size": 8, "weight_decay": 0.0, "seed": 3, **overrides})


def _batch(data):
    return {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}


def test_lora_changes_only_adapters_and_g_equals_autograd_directional_derivative_float64(tmp_path):
    # init_lora_weights=False: B is random too, so both A and B enter the derivative.
    model = get_peft_model(_masked_lm(torch.float64), lora_config_for_mezo(init_lora_weights=False))
    data = _mlm_dataset()
    eta, eps = 1e-3, 1e-6
    before = snapshot(model)
    adapters = [n for n, p in model.named_parameters() if p.requires_grad]
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)

    # Independent computation: autograd over the adapter parameters, dropout off.
    model.eval()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(model(**_batch(data)).loss, [params[n] for n in adapters])

    trainer = MeZOTrainer(model=model, args=_args(tmp_path, learning_rate=eta, zo_eps=eps), train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    assert sorted(n for n, _, _ in opt.named_trainable_parameters()) == sorted(adapters)
    z = {n: opt.direction(params[n], 0).view_as(params[n]).clone() for n in adapters}
    directional = float(sum((g * z[n]).sum() for n, g in zip(adapters, grads)))

    trainer.train()
    for n, p in model.named_parameters():
        if n not in z:  # the frozen base model: bit-identical
            assert torch.equal(p.detach(), before[n]), n
    deltas = {n: params[n].detach() - before[n] for n in adapters}
    g_observed = float(sum((deltas[n] * z[n]).sum() for n in z) / (-eta * sum((z[n] ** 2).sum() for n in z)))
    for n in adapters:
        torch.testing.assert_close(deltas[n], -eta * g_observed * z[n], rtol=1e-9, atol=1e-15)
    assert abs(g_observed - directional) <= 1e-6 * abs(directional)


def _adapter_files(path):
    return sorted(p.name for p in path.iterdir() if p.is_file())


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_adapter_trains_saves_the_peft_way_and_loads_back_for_evaluation(tmp_path, method):
    config = lora_config_for_mezo() if method == "lora" else prefix_config_for_mezo()
    model = get_peft_model(_masked_lm(), config)
    if method == "prefix":
        init_prefix_from_tokens(model)
    data = _mlm_dataset(n=16)
    before = snapshot(model)
    args = _args(tmp_path, max_steps=4, **MEZO_PAPER_SETTINGS[method])
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        # Every adapter tensor moves (LoRA's zero-initialized B included); the frozen base model never does.
        assert torch.equal(p.detach(), before[n]) == (n not in trainable), n
    assert all("loss" in log for log in trainer.state.log_history if "grad_norm" in log)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    files = _adapter_files(out)
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files  # the adapter alone, not the base model

    # Loaded for inference (peft's inference path), evaluated by the stock Trainer.
    loaded = PeftModel.from_pretrained(_masked_lm(), str(out))  # same seed: the same base weights
    expected = trainer.evaluate()["eval_loss"]
    reloaded = Trainer(model=loaded, args=_args(tmp_path), eval_dataset=data).evaluate()["eval_loss"]
    assert reloaded == pytest.approx(expected, rel=1e-6)


def _coverage_models():
    yield "lora-query-value", lora_config_for_mezo()
    yield "lora-embeddings-dense", lora_config_for_mezo(target_modules=["word_embeddings", "dense"])
    yield "prefix", prefix_config_for_mezo()
    yield "prefix-projection", prefix_config_for_mezo(prefix_projection=True, encoder_hidden_size=8)
    yield "prompt-tuning", PromptTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION")


@pytest.mark.parametrize("name,config", list(_coverage_models()), ids=[n for n, _ in _coverage_models()])
def test_perturbation_reaches_every_trainable_adapter_parameter(name, config):
    model = get_peft_model(_masked_lm(), config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = ZerothOrderSGD([{"params": named}], lr=1e-3)
    batch = _batch(_mlm_dataset(n=2))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an untouched parameter would warn
        with perturbed_forward(model, opt, 0, 1e-3) as touched:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert {n for n, p in named if id(p) not in touched} == set()


def test_a_trainable_parameter_the_forward_never_perturbs_warns():
    model = _masked_lm()
    model.unused = torch.nn.Linear(2, 2)  # a module the forward never calls
    opt = ZerothOrderSGD(model.named_parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match=r"not perturbed.*'unused.weight'"):
        with perturbed_forward(model, opt, 0, 1e-3):
            model(input_ids=torch.tensor([[0, 5, 2]]))


def test_init_prefix_from_tokens_copies_each_layers_key_and_value_activations():
    model = get_peft_model(_masked_lm(), prefix_config_for_mezo(num_virtual_tokens=3))
    tokens = init_prefix_from_tokens(model, [5, 17, 42])
    base = model.get_base_model().eval()
    with torch.no_grad():  # independent: the base model's hidden states into each layer, through key/value
        hidden = base(input_ids=tokens[None], output_hidden_states=True).hidden_states
        expected = [
            proj(hidden[i][0])
            for i, layer in enumerate(base.roberta.encoder.layer)
            for proj in (layer.attention.self.key, layer.attention.self.value)
        ]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, torch.cat(expected, dim=-1))


def test_config_helpers_validate_and_carry_the_paper_defaults():
    lora = lora_config_for_mezo()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.0)
    assert prefix_config_for_mezo().num_virtual_tokens == 5
    with pytest.raises(ValueError, match="task_type"):
        prefix_config_for_mezo(task_type=None)
    with pytest.raises(ValueError, match="rank"):
        lora_config_for_mezo(r=0)


# ---- examples/run_sst2.py --lora / --prefix ------------------------------------------------------

SCRIPT = REPO / "examples" / "run_sst2.py"
TEST_ROWS = 16


_run_sst2 = import_run_sst2


def _accuracy_of_saved_adapter(model_dir, adapter_dir):
    """Test accuracy of base + saved adapter, loaded the peft way, one sentence at a time (label words by hand)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForMaskedLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    rows = load_sst2(k=16, seed=42)["test"].select(range(TEST_ROWS))
    return hand_prompt_accuracy(model, tokenizer, rows)


@pytest.mark.parametrize("flag", ["--lora", "--prefix"])
def test_run_sst2_trains_an_adapter_end_to_end(tiny_mlm_dir, tmp_path, flag):
    output_dir = tmp_path / flag.strip("-")
    settings = MEZO_PAPER_SETTINGS[flag.strip("-")]
    metrics = _run_sst2().main(
        [
            f"--model_name_or_path={tiny_mlm_dir}",
            flag,
            "--k=16",
            "--do_train",
            "--max_steps=3",
            "--per_device_train_batch_size=8",
            f"--learning_rate={settings['learning_rate']}",
            f"--zo_eps={settings['zo_eps']}",
            "--lr_scheduler_type=constant",
            "--logging_steps=1",
            "--save_strategy=no",
            f"--max_test_samples={TEST_ROWS}",
            "--per_device_eval_batch_size=8",
            "--report_to=none",
            "--seed=0",
            f"--output_dir={output_dir}",
        ]
    )
    files = _adapter_files(output_dir)
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert json.loads((output_dir / "adapter_config.json").read_text())["peft_type"] == (
        "LORA" if flag == "--lora" else "PREFIX_TUNING"
    )
    saved = json.loads((output_dir / "test_results.json").read_text())
    assert saved["test_samples"] == TEST_ROWS and metrics["test_accuracy"] == saved["test_accuracy"]
    assert saved["test_accuracy"] == pytest.approx(_accuracy_of_saved_adapter(tiny_mlm_dir, output_dir), abs=1e-12)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert sum("loss" in entry for entry in history) == 3
    # Trained: the saved adapter is not its initialization (LoRA's B starts at 0; the prefix at real activations).
    trained = load_file(output_dir / "adapter_model.safetensors")
    if flag == "--lora":
        assert any(name.endswith("lora_B.weight") and bool(t.ne(0).any()) for name, t in trained.items())
    else:
        initial = get_peft_model(AutoModelForMaskedLM.from_pretrained(tiny_mlm_dir), prefix_config_for_mezo())
        init_prefix_from_tokens(initial, seed=0)
        (saved_prefix,) = trained.values()
        assert saved_prefix.shape == initial.prompt_encoder["default"].embedding.weight.shape
        assert not torch.equal(saved_prefix, initial.prompt_encoder["default"].embedding.weight.detach())


def test_run_sst2_rejects_lora_and_prefix_together():
    with pytest.raises(ValueError, match="alternatives"):
        _run_sst2().ModelArguments(lora=True, prefix=True)


# ---- the paper's prefix initialization on every prompt class ------------------------------------------------------


def _prompt_causal(model_type):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    from hf_mezo.models import (
        GPT2ForPromptCausalLM,
        LlamaForPromptCausalLM,
        OPTForPromptCausalLM,
        Qwen2ForPromptCausalLM,
    )

    torch.manual_seed(0)
    small = dict(vocab_size=100, hidden_size=16, num_attention_heads=4, max_position_embeddings=64)
    if model_type == "llama":
        return LlamaForPromptCausalLM(
            LlamaConfig(**small, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32)
        )
    if model_type == "qwen2":
        return Qwen2ForPromptCausalLM(
            Qwen2Config(**small, num_hidden_layers=2, num_key_value_heads=2, intermediate_size=32)
        )
    if model_type == "opt":
        config = OPTConfig(**small, num_hidden_layers=2, ffn_dim=32, word_embed_proj_dim=16, pad_token_id=1)
        return OPTForPromptCausalLM(config)
    return GPT2ForPromptCausalLM(GPT2Config(vocab_size=100, n_embd=16, n_head=4, n_layer=2, n_positions=64))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt", "gpt2"])
def test_prefix_of_real_tokens_makes_a_causal_label_word_model_see_those_tokens(model_type):
    # Before the fix, every causal LM fell back to peft's random prefix ("found 0 attention layers with
    # `key`/`value` linears"). Independent check: with the prefix set from tokens t, the class logits for x equal
    # the stock forward of the concatenation [t, x] (a causal LM's t never sees x).
    model = _prompt_causal(model_type).double().eval()
    model.set_label_word_ids([7, 11])
    tokens, x = [5, 17, 42], torch.tensor([[9, 8, 30, 31, 60]])
    with torch.no_grad():
        whole = torch.cat([torch.tensor([tokens]), x], dim=1)
        expected = model(input_ids=whole, attention_mask=torch.ones_like(whole)).logits
    peft_model = get_peft_model(model, prefix_config_for_mezo(num_virtual_tokens=3))
    peft_model.prompt_encoder.double()  # peft may keep the prefix in float32: set that rounding aside
    init_prefix_from_tokens(peft_model, tokens)
    with torch.no_grad():
        got = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_prefix_init_runs_under_a_masked_label_word_head():
    # Before the fix: "The label-word head needs the mask position of each example", leaked as a warning.
    from hf_mezo.models import RobertaForPromptMaskedLM

    torch.manual_seed(0)
    model = RobertaForPromptMaskedLM(tiny_roberta_config())
    model.set_label_word_ids([7, 11], mask_token_id=4)
    stock = get_peft_model(_masked_lm(), prefix_config_for_mezo(num_virtual_tokens=3))
    stock.get_base_model().load_state_dict(model.state_dict(), strict=False)
    peft_model = get_peft_model(model, prefix_config_for_mezo(num_virtual_tokens=3))
    init_prefix_from_tokens(peft_model, [5, 17, 42])
    init_prefix_from_tokens(stock, [5, 17, 42])
    torch.testing.assert_close(
        peft_model.prompt_encoder["default"].embedding.weight, stock.prompt_encoder["default"].embedding.weight
    )
