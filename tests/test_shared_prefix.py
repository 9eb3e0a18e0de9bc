"""Shared-prefix KV (hf_mezo.models.shared_prefix): the common prefix found by hand, class logits with sharing equal
the stock model's (rows alone) and the unshared forward, with the depth cache, a LoRA adapter and through a MeZO step;
where sharing cannot be exact the unshared forward runs unchanged. Tiny models from configs."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from hf_mezo import MeZOTrainer
from hf_mezo.models import Qwen2ForPromptCausalLM, freeze_all_but_top_layers
from hf_mezo.models.shared_prefix import find_shared_prefix

from .conftest import mezo_args, snapshot
from .test_prompt_causal import ARCHITECTURES, LABEL_WORDS, VOCAB, stock_label_word_logits

PREFIX = 10
SUFFIXES = [3, 7, 1, 5]


def _qwen2_gqa_config():
    # One key/value head for four query heads; no sliding window (where sharing stands down, tested below).
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )


MODELS = {
    "llama": ARCHITECTURES["llama"],
    "qwen2": (Qwen2ForPromptCausalLM, Qwen2ForCausalLM, _qwen2_gqa_config),
    "opt": ARCHITECTURES["opt"],
    "gpt2": ARCHITECTURES["gpt2"],
}


def make_models(arch, dtype=torch.float32, attn="sdpa"):
    prompt_cls, stock_cls, config = MODELS[arch]
    torch.manual_seed(0)
    stock = stock_cls(config()).to(dtype).eval()
    prompt_config = config()
    prompt_config._attn_implementation = attn
    prompt = prompt_cls(prompt_config, label_word_ids=LABEL_WORDS).to(dtype).eval()
    prompt.load_state_dict(stock.state_dict())
    return prompt, stock


def prefixed_batch(side="right", suffixes=SUFFIXES, prefix=PREFIX, seed=0):
    """Rows = one random prefix + a random suffix each, padded on `side` (pad id 3, never drawn)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(20, VOCAB, (prefix,), generator=g)
    rows = [torch.cat([shared, torch.randint(20, VOCAB, (n,), generator=g)]) for n in suffixes]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), 3)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[i, start : start + len(row)], mask[i, start : start + len(row)] = row, 1
    return ids, mask


def class_logits(model, ids, mask, share):
    model.share_prefix = share
    model.reset_shared_prefix_stats()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, dict(model.shared_prefix_stats)


def test_find_shared_prefix_by_hand_either_padding_side():
    ids = torch.tensor([[7, 7, 5, 6, 1, 0, 0], [7, 7, 5, 6, 2, 8, 9], [7, 7, 5, 4, 2, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[5], [7], [5]])).long()
    plan = find_shared_prefix(ids, mask, None, min_tokens=1)
    assert plan.length == 3  # 7 7 5
    assert plan.starts.tolist() == [0, 0, 0]
    assert plan.suffix_valid.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert plan.suffix_index[1].tolist() == [3, 4, 5, 6]
    left_ids = torch.stack([row.roll(int(7 - m.sum())) for row, m in zip(ids, mask)])
    left_mask = mask.flip(1)
    left = find_shared_prefix(left_ids, left_mask, None, min_tokens=1)
    assert left.length == 3 and left.starts.tolist() == [2, 0, 2]
    assert left.suffix_index[0].tolist()[:2] == [5, 6]
    # The prefix stops one token short of the shortest row; thresholds, one row, holes and no prefix: None.
    same = torch.tensor([[4, 5, 6], [4, 5, 6]])
    assert find_shared_prefix(same, None, None, min_tokens=1).length == 2
    assert find_shared_prefix(ids, mask, None, min_tokens=4) is None
    assert find_shared_prefix(ids[:1], mask[:1], None, min_tokens=1) is None
    holes = mask.clone()
    holes[1, 2] = 0
    assert find_shared_prefix(ids, holes, None, min_tokens=1) is None
    assert find_shared_prefix(torch.tensor([[1, 2], [2, 1]]), None, None, min_tokens=1) is None
    # Caller positions that differ on the prefix make it not shared.
    positions = torch.arange(7).expand(3, -1).clone()
    positions[2] += 1
    assert find_shared_prefix(ids, mask, positions, min_tokens=1) is None


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_shared_class_logits_equal_stock_rows_and_unshared_forward(arch, side):
    prompt, stock = make_models(arch)
    ids, mask = prefixed_batch(side)
    shared, stats = class_logits(prompt, ids, mask, True)
    unshared, off_stats = class_logits(prompt, ids, mask, False)
    assert stats["last_shared_tokens"] == PREFIX  # the 1-token suffix row keeps its only token
    assert stats["saved_token_layers"] == (len(SUFFIXES) - 1) * PREFIX * 3
    assert off_stats["shared_layer_runs"] == 0
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)
    for i in range(len(ids)):  # each row alone through the stock class: an independent computation
        row = mask[i].bool()
        expected = stock_label_word_logits(stock, ids[i, row][None], mask[i, row][None])
        torch.testing.assert_close(shared[i : i + 1], expected, rtol=0, atol=1e-5)


