"""Prompt masked LMs: label-word head and depth cache, checked against the stock models with the same weights."""

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForMaskedLM,
)

from hf_mezo import MeZOConfig, MeZOTrainer, ZerothOrderSGD, perturbed_forward
from hf_mezo.models import (
    BertForPromptMaskedLM,
    RobertaForPromptMaskedLM,
    XLMRobertaForPromptMaskedLM,
    freeze_all_but_top_layers,
)

LABEL_WORDS = [7, 11, 23]
MASK_ID = 4
LAYERS = 4

# Tiny shapes (vocabulary 100, hidden 16) with 4 layers, so that there is a bottom to cache and a top to train.
TINY = dict(
    vocab_size=100,
    hidden_size=16,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=64,
    pad_token_id=1,
)
ROBERTA = dict(TINY, type_vocab_size=1, bos_token_id=0, eos_token_id=2)

ARCHITECTURES = {
    "roberta": (RobertaForPromptMaskedLM, RobertaForMaskedLM, lambda: RobertaConfig(**ROBERTA)),
    "xlm-roberta": (XLMRobertaForPromptMaskedLM, XLMRobertaForMaskedLM, lambda: XLMRobertaConfig(**ROBERTA)),
    "bert": (BertForPromptMaskedLM, BertForMaskedLM, lambda: BertConfig(**TINY)),
}


def make_models(arch="roberta", seed=0, **config_overrides):
    """A prompt model and a stock model with identical weights, both in eval mode."""
    prompt_cls, stock_cls, make_config = ARCHITECTURES[arch]
    config = make_config()
    for key, value in config_overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    stock = stock_cls(config).eval()
    prompt = prompt_cls(copy.deepcopy(config)).eval()
    prompt.load_state_dict(stock.state_dict())
    return prompt, stock


# A pool of prompts of different lengths; each has one mask, at different positions.
POOL_LENGTHS = [5, 9, 12, 7, 3, 10, 8, 6]
POOL_MASKS = [1, 4, 10, 0, 2, 6, 3, 5]


