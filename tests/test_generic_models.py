"""The generic prompt LMs (`AutoModelForPromptCausalLM` / `AutoModelForPromptMaskedLM`) on families hf_mezo has no
class for: class logits against the stock model's full-vocabulary logits (rows alone, left- and right-padded
batches), multi-token label words against a teacher-forced computation, checkpoints, the MeZO estimator.
Tiny models from configs."""

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BloomConfig,
    BloomForCausalLM,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ElectraConfig,
    ElectraForMaskedLM,
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaForMaskedLM,
)

import hf_mezo.models.multi_token as multi_token
from hf_mezo import (
    AutoModelForPromptCausalLM,
    AutoModelForPromptMaskedLM,
    MeZOTrainer,
    ZerothOrderSGD,
    perturbed_forward,
)
from hf_mezo.models import LlamaForPromptCausalLM, freeze_all_but_top_layers
from hf_mezo.models.families import FAMILY_LAYOUTS

from .conftest import mezo_args, snapshot, tiny_roberta_config

VOCAB = 64
LABEL_WORDS = [5, 9, 13]
MULTI_TOKEN_WORDS = [[5, 6, 7], [9], [13, 14]]
LENGTHS = [7, 4, 10, 5]
MASK = 4
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=4, max_position_embeddings=64
)

# Decoder families: GQA, untied heads, sliding windows shorter than the prompts, hybrid sliding/full layers,
# logit soft-capping, fused QKV, parallel attention/MLP blocks, ALiBi, learned positions.
CAUSAL = {
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(
            **_SMALL, num_hidden_layers=2, num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False
        )
    ),
    "qwen3": lambda: Qwen3ForCausalLM(
        Qwen3Config(**_SMALL, num_hidden_layers=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    ),
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **_SMALL,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0,
        )
    ),
    "gemma3_text": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_SMALL,
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            sliding_window_pattern=2,
        )
    ),
    "phi3": lambda: Phi3ForCausalLM(
        Phi3Config(**_SMALL, num_hidden_layers=2, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False)
    ),
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(**_SMALL, num_hidden_layers=2, rotary_pct=0.5, use_parallel_residual=True)
    ),
    "falcon": lambda: FalconForCausalLM(
        FalconConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            parallel_attn=True,
        )
    ),
    "bloom": lambda: BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=16, n_layer=2, n_head=4)),
    "opt_post_norm": lambda: OPTForCausalLM(
        OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            do_layer_norm_before=False,
            pad_token_id=1,
        )
    ),
    # Families that also have a class of their own, through the generic path.
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_SMALL, num_hidden_layers=2, num_key_value_heads=2)),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(
            **_SMALL,
            num_hidden_layers=2,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        )
    ),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=4, n_positions=64)),
}

# Encoder families: local/global attention (ModernBERT), relative positions (DeBERTa-v2), a small generator with
# its own embedding size (ELECTRA), no token types (DistilBERT); all post-norm except ModernBERT.
MASKED = {
    "modernbert": lambda: ModernBertForMaskedLM(
        ModernBertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            local_attention=4,
            global_attn_every_n_layers=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        )
    ),
    "deberta_v2": lambda: DebertaV2ForMaskedLM(
        DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
            pad_token_id=0,
        )
    ),
    # legacy=False: the head multiplies by the embedding matrix inline (no output-embedding module over the vocabulary)
    "deberta_v2_inline_head": lambda: DebertaV2ForMaskedLM(
        DebertaV2Config(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            legacy=False,
            pad_token_id=0,
        )
    ),
    "electra": lambda: ElectraForMaskedLM(
        ElectraConfig(
            vocab_size=VOCAB,
            embedding_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ),
    "distilbert": lambda: DistilBertForMaskedLM(
        DistilBertConfig(vocab_size=VOCAB, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64)
    ),
    "roberta": lambda: RobertaForMaskedLM(tiny_roberta_config(vocab_size=VOCAB)),
    "bert": lambda: BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    ),
}


