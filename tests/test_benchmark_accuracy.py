"""benchmarks/accuracy.py: its head-only setting (a copy of the final norm and label rows on cached last-token states)
scores exactly as the full causal LM does."""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))
import accuracy  # noqa: E402


class CharTokenizer:
    """One token per character (ids 3 + byte % 60), right padding with 0: enough to batch unequal prompts."""

    def __call__(self, texts, return_tensors="pt", padding=True):
        rows = [[3 + b % 60 for b in text.encode()] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_head_on_cached_states_equals_full_model_label_word_logits():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # a non-trivial norm weight, so a missed norm shows
    sentences = ["a fine film It was", "dull It was", "an utterly forgettable mess of a movie It was"]
    label_ids = [5, 9]
    head = accuracy.LabelWordHead(model.model.norm, model.lm_head.weight[label_ids])
    states = accuracy.last_token_states(model, CharTokenizer(), sentences, batch_size=2)
    for i, sentence in enumerate(sentences):  # each prompt forwarded alone, no padding
        ids = CharTokenizer()([sentence])["input_ids"]
        with torch.no_grad():
            expected = model(ids).logits[0, -1, label_ids]
        torch.testing.assert_close(head(states[i : i + 1]).logits[0], expected, rtol=1e-5, atol=1e-5)
    # The head's label rows are an untied copy: training them leaves the embeddings alone.
    assert head.label_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