def make_batch(indices, width=None, seed=0, pad_id=1):
    """Right-padded batch of pool examples (to the longest, or to `width`) with MLM labels at the masks."""
    generator = torch.Generator().manual_seed(seed)
    pool = [torch.randint(5, 100, (n,), generator=generator) for n in POOL_LENGTHS]
    width = width or max(POOL_LENGTHS[i] for i in indices)
    input_ids = torch.full((len(indices), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, i in enumerate(indices):
        input_ids[row, : POOL_LENGTHS[i]] = pool[i]
        input_ids[row, POOL_MASKS[i]] = MASK_ID
        attention_mask[row, : POOL_LENGTHS[i]] = 1
        labels[row, POOL_MASKS[i]] = LABEL_WORDS[i % len(LABEL_WORDS)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def masks_and_classes(batch):
    positions = batch["labels"].ne(-100).long().argmax(dim=1)
    words = batch["labels"][torch.arange(len(positions)), positions]
    classes = torch.tensor([LABEL_WORDS.index(int(w)) for w in words])
    return positions, classes


# ---- label-word head ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_label_word_logits_equal_stock_logits_at_mask_and_label_words(arch):
    prompt, stock = make_models(arch)
    prompt.set_label_word_ids(LABEL_WORDS)
    batch = make_batch([0, 1, 2, 3, 4], width=14)  # padding and a different mask position per example
    positions, classes = masks_and_classes(batch)
    with torch.no_grad():
        full = stock(**batch).logits
        out = prompt(**batch)
        through_stock_encoder = prompt(**batch, output_hidden_states=True)  # the base model's own forward
    expected = full[torch.arange(len(positions)), positions][:, LABEL_WORDS]
    assert out.logits.shape == (5, len(LABEL_WORDS))
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, F.cross_entropy(expected, classes), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(through_stock_encoder.logits, expected, rtol=1e-5, atol=1e-6)
    assert len(through_stock_encoder.hidden_states) == LAYERS + 1


def test_mask_and_class_sources_agree():
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS, mask_token_id=MASK_ID)
    batch = make_batch([1, 2, 5, 6])
    positions, classes = masks_and_classes(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        from_labels = prompt(**batch)
        from_positions = prompt(input_ids=ids, attention_mask=mask, mask_positions=positions, class_labels=classes)
        from_mask_token = prompt(input_ids=ids, attention_mask=mask, class_labels=classes)
        unlabeled = prompt(input_ids=ids, attention_mask=mask)
        normalized = prompt(**batch, num_items_in_batch=torch.tensor(8))
    for out in (from_positions, from_mask_token, unlabeled):
        torch.testing.assert_close(out.logits, from_labels.logits, rtol=0, atol=0)
    torch.testing.assert_close(from_positions.loss, from_labels.loss)
    torch.testing.assert_close(from_mask_token.loss, from_labels.loss)
    assert unlabeled.loss is None
    torch.testing.assert_close(normalized.loss, from_labels.loss * 4 / 8)  # sum over 4 examples / 8 items


def test_label_word_head_rejects_ambiguous_inputs():
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    batch = make_batch([0, 1])
    two_masks = batch["labels"].clone()
    two_masks[0, 0] = LABEL_WORDS[0]
    with pytest.raises(ValueError, match="exactly one mask"):
        prompt(input_ids=batch["input_ids"], labels=two_masks)
    not_a_label_word = batch["labels"].clone()
    not_a_label_word[not_a_label_word.ne(-100)] = 50
    with pytest.raises(ValueError, match="not label words"):
        prompt(input_ids=batch["input_ids"], labels=not_a_label_word)
    with pytest.raises(ValueError, match="mask position"):
        prompt(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="repeat"):
        prompt.set_label_word_ids([7, 7])
    prompt.set_label_word_ids(None)
    with pytest.raises(ValueError, match="no label words"):
        prompt(input_ids=batch["input_ids"], class_labels=torch.tensor([0, 1]))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_without_label_words_the_forward_is_the_stock_forward(arch):
    prompt, stock = make_models(arch)
    batch = make_batch([0, 2, 4])
    with torch.no_grad():
        mine, theirs = prompt(**batch), stock(**batch)
    assert torch.equal(mine.logits, theirs.logits)
    assert torch.equal(mine.loss, theirs.loss)


# ---- depth cache -------------------------------------------------------------------------------------------


def cached_and_uncached(model, batch):
    """The model's output with its depth cache as it is, and with the cache disabled (then restored)."""
    with torch.no_grad():
        cached = model(**batch)
        size = model.depth_cache.max_bytes
        uncached_model = copy.deepcopy(model)
        uncached_model.depth_cache.resize(0)
        uncached = uncached_model(**batch)
    assert model.depth_cache.max_bytes == size
    return cached, uncached


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_forward_equals_uncached_across_batches_and_padding(arch):
    prompt, _ = make_models(arch)
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    assert prompt.frozen_depth() == LAYERS - 1
    cache = prompt.depth_cache
    first = make_batch([0, 1, 2, 3])
    cached, uncached = cached_and_uncached(prompt, first)
    assert (cache.hits, cache.misses, len(cache)) == (0, 4, 4)
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-6, atol=1e-6)
    # The same examples shuffled into other batches, padded further, mixed with unseen ones.
    for indices, width in (([3, 1, 0, 2], None), ([2, 5, 0], 20), ([6, 7, 1, 4], 16)):
        batch = make_batch(indices, width=width)
        cached, uncached = cached_and_uncached(prompt, batch)
        torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cached.loss, uncached.loss, rtol=1e-6, atol=1e-6)
    assert cache.hits == 4 + 2 + 1 and len(cache) == 8


def test_cached_encoder_also_serves_the_stock_head_at_attended_positions():
    prompt, stock = make_models()
    freeze_all_but_top_layers(prompt, 2)
    batch = make_batch([0, 1, 2], width=14)
    with torch.no_grad():
        prompt(**batch)  # fill
        cached, reference = prompt(**batch), stock(**batch)
    attended = batch["attention_mask"].bool()
    assert prompt.depth_cache.hits == 3
    torch.testing.assert_close(cached.logits[attended], reference.logits[attended], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.loss, reference.loss, rtol=1e-6, atol=1e-6)


def test_bf16_autocast_entries_never_serve_fp32_forwards():
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    batch = make_batch([0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached_bf16, uncached_bf16 = cached_and_uncached(prompt, batch)
        again_bf16, _ = cached_and_uncached(prompt, batch)
    torch.testing.assert_close(cached_bf16.logits, uncached_bf16.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again_bf16.logits, cached_bf16.logits, rtol=0, atol=0)
    assert prompt.depth_cache.hits == 3
    cached_fp32, uncached_fp32 = cached_and_uncached(prompt, batch)
    assert prompt.depth_cache.misses == 6  # fp32 keys differ from the autocast ones
    torch.testing.assert_close(cached_fp32.logits, uncached_fp32.logits, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cached_fp32.logits, cached_bf16.logits.float(), rtol=0, atol=1e-6)


def test_memory_bound_evicts_least_recently_used():
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    hidden = prompt.config.hidden_size

    def entry_bytes(i):  # hidden states in fp32, plus the key: int64 ids and a bool mask per position
        return POOL_LENGTHS[i] * (hidden * 4 + 8 + 1)

    prompt.depth_cache.resize(entry_bytes(1) + entry_bytes(6))  # room for exactly the last batch
    for indices in ([0, 1], [2, 3], [4, 5], [1, 6]):
        cached, uncached = cached_and_uncached(prompt, make_batch(indices))
        torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-6, atol=1e-6)
        assert prompt.depth_cache.bytes_used <= prompt.depth_cache.max_bytes
    assert len(prompt.depth_cache) == 2 and prompt.depth_cache.evictions == 6
    hits = prompt.depth_cache.hits
    with torch.no_grad():
        prompt(**make_batch([6, 1]))
    assert prompt.depth_cache.hits == hits + 2


def test_active_dropout_bypasses_the_cache_and_zero_dropout_uses_it():
    prompt, _ = make_models(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    batch = make_batch([0, 1])
    prompt.train()
    prompt(**batch)
    assert len(prompt.depth_cache) == 0  # random frozen stack: nothing reusable
    quiet, _ = make_models(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    quiet.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(quiet, 1)
    quiet.train()
    quiet(**batch)
    quiet(**batch)
    assert quiet.depth_cache.hits == 2


def edit_frozen_weight(model, how):
    layer = model.base_model.encoder.layer[0]
    weight = layer.intermediate.dense.weight
    if how == "no_grad in-place":
        with torch.no_grad():
            weight.mul_(1.5)
    elif how == "load_state_dict":
        state = model.state_dict()
        state["roberta.encoder.layer.0.intermediate.dense.weight"] = weight.detach() * 1.5
        model.load_state_dict(state)
    elif how == "data assignment":
        weight.data = weight.data * 1.5
    elif how == "embeddings in-place":
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.5)
    elif how == "parameter replaced":
        layer.intermediate.dense.weight = torch.nn.Parameter(weight.detach() * 1.5, requires_grad=False)
    elif how == "nn.init":
        torch.nn.init.normal_(weight)
    elif how == "norm eps":  # Python state, no tensor changes
        layer.output.LayerNorm.eps = 0.5


@pytest.mark.parametrize(
    "how",
    [
        "no_grad in-place",
        "load_state_dict",
        "data assignment",
        "embeddings in-place",
        "parameter replaced",
        "nn.init",
        "norm eps",
    ],
)
def test_a_changed_frozen_parameter_invalidates_the_cache(how):
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    batch = make_batch([0, 1, 2])
    with torch.no_grad():
        before = prompt(**batch).logits
    edit_frozen_weight(prompt, how)
    cached, uncached = cached_and_uncached(prompt, batch)
    assert prompt.depth_cache.invalidations == 1 and prompt.depth_cache.hits == 0
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cached.logits, before)


def test_unfreezing_a_cached_layer_moves_the_cut_and_mezo_sees_its_perturbation():
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    batch = make_batch([0, 1, 2])
    with torch.no_grad():
        prompt(**batch)
    assert len(prompt.depth_cache) == 3
    prompt.base_model.encoder.layer[0].requires_grad_(True)
    assert prompt.frozen_depth() == 0
    optimizer = ZerothOrderSGD(
        [(n, p) for n, p in prompt.named_parameters() if n.startswith("roberta.encoder.layer.0.")], lr=0.0
    )
    reference = copy.deepcopy(prompt)
    reference.depth_cache.resize(0)
    for scale in (1e-2, -1e-2):
        with perturbed_forward(prompt, optimizer, 0, scale):
            perturbed = prompt(**batch).loss
        with perturbed_forward(reference, ZerothOrderSGD(_named(reference, optimizer), lr=0.0), 0, scale):
            expected = reference(**batch).loss
        torch.testing.assert_close(perturbed, expected, rtol=0, atol=0)
    assert len(prompt.depth_cache) == 0


def _named(model, optimizer):
    names = {name for name, _, _ in optimizer.named_trainable_parameters()}
    return [(n, p) for n, p in model.named_parameters() if n in names]


# ---- MeZO with the cache -----------------------------------------------------------------------------------


def mezo_step(model, optimizer, batch):
    """One MeZO step as MeZOTrainer takes it: two perturbed forwards, accumulate g, update."""
    eps = optimizer.eps
    losses = []
    for scale in (eps, -eps):
        with perturbed_forward(model, optimizer, 0, scale):
            losses.append(model(**batch).loss)
    optimizer.accumulate(0, (losses[0] - losses[1]) / (2 * eps))
    optimizer.step()
    return torch.stack(losses)


def test_mezo_trajectory_with_the_cache_equals_the_trajectory_without():
    trajectories = {}
    for cache_bytes in (1 << 24, 0):
        prompt, _ = make_models(seed=3)
        prompt.set_label_word_ids(LABEL_WORDS)
        prompt.depth_cache.resize(cache_bytes)
        freeze_all_but_top_layers(prompt, 2)
        trainable = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
        optimizer = ZerothOrderSGD(trainable, lr=1e-2, eps=1e-3, seed=7)
        generator = torch.Generator().manual_seed(0)
        losses, seen = [], set()
        for step in range(6):  # reshuffled every step: examples meet new batch-mates and padding
            indices = torch.randperm(len(POOL_LENGTHS), generator=generator)[:4].tolist()
            seen.update(indices)
            losses.append(mezo_step(prompt, optimizer, make_batch(indices, width=[None, 16][step % 2])))
        trajectories[cache_bytes] = (torch.stack(losses), dict(prompt.named_parameters()), prompt.depth_cache)
    (cached_losses, cached_params, cache), (losses, params, _) = trajectories[1 << 24], trajectories[0]
    # Hand count: 6 steps × 2 passes × 4 rows looked up; each distinct example misses once, the rest are served.
    assert (cache.misses, cache.hits) == (len(seen), 6 * 2 * 4 - len(seen))
    torch.testing.assert_close(cached_losses, losses, rtol=1e-6, atol=1e-6)
    for name, param in params.items():
        torch.testing.assert_close(cached_params[name], param, rtol=1e-6, atol=1e-7, msg=name)
    moved = trajectories[0][1]["roberta.encoder.layer.3.output.dense.weight"]
    assert not torch.equal(moved, make_models(seed=3)[0].roberta.encoder.layer[3].output.dense.weight)


@pytest.mark.parametrize("top_layers", [None, 1])
def test_perturbation_reaches_every_trainable_parameter(top_layers):
    """Under perturbed_forward the loss is that of the model whose weights are explicitly θ + εz.

    A weight read outside the forward of the module that owns it would be read unperturbed and break the equality.
    """
    prompt, _ = make_models()
    prompt = prompt.double()
    prompt.set_label_word_ids(LABEL_WORDS)
    if top_layers is not None:
        freeze_all_but_top_layers(prompt, top_layers)
    trainable = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
    optimizer = ZerothOrderSGD(trainable, lr=0.0, seed=5)
    batch = make_batch([0, 1, 2, 3])
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
    assert prompt.frozen_depth() == (0 if top_layers is None else LAYERS - top_layers)


def test_mezo_trainer_trains_and_evaluates_with_the_label_word_head(tmp_path):
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    examples = [{key: value[0] for key, value in make_batch([i]).items()} for i in range(len(POOL_LENGTHS))]

    def collate(features):
        width = max(len(f["input_ids"]) for f in features)
        pad = {"input_ids": 1, "attention_mask": 0, "labels": -100}
        return {
            key: torch.stack([F.pad(f[key], (0, width - len(f[key])), value=value) for f in features])
            for key, value in pad.items()
        }

    args = MeZOConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = MeZOTrainer(prompt, args, train_dataset=examples, eval_dataset=examples, data_collator=collate)
    trainer.train()
    # Hand count: 4 steps × 2 passes × 4 rows = 32 lookups over two epochs of the 8 examples; each misses once.
    assert (prompt.depth_cache.misses, prompt.depth_cache.hits) == (len(examples), 32 - len(examples))
    prediction = trainer.predict(examples)
    assert prediction.predictions.shape == (len(examples), len(LABEL_WORDS))
    assert prediction.metrics["test_loss"] > 0


# ---- checkpoints and freezing ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoints_round_trip_with_the_stock_class(arch, tmp_path):
    prompt_cls, stock_cls, _ = ARCHITECTURES[arch]
    prompt, stock = make_models(arch)
    stock.save_pretrained(tmp_path / "stock")
    loaded, info = prompt_cls.from_pretrained(tmp_path / "stock", output_loading_info=True)
    assert not any(info.values()), info
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    for name, tensor in stock.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    loaded.set_label_word_ids(LABEL_WORDS, mask_token_id=MASK_ID)
    loaded.save_pretrained(tmp_path / "prompt")
    back, info = stock_cls.from_pretrained(tmp_path / "prompt", output_loading_info=True)
    assert not any(info.values()), info
    batch = make_batch([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(back.eval()(**batch).logits, stock(**batch).logits)
    again = prompt_cls.from_pretrained(tmp_path / "prompt")
    assert again.label_word_ids == LABEL_WORDS and again.config.mask_token_id == MASK_ID
    assert prompt_cls.from_pretrained(tmp_path / "prompt", label_word_ids=[9, 8]).label_word_ids == [9, 8]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_freeze_all_but_top_layers_trains_top_layers_and_head_but_not_the_tied_decoder(arch):
    prompt, stock = make_models(arch)
    for model in (prompt, stock):
        names = freeze_all_but_top_layers(model, 1)
        prefix = model.base_model_prefix
        assert all(n.startswith(f"{prefix}.encoder.layer.{LAYERS - 1}.") or not n.startswith(prefix) for n in names)
        assert any(n.startswith(f"{prefix}.encoder.layer.{LAYERS - 1}.") for n in names)
        assert not model.get_input_embeddings().weight.requires_grad
        assert model.get_output_embeddings().bias.requires_grad
        head_names = [n for n in names if not n.startswith(prefix)]
        assert len(head_names) == 5, head_names  # dense weight/bias, LayerNorm weight/bias, output bias
    assert prompt.frozen_depth() == LAYERS - 1
    freeze_all_but_top_layers(prompt, 0)
    assert prompt.frozen_depth() == LAYERS
    with pytest.raises(ValueError, match="k must be"):
        freeze_all_but_top_layers(prompt, LAYERS + 1)


def test_peft_adapters_on_top_layers_are_cut_above_the_cache():
    peft = pytest.importorskip("peft")
    prompt, _ = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[LAYERS - 1])
    model = peft.get_peft_model(prompt, config)
    assert prompt.frozen_depth() == LAYERS - 1
    batch = make_batch([0, 1, 2])
    with torch.no_grad():
        model(**batch)
        cached = model(**batch)
    assert prompt.depth_cache.hits == 3
    prompt.depth_cache.resize(0)
    with torch.no_grad():
        uncached = model(**batch)
    torch.testing.assert_close(cached.logits, uncached.logits, rtol=1e-6, atol=1e-6)


def test_sharded_layers_run_whole_and_are_never_cached():
    """Under FSDP2 every rank must call every sharded layer (its collectives): no cache, no partial last layer."""
    dist = pytest.importorskip("torch.distributed")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    prompt, stock = make_models()
    prompt.set_label_word_ids(LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    batch = make_batch([0, 1, 2])
    positions, _ = masks_and_classes(batch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for layer in prompt.roberta.encoder.layer:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(prompt)
        with torch.no_grad():
            sharded = prompt(**batch)
            prompt(**batch)
    finally:
        dist.destroy_process_group()
    assert len(prompt.depth_cache) == 0
    with torch.no_grad():
        expected = stock(**batch).logits[torch.arange(3), positions][:, LABEL_WORDS]
    torch.testing.assert_close(sharded.logits, expected, rtol=1e-5, atol=1e-6)


def test_bert_checkpoint_without_mlm_head_loads_with_an_initialized_head(tmp_path):
    """A sentence-embedding BERT (no MLM head), like the demo's MiniLM: the new head must be real and tied."""
    from transformers import BertConfig, BertModel

    from hf_mezo.models import BertForPromptMaskedLM

    config = BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path)
    model = BertForPromptMaskedLM.from_pretrained(tmp_path, label_word_ids=[5, 7])
    assert not any(p.is_meta for p in model.parameters())
    head = model.cls.predictions
    assert head.bias is head.decoder.bias and torch.equal(head.bias, torch.zeros(99))
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model(input_ids=torch.tensor([[2, 3, 4]]), mask_positions=torch.tensor([1])).logits.shape == (1, 2)


def test_module_state_fingerprint_sees_peft_scaling_and_adapter_switches():
    from peft import LoraConfig, get_peft_model

    from hf_mezo.models.depth_cache import module_state_fingerprint

    from .conftest import tiny_roberta_config

    torch.manual_seed(0)
    model = get_peft_model(
        RobertaForMaskedLM(tiny_roberta_config()), LoraConfig(r=2, target_modules=["query", "value"])
    )
    layer = model.base_model.model.roberta.encoder.layer[0]
    seen = [module_state_fingerprint(layer.modules())]
    layer.attention.self.query.set_scale("default", 0.5)  # peft's scaling: a dict entry, no tensor changes
    seen.append(module_state_fingerprint(layer.modules()))
    model.base_model.disable_adapter_layers()
    seen.append(module_state_fingerprint(layer.modules()))
    model.base_model.enable_adapter_layers()
    seen.append(module_state_fingerprint(layer.modules()))
    assert len(set(seen[:3])) == 3 and seen[3] == seen[1]
    assert module_state_fingerprint(layer.modules()) == seen[3]  # and stable when nothing changes