def make_models(family, dtype=torch.float32, **prompt_kwargs):
    """(prompt model, stock model) with identical weights; the prompt model wraps a copy of the stock one."""
    auto = AutoModelForPromptCausalLM if family in CAUSAL else AutoModelForPromptMaskedLM
    torch.manual_seed(0)
    stock = (CAUSAL if family in CAUSAL else MASKED)[family]().to(dtype).eval()
    return auto.from_model(copy.deepcopy(stock), **prompt_kwargs), stock


def make_rows(masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(20, VOCAB, (n,), generator=g) for n in LENGTHS]
    if masked:
        for row in rows:
            row[len(row) // 2] = MASK
    return rows


def pad(rows, side, width=12, pad_id=3):
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[i, start : start + len(row)], mask[i, start : start + len(row)] = row, 1
    return ids, mask


@pytest.mark.parametrize("family", CAUSAL)
def test_causal_class_logits_equal_stock_logits_of_each_row_alone(family):
    prompt, stock = make_models(family, label_word_ids=LABEL_WORDS)
    rows = make_rows()
    last_mlp_inputs = _watch_last_layer_feed_forward(prompt)
    with torch.no_grad():
        alone = torch.stack([stock(input_ids=row[None]).logits[0, -1, LABEL_WORDS] for row in rows])
        for side in ("right", "left"):
            logits = prompt(*pad(rows, side)).logits
            assert logits.shape == (len(rows), len(LABEL_WORDS))
            torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5, msg=f"{family} {side}")
        torch.testing.assert_close(prompt(input_ids=rows[2][None]).logits[0], alone[2], rtol=0, atol=1e-5)
    if last_mlp_inputs is not None:  # the table's recipe ran the last layer's MLP at the label positions only
        assert {shape[:-1] for shape in last_mlp_inputs} == {(len(rows),), (1,)}


def _watch_last_layer_feed_forward(prompt):
    """Shapes of what the last layer's feed-forward block receives, for a family whose table entry has a recipe."""
    layout = FAMILY_LAYOUTS.get(prompt.config.model_type)
    if layout is None or layout.query_layer is None:
        return None
    last = prompt._stack_layers()[-1]
    block = last.mlp if layout.query_layer == "llama" else last.intermediate
    shapes = []
    block.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    return shapes


