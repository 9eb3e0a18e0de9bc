"""Labels the model cannot score are refused before the first step, naming the row (before: at its batch, after
the weights had moved)."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, RobertaForSequenceClassification

from hf_mezo import MeZOTrainer, VerbalizerDataCollator
from hf_mezo.label_check import check_training_labels
from hf_mezo.models import RobertaForPromptMaskedLM

from .conftest import SHARED, classification_dataset, mezo_args, snapshot, tiny_roberta_config


def _classifier():
    torch.manual_seed(0)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2))


def test_an_out_of_range_class_in_a_later_batch_is_refused_before_any_weight_moves(tmp_path):
    data = classification_dataset(n=16).to_dict()
    data["labels"][12] = 5  # in the second batch of 8
    model = _classifier()
    before = snapshot(model)
    trainer = MeZOTrainer(model, mezo_args(tmp_path, max_steps=2), train_dataset=Dataset.from_dict(data))
    with pytest.raises(ValueError, match=r"row 12 has label 5 in column 'labels'.*\[0, 2\) \(config.num_labels\)"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_label_the_verbalizer_has_no_word_for_is_refused_before_the_first_step(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "roberta-base"))
    rows = Dataset.from_dict(
        {"sentence": ["good", "bad", "fine", "meh"] * 4, "label": [0, 1, 1, 0] * 3 + [0, 1, 2, 0]}
    )
    collator = VerbalizerDataCollator(tokenizer, "*cls**sent_0*_It_was*mask*.*sep+*", {0: "terrible", 1: "great"})
    model = RobertaForPromptMaskedLM(tiny_roberta_config(vocab_size=50265, max_position_embeddings=130))
    args = mezo_args(tmp_path, max_steps=2, remove_unused_columns=False)
    trainer = MeZOTrainer(model, args, train_dataset=rows, data_collator=collator)
    before = snapshot(model)
    with pytest.raises(ValueError, match="Training column 'label'.*label 2 has no label word"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_token_labels_past_the_vocabulary_and_label_word_heads():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    good = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 3, "labels": [[1, 2, 3], [-100, 5, 99], [4, 4, 4]]})
    check_training_labels(good, model)
    bad = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 3, "labels": [[1, 2, 3], [-100, 5, 99], [4, 100, 4]]})
    with pytest.raises(ValueError, match=r"row 2 has label 100.*token ids \[0, 100\)"):
        check_training_labels(bad, model)
    # A shuffled/selected dataset reports the row in its current order.
    with pytest.raises(ValueError, match=r"row 0 has label 100"):
        check_training_labels(bad.select([2, 0, 1]), model)

    prompt = RobertaForPromptMaskedLM(tiny_roberta_config(), label_word_ids=[7, 11])
    check_training_labels(Dataset.from_dict({"labels": [0, 1, 1]}), prompt)
    with pytest.raises(ValueError, match=r"row 1 has label 2.*class indices \[0, 2\) of the label-word head"):
        check_training_labels(Dataset.from_dict({"labels": [0, 2, 1]}), prompt)
    mlm = Dataset.from_dict({"labels": [[-100, 7, -100], [-100, -100, 12]]})
    with pytest.raises(ValueError, match=r"row 1 has label 12.*label words \[7, 11\]"):
        check_training_labels(mlm, prompt)
