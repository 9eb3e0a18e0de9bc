"""Instruction and demonstration prefixes (hf_mezo.prompting.demonstrations): the prompt text by hand, truncation
of the sentence only, a common token prefix in every row, and a collated batch the causal LM shares exactly."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig

from hf_mezo.models import LlamaForPromptCausalLM
from hf_mezo.prompting import CausalPromptTemplate, Verbalizer, VerbalizerDataCollator
from hf_mezo.prompting.demonstrations import (
    demonstration_text,
    select_demonstrations,
    with_demonstrations,
    with_instruction,
)

from .test_prompting_causal import SENTENCES, gpt2_style_tokenizer

INSTRUCTION = "Classify the sentiment of the movie review as great or terrible."


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_style_tokenizer()


@pytest.fixture(scope="module")
def verbalizer(tokenizer):
    return Verbalizer("{'0':'terrible','1':'great'}", tokenizer)


@pytest.mark.parametrize("template", ["{sentence} It was", "*cls**sent_0*_It_was"])
def test_instruction_prompt_is_the_text_by_hand_and_truncation_cuts_only_the_sentence(tokenizer, template):
    prompted = CausalPromptTemplate(with_instruction(template, INSTRUCTION))
    instruction_ids = tokenizer(INSTRUCTION + "\n\n", add_special_tokens=False)["input_ids"]
    for sentence, encoding in zip(SENTENCES, prompted.encode_batch(tokenizer, SENTENCES)):
        assert tokenizer.decode(encoding.input_ids) == INSTRUCTION + "\n\n" + sentence.strip() + " It was"
        assert encoding.input_ids[: len(instruction_ids)] == instruction_ids  # the same tokens in every row
    tail = tokenizer(" It was", add_special_tokens=False)["input_ids"]
    max_length = len(instruction_ids) + len(tail) + 3
    (cut,) = prompted.encode_batch(tokenizer, [SENTENCES[1]], max_length=max_length)
    assert len(cut.input_ids) == max_length and cut.truncated > 0
    assert cut.input_ids[: len(instruction_ids)] == instruction_ids and cut.input_ids[-len(tail) :] == tail


def test_demonstrations_by_hand_balanced_and_seeded(verbalizer):
    data = Dataset.from_dict({"sentence": [f"review {i}" for i in range(10)], "label": [0] * 7 + [1] * 3})
    chosen = select_demonstrations(data, 4, seed=3)
    assert sorted(label for _, label in chosen) == [0, 0, 1, 1]
    assert chosen == select_demonstrations(data, 4, seed=3)
    assert chosen != select_demonstrations(data, 4, seed=4)
    text = demonstration_text("{sentence} It was", verbalizer, [("a fine film", 1), ("dull", 0)])
    assert text == "a fine film It was great\n\ndull It was terrible\n\n"
    cloze = demonstration_text("*cls**sent_0*_It_was*mask*.*sep+*", verbalizer, [("dull", 0)], causal=False)
    assert cloze == "dull It was terrible.\n\n"
    assert with_demonstrations("*cls**sent_0*_It_was", verbalizer, [("a fine film", 1)]).startswith(
        "*cls*a_fine_film_It_was_great\n\n*sent_0*"
    )


def test_context_that_the_template_syntax_would_misread_is_refused(verbalizer):
    with pytest.raises(ValueError, match="'_'"):
        with_instruction("*cls**sent_0*_It_was", "snake_case instruction")
    with pytest.raises(ValueError, match="brace"):
        with_instruction("{sentence} It was", "use {braces}")
    with pytest.raises(ValueError, match="empty"):
        with_instruction("{sentence} It was", "  ")


@pytest.mark.parametrize("side", ["left", "right"])
def test_collated_instruction_batch_is_shared_exactly(side):
    tokenizer = gpt2_style_tokenizer(padding_side=side)
    template = CausalPromptTemplate(with_instruction("{sentence} It was", INSTRUCTION))
    collator = VerbalizerDataCollator(tokenizer, template, "{'0':'terrible','1':'great'}", return_class_labels=True)
    batch = collator([{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForPromptCausalLM(config, label_word_ids=collator.verbalizer.token_ids).eval()
    with torch.no_grad():
        shared = model(**batch).logits
        stats = dict(model.shared_prefix_stats)
        model.share_prefix = False
        unshared = model(**batch).logits
    instruction_tokens = len(tokenizer(INSTRUCTION + "\n\n", add_special_tokens=False)["input_ids"])
    assert stats["shared_layer_runs"] == 1 and stats["last_shared_tokens"] >= instruction_tokens
    torch.testing.assert_close(shared, unshared, rtol=0, atol=1e-5)