@pytest.mark.parametrize("family", MASKED)
def test_masked_class_logits_equal_stock_logits_of_each_row_alone(family):
    prompt, stock = make_models(family, label_word_ids=LABEL_WORDS, mask_token_id=MASK)
    rows = make_rows(masked=True)
    decoder_inputs = []
    prompt.get_output_embeddings().register_forward_hook(lambda m, args, out: decoder_inputs.append(out.shape))
    feed_forward_inputs = _watch_last_layer_feed_forward(prompt)
    with torch.no_grad():
        alone = torch.stack([stock(input_ids=row[None]).logits[0, len(row) // 2, LABEL_WORDS] for row in rows])
        for side in ("right", "left"):
            logits = prompt(*pad(rows, side, pad_id=0)).logits
            torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5, msg=f"{family} {side}")
    # The head ran at the mask, for the label words (DeBERTa-v2's inline head: at the mask, for the vocabulary).
    restricted = family != "deberta_v2_inline_head"
    assert set(decoder_inputs) == {(len(rows), 1, len(LABEL_WORDS) if restricted else 16)}
    if feed_forward_inputs is not None:  # and the last layer's feed-forward block at the mask only
        assert {shape[:-1] for shape in feed_forward_inputs} == {(len(rows),)}


def test_sliding_windows_are_the_stock_ones():
    """Mistral's window (4) is shorter than the prompts: forgetting it moves the scores far beyond the tolerance."""
    prompt, stock = make_models("mistral", label_word_ids=LABEL_WORDS)
    full = copy.deepcopy(stock)
    full.config.sliding_window = None
    row = make_rows()[2]
    with torch.no_grad():
        windowed, unwindowed = (m(input_ids=row[None]).logits[0, -1, LABEL_WORDS] for m in (stock, full))
        scores = prompt(*pad(make_rows(), "left")).logits[2]
    assert (windowed - unwindowed).abs().max() > 1e-3
    torch.testing.assert_close(scores, windowed, rtol=0, atol=1e-5)


TABLE_FAMILIES = [f for f in [*CAUSAL, *MASKED] if f.replace("_post_norm", "") in FAMILY_LAYOUTS]


@pytest.mark.parametrize("family", TABLE_FAMILIES)
def test_depth_cache_serves_the_frozen_layers_exactly(family):
    """Every table family: with the bottom layers frozen, a repeated example skips them (nothing in them runs) and
    gets the uncached and the stock scores, whatever its padding side."""
    masked = family in MASKED
    kwargs = dict(label_word_ids=LABEL_WORDS, mask_token_id=MASK) if masked else dict(label_word_ids=LABEL_WORDS)
    prompt, stock = make_models(family, **kwargs)
    freeze_all_but_top_layers(prompt, 1)
    depth = len(prompt._stack_layers()) - 1
    assert prompt.frozen_depth() == depth
    uncached = copy.deepcopy(prompt)
    uncached.depth_cache.resize(0)
    rows = make_rows(masked=masked)
    alone = []
    with torch.no_grad():
        for row in rows:
            logits = stock(input_ids=row[None]).logits[0]
            alone.append(logits[len(row) // 2 if masked else -1, LABEL_WORDS])
    calls = []
    first_frozen = next(prompt._stack_layers()[0].children())
    first_frozen.register_forward_pre_hook(lambda *_: calls.append(1))
    seen = []
    for side in ("right", "left", "right"):
        ids, mask = pad(rows, side, pad_id=0 if masked else 3)
        calls.clear()
        with torch.no_grad():
            logits = prompt(ids, attention_mask=mask).logits
            expected = uncached(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits, torch.stack(alone), rtol=0, atol=1e-5)
        seen.append((prompt.depth_cache.hits, prompt.depth_cache.misses, len(calls)))
    assert seen == [(0, 4, 1), (4, 4, 0), (8, 4, 0)]  # the same four examples, however padded; then no layer runs
    with torch.no_grad():  # a write below the cut empties the cache
        prompt.get_input_embeddings().weight[LABEL_WORDS[0]] += 1.0
        ids, mask = pad(rows, "right", pad_id=0 if masked else 3)
        prompt(ids, attention_mask=mask)
    assert prompt.depth_cache.invalidations == 1 and prompt.depth_cache.misses == 8


def test_a_family_outside_the_table_runs_exactly_without_the_depth_cache():
    prompt, stock = make_models("bloom", label_word_ids=LABEL_WORDS)
    prompt.requires_grad_(False)
    prompt.transformer.h[-1].requires_grad_(True)
    rows = make_rows()
    with torch.no_grad():
        for _ in range(2):
            logits = prompt(*pad(rows, "left")).logits
    alone = torch.stack([stock(input_ids=row[None]).logits[0, -1, LABEL_WORDS] for row in rows]).detach()
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    assert len(prompt.depth_cache) == 0
    with pytest.raises(TypeError, match="FAMILY_LAYOUTS"):
        prompt.frozen_depth()


def prefixed_rows(seed=1, prefix_length=10, suffix_lengths=(3, 1, 5, 2)):
    """Rows sharing their first `prefix_length` tokens (an instruction, demonstrations), then their own."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(20, VOCAB, (prefix_length,), generator=g)
    return [torch.cat([prefix, torch.randint(20, VOCAB, (n,), generator=g)]) for n in suffix_lengths]


@pytest.mark.parametrize("family", CAUSAL)
def test_shared_prefix_scores_equal_stock_logits_of_each_row_alone(family):
    """The common prefix runs once through the KV-cache API, sliding windows (4 < 10 prefix tokens) included."""
    prompt, stock = make_models(family, label_word_ids=LABEL_WORDS)
    rows = prefixed_rows()
    with torch.no_grad():
        alone = torch.stack([stock(input_ids=row[None]).logits[0, -1, LABEL_WORDS] for row in rows])
        for side in ("right", "left"):
            prompt.reset_shared_prefix_stats()
            logits = prompt(*pad(rows, side, width=17)).logits
            torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5, msg=f"{family} {side}")
            stats = prompt.shared_prefix_stats
            assert stats["shared_layer_runs"] == 1 and stats["last_shared_tokens"] == 10
    prompt.share_prefix = False
    prompt.reset_shared_prefix_stats()
    with torch.no_grad():
        torch.testing.assert_close(prompt(*pad(rows, "left", width=17)).logits, alone, rtol=0, atol=1e-5)
    assert prompt.shared_prefix_stats["shared_layer_runs"] == 0


@pytest.mark.parametrize("family", ["mistral", "gpt2", "falcon"])
def test_shared_prefix_fills_the_depth_cache_and_served_rows_run_unshared(family):
    """Cache misses run shared (the frozen rows are merged back from the prefix and the rows' own tokens); hits skip
    the frozen layers and run the top ones unshared. Both equal the stock model on each row alone."""
    prompt, stock = make_models(family, label_word_ids=LABEL_WORDS)
    freeze_all_but_top_layers(prompt, 1)
    rows = prefixed_rows()
    with torch.no_grad():
        alone = torch.stack([stock(input_ids=row[None]).logits[0, -1, LABEL_WORDS] for row in rows])
        seen = []
        for side in ("left", "right"):
            logits = prompt(*pad(rows, side, width=17)).logits
            torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5, msg=f"{family} {side}")
            cache, stats = prompt.depth_cache, prompt.shared_prefix_stats
            seen.append((cache.hits, cache.misses, stats["shared_layer_runs"]))
    assert seen == [(0, 4, 1), (4, 4, 1)]


def teacher_forced_scores(stock, row, words):
    """Each word's mean token log-probability after `row`, from one stock forward of prompt + word, alone."""
    scores = []
    for word in words:
        sequence = torch.cat([row, torch.tensor(word)])[None]
        log_probs = torch.log_softmax(stock(input_ids=sequence).logits[0].double(), dim=-1)
        scores.append(sum(log_probs[len(row) - 1 + j, t] for j, t in enumerate(word)) / len(word))
    return torch.stack(scores)


@pytest.mark.parametrize(
    "family", ["mistral", "gemma2", "gemma3_text", "gpt_neox", "falcon", "bloom", "gpt2", "llama"]
)
def test_multi_token_scores_equal_a_teacher_forced_computation(family, monkeypatch):
    prompt, stock = make_models(family, label_word_ids=MULTI_TOKEN_WORDS)
    rows = make_rows()
    shared = []
    run_shared = multi_token._shared_prompt_scores
    monkeypatch.setattr(multi_token, "_shared_prompt_scores", lambda *a: shared.append(1) or run_shared(*a))
    classes = torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        expected = torch.stack([teacher_forced_scores(stock, row, MULTI_TOKEN_WORDS) for row in rows]).float()
        for side in ("right", "left"):
            out = prompt(*pad(rows, side), labels=classes)
            torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-5, msg=f"{family} {side}")
            torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, classes))
    # The prompt runs once per row (through its KV cache) where the forward takes position ids; Bloom's does not.
    assert bool(shared) == (family != "bloom")


def test_multi_token_shared_and_expanded_paths_agree():
    prompt, _ = make_models("gemma2", label_word_ids=MULTI_TOKEN_WORDS)
    ids, mask = pad(make_rows(), "right")
    positions = mask.sum(1) - 1
    words = MULTI_TOKEN_WORDS

    def run(**kwargs):
        return type(prompt)._stock_forward(prompt, **kwargs)

    with torch.no_grad():
        shared = multi_token.multi_token_scores(run, ids, mask, positions, words, share_prompt=True)
        expanded = multi_token.multi_token_scores(run, ids, mask, positions, words, share_prompt=False)
    torch.testing.assert_close(shared, expanded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "phi3", "modernbert", "distilbert"])
def test_stock_checkpoints_round_trip(family, tmp_path):
    masked = family in MASKED
    auto = AutoModelForPromptMaskedLM if masked else AutoModelForPromptCausalLM
    _, stock = make_models(family)
    stock.save_pretrained(tmp_path / "stock")
    loaded, info = auto.from_pretrained(tmp_path / "stock", label_word_ids=LABEL_WORDS, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in stock.named_parameters()]
    if stock.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    loaded.save_pretrained(tmp_path / "prompt")
    back, info = type(stock).from_pretrained(tmp_path / "prompt", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in stock.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    again = auto.from_pretrained(tmp_path / "prompt")
    assert again.label_word_ids == LABEL_WORDS
    assert isinstance(again, type(stock))


def test_causal_lm_labels_give_the_class_loss_on_either_padding_side():
    """Causal-LM `labels` (batch, length) mark the label word after the prompt; the rows move, the labels must not."""
    prompt, _ = make_models("qwen3", label_word_ids=LABEL_WORDS)
    classes = torch.tensor([2, 0, 1, 0])
    rows = make_rows()
    with_words = [torch.cat([row, torch.tensor([LABEL_WORDS[c]])]) for row, c in zip(rows, classes.tolist())]
    with torch.no_grad():
        expected = prompt(*pad(rows, "right"), class_labels=classes)
        for side in ("right", "left"):
            ids, mask = pad(with_words, side)
            labels = torch.full_like(ids, -100)
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
            labels[torch.arange(len(ids)), last] = ids[torch.arange(len(ids)), last]
            out = prompt(ids, attention_mask=mask, labels=labels)
            torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5, msg=side)
            torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6, msg=side)