def test_eager_attention_shares_too():
    prompt, _ = make_models("llama", attn="eager")
    ids, mask = prefixed_batch("left")
    shared, stats = class_logits(prompt, ids, mask, True)
    unshared, _ = class_logits(prompt, ids, mask, False)
    assert stats["shared_layer_runs"] == 1
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_shared_prefix_with_the_depth_cache(arch):
    """Below the cut the prefix is shared on cache misses (computed once per missed batch); above it, every pass."""
    prompt, _ = make_models(arch)
    freeze_all_but_top_layers(prompt, 1)
    ids, mask = prefixed_batch("left")
    unshared_prompt, _ = make_models(arch)
    unshared_prompt.depth_cache.resize(0)
    expected, _ = class_logits(unshared_prompt, ids, mask, False)
    first, stats = class_logits(prompt, ids, mask, True)  # misses: lower stack shared, then the top layer shared
    assert stats["shared_layer_runs"] == 2 and stats["saved_token_layers"] == 3 * PREFIX * 3
    assert prompt.depth_cache.misses == len(ids)
    right_ids, right_mask = prefixed_batch("right")
    second, stats = class_logits(prompt, right_ids, right_mask, True)  # all hits: only the top layer runs
    assert prompt.depth_cache.hits == len(ids)
    assert stats["shared_layer_runs"] == 1 and stats["saved_token_layers"] == 3 * PREFIX * 1
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(second, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shared_prefix_with_a_lora_adapter(arch):
    from peft import LoraConfig, get_peft_model

    prompt, _ = make_models(arch)
    targets = ["q_proj", "v_proj"]
    model = get_peft_model(prompt, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    ids, mask = prefixed_batch("left")
    shared, stats = class_logits(prompt, ids, mask, True)
    unshared, _ = class_logits(prompt, ids, mask, False)
    with model.disable_adapter():
        base, _ = class_logits(prompt, ids, mask, True)
    assert stats["shared_layer_runs"] == 1
    assert (shared - base).abs().max() > 1e-3  # the adapter is live
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)


def test_batch_without_a_common_prefix_is_the_unshared_forward_exactly():
    prompt, _ = make_models("llama")
    ids, mask = prefixed_batch("right", prefix=0)
    shared, stats = class_logits(prompt, ids, mask, True)
    unshared, _ = class_logits(prompt, ids, mask, False)
    assert stats["shared_layer_runs"] == 0
    assert torch.equal(shared, unshared)
    # Too short a prefix (below share_prefix_min_tokens) stands down the same way.
    short_ids, short_mask = prefixed_batch("right", prefix=4)
    _, stats = class_logits(prompt, short_ids, short_mask, True)
    assert stats["shared_layer_runs"] == 0
    prompt.config.share_prefix_min_tokens = 4
    _, stats = class_logits(prompt, short_ids, short_mask, True)
    assert stats["shared_layer_runs"] == 1


def test_sharing_stands_down_for_dropout_and_sliding_windows():
    prompt, _ = make_models("opt")
    prompt.model.decoder.layers[0].dropout = 0.1
    prompt.train()
    ids, mask = prefixed_batch("right")
    _, stats = class_logits(prompt, ids, mask, True)
    assert stats["shared_layer_runs"] == 0 and stats["layer_runs"] == 1
    sliding_cls, _, sliding_config = ARCHITECTURES["qwen2"]  # sliding-window top layers
    sliding = sliding_cls(sliding_config(), label_word_ids=LABEL_WORDS).eval()
    _, stats = class_logits(sliding, ids, mask, True)
    assert stats["shared_layer_runs"] == 0
    checkpointed, _ = make_models("llama")
    checkpointed.gradient_checkpointing_enable()
    checkpointed.train()
    checkpointed.reset_shared_prefix_stats()
    loss = checkpointed(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2, 1])).loss
    loss.backward()
    assert checkpointed.shared_prefix_stats["shared_layer_runs"] == 0


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_mezo_estimator_with_sharing_float64(arch, tmp_path):
    """One MeZOTrainer step through shared forwards: Δθ = −η·g·z with g = zᵀ∇L from autograd on the unshared model."""
    from datasets import Dataset

    prompt, _ = make_models(arch, dtype=torch.float64)
    freeze_all_but_top_layers(prompt, 1)
    ids, mask = prefixed_batch("right", suffixes=[3, 5, 2, 4, 1, 6, 3, 2])
    data = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [0, 1, 2] * 2 + [0, 1]}
    )
    eta, eps = 1e-3, 1e-6
    args = mezo_args(tmp_path, learning_rate=eta, zo_eps=eps, weight_decay=0.0, zo_distribution="rademacher")
    before = snapshot(prompt)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(data["labels"])}
    trainable = [n for n, p in prompt.named_parameters() if p.requires_grad]
    params = dict(prompt.named_parameters())
    prompt.share_prefix = False
    grads = torch.autograd.grad(prompt(**batch).loss, [params[n] for n in trainable])
    prompt.share_prefix = True
    prompt.reset_shared_prefix_stats()

    trainer = MeZOTrainer(model=prompt, args=args, train_dataset=data)
    trainer.create_optimizer()
    z = {n: trainer.zo_optimizer.direction(params[n], 0).view_as(params[n]).clone() for n in trainable}
    directional = float(sum((g * z[n]).sum() for n, g in zip(trainable, grads)))
    trainer.train()
    deltas = {n: params[n].detach() - before[n] for n in trainable}
    g_observed = float(sum((deltas[n] * z[n]).sum() for n in z) / (-eta * sum((z[n] ** 2).sum() for n in z)))
    for n in trainable:
        torch.testing.assert_close(deltas[n], -eta * g_observed * z[n], rtol=1e-9, atol=1e-15)
    assert abs(g_observed - directional) <= 1e-6 * abs(directional)
    assert prompt.shared_prefix_stats["shared_layer_runs"] >= 2  # both passes shared (the batch may be shuffled)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shared_prefix_in_bfloat16(arch):
    """bf16 sharing lands as close to the fp32 forward as bf16 without sharing does (its rounding, ~5e-4 here)."""
    reference_model, _ = make_models(arch)
    model, _ = make_models(arch, dtype=torch.bfloat16)
    ids, mask = prefixed_batch("left")
    reference, _ = class_logits(reference_model, ids, mask, False)
    shared, stats = class_logits(model, ids, mask, True)
    assert stats["shared_layer_runs"] == 1 and shared.dtype == torch.bfloat16
    torch.testing.assert_close(shared.float(), reference, rtol=0, atol=2e-3)
