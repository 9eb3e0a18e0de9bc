"""Prompt causal LMs (Llama/SmolLM2, Qwen2, OPT, GPT-2): label-word head vs the stock model, depth cache, freezing,
checkpoints, and the MeZO estimator through them. Tiny models from configs."""

import copy

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_mezo import MeZOTrainer, ZerothOrderSGD, perturbed_forward
from hf_mezo.models import (
    GPT2ForPromptCausalLM,
    LlamaForPromptCausalLM,
    OPTForPromptCausalLM,
    Qwen2ForPromptCausalLM,
    freeze_all_but_top_layers,
)

from .conftest import mezo_args, snapshot

VOCAB, LAYERS = 64, 3
LABEL_WORDS = [5, 9, 13]


def _llama_config():
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )


def _qwen2_config():
    # Sliding-window layers on top: their masks differ from the full-attention ones and must be kept apart.
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        tie_word_embeddings=False,
    )


def _opt_config():
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=8,  # project_in / project_out, as in OPT-350m
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def _gpt2_config():
    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=LAYERS,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


ARCHITECTURES = {
    "llama": (LlamaForPromptCausalLM, LlamaForCausalLM, _llama_config),
    "qwen2": (Qwen2ForPromptCausalLM, Qwen2ForCausalLM, _qwen2_config),
    "opt": (OPTForPromptCausalLM, OPTForCausalLM, _opt_config),
    "gpt2": (GPT2ForPromptCausalLM, GPT2LMHeadModel, _gpt2_config),
}
LENGTHS = [7, 4, 9, 5]


def make_models(arch, seed=0, dtype=torch.float32, **prompt_kwargs):
    """(prompt model, stock model) with identical weights."""
    prompt_cls, stock_cls, config = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    stock = stock_cls(config()).to(dtype).eval()
    prompt = prompt_cls(config(), **prompt_kwargs).to(dtype).eval()
    missing, unexpected = prompt.load_state_dict(stock.state_dict(), strict=False)
    assert not missing and not unexpected
    return prompt, stock