def test_without_label_words_the_forward_is_the_stock_forward():
    prompt, stock = make_models("mistral")
    ids, mask = pad(make_rows(), "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out, ref = prompt(ids, attention_mask=mask, labels=labels), stock(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no label words"):
        prompt(ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1]))


def test_masked_lms_and_family_classes_refuse_multi_token_words():
    prompt, _ = make_models("electra")
    with pytest.raises(ValueError, match=r"multi-token words \[\[5, 6, 7\].*AutoModelForPromptCausalLM"):
        prompt.set_label_word_ids(MULTI_TOKEN_WORDS)
    with pytest.raises(ValueError, match="multi-token words"):
        LlamaForPromptCausalLM(LlamaConfig(**_SMALL, num_hidden_layers=1), label_word_ids=MULTI_TOKEN_WORDS)


def test_factory_errors_name_the_fix():
    with pytest.raises(OSError, match="from_pretrained"):
        AutoModelForPromptCausalLM()
    with pytest.raises(ValueError, match="AutoModelForPromptMaskedLM"):
        AutoModelForPromptCausalLM.from_config(DistilBertConfig())  # an encoder without a causal LM class
    prompt, _ = make_models("mistral")
    with pytest.raises(TypeError, match="already a prompt LM"):
        AutoModelForPromptCausalLM.from_model(prompt)
    with pytest.raises(TypeError, match="stock AutoModelForMaskedLM class"):
        AutoModelForPromptMaskedLM.from_model(CAUSAL["mistral"]())


def test_from_config_builds_the_stock_module_tree():
    config = MistralConfig(**_SMALL, num_hidden_layers=1, sliding_window=4)
    torch.manual_seed(0)
    model = AutoModelForPromptCausalLM.from_config(config, label_word_ids=LABEL_WORDS)
    stock = MistralForCausalLM(config)
    assert isinstance(model, MistralForCausalLM)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert model.label_word_ids == LABEL_WORDS


def test_llama_class_refuses_a_mistral_checkpoint_which_the_generic_class_scores_exactly(tmp_path):
    """The Mistral checkpoint has Llama's parameter names; the Llama class would drop its sliding window."""
    _, stock = make_models("mistral")
    stock.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'mistral' \(sliding_window=4\).*AutoModelForPromptCausalLM"):
        LlamaForPromptCausalLM.from_pretrained(tmp_path, label_word_ids=LABEL_WORDS)
    with pytest.raises(ValueError, match="sliding_window=4"):
        LlamaForPromptCausalLM(LlamaConfig(**_SMALL, num_hidden_layers=1, sliding_window=4))
    model = AutoModelForPromptCausalLM.from_pretrained(tmp_path, label_word_ids=LABEL_WORDS).eval()
    row = make_rows()[2]
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=row[None]).logits[0],
            stock(input_ids=row[None]).logits[0, -1, LABEL_WORDS],
            rtol=0,
            atol=1e-5,
        )