def make_batch(lengths=LENGTHS, side="right", width=None, seed=0):
    """Random rows of the given lengths padded on `side` to `width`; position ids counted from each row's start."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.full((len(lengths), width), 3)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    rows = [torch.randint(20, VOCAB, (n,), generator=g) for n in lengths]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        start = width - n if side == "left" else 0
        ids[i, start : start + n], mask[i, start : start + n] = row, 1
    return ids, mask


def stock_label_word_logits(stock, ids, mask):
    """The stock model's full-vocabulary logits at each row's last real token, label-word columns."""
    positions = ((mask.cumsum(1) - 1) * mask).clamp(min=0)
    with torch.no_grad():
        logits = stock(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return logits[torch.arange(len(ids)), last][:, LABEL_WORDS]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_class_logits_equal_stock_logits_at_the_last_prompt_token(arch):
    prompt, stock = make_models(arch)
    prompt.set_label_word_ids(LABEL_WORDS)
    for side in ("right", "left"):
        ids, mask = make_batch(side=side, width=11)
        with torch.no_grad():
            logits = prompt(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (len(LENGTHS), len(LABEL_WORDS))
        torch.testing.assert_close(logits, stock_label_word_logits(stock, ids, mask), rtol=0, atol=1e-5)
        for i in range(len(LENGTHS)):  # the same row alone, unpadded, through the stock and the prompt model
            row = ids[i][mask[i].bool()].unsqueeze(0)
            with torch.no_grad():
                expected = stock(input_ids=row).logits[0, -1, LABEL_WORDS]
                alone = prompt(input_ids=row).logits[0]
            torch.testing.assert_close(logits[i], expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(logits[i], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_is_cross_entropy_over_label_words_from_each_label_source(arch):
    prompt, _ = make_models(arch)
    prompt.set_label_word_ids(LABEL_WORDS)
    ids, mask = make_batch(side="left")
    classes = torch.tensor([2, 0, 1, 0])
    out = prompt(input_ids=ids, attention_mask=mask, class_labels=classes)
    expected = torch.nn.functional.cross_entropy(out.logits, classes)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(prompt(input_ids=ids, attention_mask=mask, labels=classes).loss, expected)
    # Causal-LM labels: the prompt plus its label word, labelled only there; scored at the token before it.
    right_ids, right_mask = make_batch(side="right")
    lengths = torch.tensor(LENGTHS)
    extended = torch.cat([right_ids, torch.full((4, 1), 3)], dim=1)
    extended[torch.arange(4), lengths] = torch.tensor(LABEL_WORDS)[classes]
    labels = torch.full_like(extended, -100)
    labels[torch.arange(4), lengths] = extended[torch.arange(4), lengths]
    causal = prompt(input_ids=extended, attention_mask=torch.ones_like(extended), labels=labels)
    reference = prompt(input_ids=right_ids, attention_mask=right_mask, class_labels=classes)
    torch.testing.assert_close(causal.logits, reference.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(causal.loss, reference.loss, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="mask_positions must hold"):
        prompt(input_ids=ids, attention_mask=mask, mask_positions=torch.tensor([0, 1, 2, 99]))


def test_without_label_words_the_forward_is_the_stock_forward():
    prompt, stock = make_models("llama")
    ids, mask = make_batch(side="right")
    labels = ids.masked_fill(mask == 0, -100)
    out, ref = (
        prompt(input_ids=ids, attention_mask=mask, labels=labels),
        stock(ids, attention_mask=mask, labels=labels),
    )
    # Equal where attended; padded positions differ only because their position ids count from the row's start.
    attended = mask.bool()
    torch.testing.assert_close(out.logits[attended], ref.logits[attended], rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no label words"):
        prompt(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_depth_cached_equals_uncached_and_left_and_right_padding_share_entries(arch):
    prompt, stock = make_models(arch)
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    assert prompt.frozen_depth() == LAYERS - 1
    uncached = copy.deepcopy(prompt)
    uncached.depth_cache.resize(0)
    seen = []
    for side, width in (("right", None), ("left", 12), ("right", 10)):
        ids, mask = make_batch(side=side, width=width)
        with torch.no_grad():
            logits = prompt(input_ids=ids, attention_mask=mask).logits
            expected = uncached(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, stock_label_word_logits(stock, ids, mask), rtol=0, atol=1e-5)
        seen.append((prompt.depth_cache.hits, prompt.depth_cache.misses))
    assert seen == [(0, 4), (4, 4), (8, 4)]  # the same four examples, however they are padded
    assert len(prompt.depth_cache) == 4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_freeze_all_but_top_layers_on_decoder_stacks(arch):
    prompt, _ = make_models(arch)
    names = freeze_all_but_top_layers(prompt, 1)
    layer_prefix = {
        "llama": "model.layers.2.",
        "qwen2": "model.layers.2.",
        "opt": "model.decoder.layers.2.",
        "gpt2": "transformer.h.2.",
    }[arch]
    final = {
        "llama": {"model.norm.weight"},
        "qwen2": {"model.norm.weight", "lm_head.weight"},  # an untied LM head is an ordinary head parameter
        "opt": {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"}
        | {"model.decoder.project_out.weight"},
        "gpt2": {"transformer.ln_f.weight", "transformer.ln_f.bias"},
    }[arch]
    expected = {n for n, _ in prompt.named_parameters() if n.startswith(layer_prefix)} | final
    assert set(names) == expected
    assert not prompt.get_input_embeddings().weight.requires_grad
    assert prompt.frozen_depth() == LAYERS - 1
    with pytest.raises(ValueError, match="k must be an integer"):
        freeze_all_but_top_layers(prompt, LAYERS + 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoints_round_trip_with_the_stock_classes(arch, tmp_path):
    prompt_cls, stock_cls, _ = ARCHITECTURES[arch]
    prompt, stock = make_models(arch)
    stock.save_pretrained(tmp_path / "stock")
    loaded, info = prompt_cls.from_pretrained(tmp_path / "stock", label_word_ids=LABEL_WORDS, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if stock.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    loaded.save_pretrained(tmp_path / "prompt")
    back, info = stock_cls.from_pretrained(tmp_path / "prompt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in stock.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    again = prompt_cls.from_pretrained(tmp_path / "prompt")
    assert again.label_word_ids == LABEL_WORDS


@pytest.mark.parametrize("arch, top_layers", [("opt", None), ("gpt2", 1), ("llama", None), ("qwen2", 1)])
def test_perturbation_reaches_every_trainable_parameter(arch, top_layers):
    """Under perturbed_forward the loss is that of the model whose weights are explicitly θ + εz (float64)."""
    prompt, _ = make_models(arch, dtype=torch.float64)
    prompt.set_label_word_ids(LABEL_WORDS)
    if top_layers is not None:
        freeze_all_but_top_layers(prompt, top_layers)
    trainable = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
    optimizer = ZerothOrderSGD(trainable, lr=0.0, seed=5)
    ids, mask = make_batch(side="left")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 2, 1])}
    explicit = copy.deepcopy(prompt)
    explicit.depth_cache.resize(0)
    explicit_params = dict(explicit.named_parameters())
    with torch.no_grad():
        prompt(**batch)  # fills the depth cache when there is a frozen bottom
        for name, param in trainable:
            explicit_params[name].copy_(optimizer.perturbed(param, 0, 1e-2))
        expected = explicit(**batch).loss
    with perturbed_forward(prompt, optimizer, 0, 1e-2) as touched:
        perturbed = prompt(**batch).loss
    assert touched == {id(p) for _, p in trainable}
    torch.testing.assert_close(perturbed, expected, rtol=1e-12, atol=0)


def _class_dataset(n=8, seed=0):
    from datasets import Dataset

    ids, mask = make_batch(lengths=[5 + i % 4 for i in range(n)], side="right", seed=seed)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [i % 3 for i in range(n)]}
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mezo_estimator_through_the_prompt_causal_lm_float64(arch, tmp_path):
    """One MeZOTrainer step: Δθ = −η·g·z with g = zᵀ∇L (autograd on the same batch), to 1e-6 relative.

    OPT and GPT-2 are float64 throughout: 1e-6 at ε = 1e-6. Llama's and Qwen2's RMSNorm casts its input to float32
    (then back), so their float64 loss is only float32-exact: at ε = 1e-6 that rounding dominates the two-sided
    difference (4e-3 relative measured for Llama, 1e-4 for Qwen2). With this batch and Rademacher z, Llama's error
    is 1.1e-3 at ε = 1e-3 (O(ε²) truncation), 1.4e-4 at ε = 1e-4 and 2e-4 at 3e-5 (rounding); ε = 3e-4 balances
    the two and is held to 1e-4 relative.
    """
    prompt, _ = make_models(arch, dtype=torch.float64)
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    data = _class_dataset()
    eta, eps, tolerance = (1e-3, 1e-6, 1e-6) if arch in ("opt", "gpt2") else (1e-3, 3e-4, 1e-4)
    args = mezo_args(tmp_path, learning_rate=eta, zo_eps=eps, weight_decay=0.0, zo_distribution="rademacher")
    before = snapshot(prompt)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    trainable = [n for n, p in prompt.named_parameters() if p.requires_grad]
    params = dict(prompt.named_parameters())
    grads = torch.autograd.grad(prompt(**batch).loss, [params[n] for n in trainable])

    trainer = MeZOTrainer(model=prompt, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    z = {n: opt.direction(params[n], 0).view_as(params[n]).clone() for n in trainable}
    directional = float(sum((g * z[n]).sum() for n, g in zip(trainable, grads)))
    trainer.train()
    deltas = {n: params[n].detach() - before[n] for n in trainable}
    g_observed = float(sum((deltas[n] * z[n]).sum() for n in z) / (-eta * sum((z[n] ** 2).sum() for n in z)))
    for n in trainable:
        torch.testing.assert_close(deltas[n], -eta * g_observed * z[n], rtol=1e-9, atol=1e-15)
    for n, p in prompt.named_parameters():
        if n not in z:
            assert torch.equal(p.detach(), before[n]), n
    assert abs(g_observed - directional) <= tolerance * abs(directional)
    assert prompt.depth_cache.hits > 0