def _class_dataset(n=8, prefix_length=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(20, VOCAB, (prefix_length,), generator=g)
    lengths = [5 + i % 4 for i in range(n)]
    rows = [torch.cat([prefix, torch.randint(20, VOCAB, (k,), generator=g)]) for k in lengths]
    ids, mask = pad(rows, "left", width=max(len(r) for r in rows))
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [i % 3 for i in range(n)]}
    )


@pytest.mark.parametrize(
    "words, speedup",
    [
        (LABEL_WORDS, "depth cache"),
        (LABEL_WORDS, "shared prefix"),
        (LABEL_WORDS, "both"),
        (MULTI_TOKEN_WORDS, "depth cache"),
    ],
    ids=["single-token-depth-cache", "single-token-shared-prefix", "single-token-both", "multi-token"],
)
def test_mezo_estimator_through_the_generic_causal_lm_float64(words, speedup, tmp_path):
    """One MeZOTrainer step on GPT-NeoX (LayerNorm, parallel attention; its arithmetic stays in float64):
    Δθ = −η·g·z with g = zᵀ∇L from autograd on the same batch, to 1e-6 relative at ε = 1e-6 — with the frozen
    bottom layer served from the depth cache, the rows' common prefix shared, or both."""
    prompt, _ = make_models("gpt_neox", dtype=torch.float64, label_word_ids=words)
    if speedup in ("depth cache", "both"):
        freeze_all_but_top_layers(prompt, 1)
    data = _class_dataset(prefix_length=8 if speedup in ("shared prefix", "both") else 0)
    eta, eps = 1e-3, 1e-6
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
    assert abs(g_observed - directional) <= 1e-6 * abs(directional)
    if words == LABEL_WORDS and speedup in ("depth cache", "both"):  # the frozen bottom served in the −εz pass
        assert prompt.depth_cache.hits > 0
    if speedup in ("shared prefix", "both"):  # the 8-token prefix shared in both passes, or in the filling one
        assert prompt.shared_prefix_stats["shared_layer_runs"] >= (2 if speedup == "shared prefix" else 1)


@pytest.mark.parametrize("family", ["mistral", "roberta", "gpt_neox"])
def test_perturbation_reaches_every_trainable_parameter(family):
    """Under perturbed_forward the loss is that of the model whose weights are explicitly θ + εz (float64), through
    the depth cache, the head at the label positions and the table's last-layer recipe."""
    masked = family in MASKED
    kwargs = dict(label_word_ids=LABEL_WORDS, mask_token_id=MASK) if masked else dict(label_word_ids=LABEL_WORDS)
    prompt, _ = make_models(family, dtype=torch.float64, **kwargs)
    freeze_all_but_top_layers(prompt, 1)
    trainable = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
    optimizer = ZerothOrderSGD(trainable, lr=0.0, seed=5)
    ids, mask = pad(make_rows(masked=masked), "left", pad_id=0 if masked else 3)
    batch = {"input_ids": ids, "attention_mask": mask, "class_labels": torch.tensor([0, 1, 2, 1])}
    explicit = copy.deepcopy(prompt)
    explicit.depth_cache.resize(0)
    explicit_params = dict(explicit.named_parameters())
    with torch.no_grad():
        prompt(**batch)  # fills the depth cache
        for name, param in trainable:
            explicit_params[name].copy_(optimizer.perturbed(param, 0, 1e-2))
        expected = explicit(**batch).loss
    with perturbed_forward(prompt, optimizer, 0, 1e-2) as touched:
        perturbed = prompt(**batch).loss
    assert prompt.depth_cache.hits == len(ids)
    assert touched == {id(p) for _, p in trainable}
    torch.testing.assert_close(perturbed, expected, rtol=1e-12, atol=0)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: ~10 s alone, 30 s on a loaded machine
def test_a_pickled_prompt_model_loads_in_a_fresh_process(tmp_path):
    """The prompt subclass is built on demand, so a process that never built it can unpickle the model."""
    import pickle
    import subprocess
    import sys

    prompt, _ = make_models("mistral", label_word_ids=LABEL_WORDS)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(prompt))
    code = (
        "import pickle, sys, transformers; m = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "print(type(m).__name__, isinstance(m, transformers.MistralForCausalLM), m.label_word_ids)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["MistralForCausalLMWithLabelWords", "True", "[5,", "9,", "13]"]
