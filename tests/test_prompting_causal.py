"""Causal prompting: CausalPromptTemplate and VerbalizerDataCollator(causal=True), with a GPT-2-style BPE tokenizer
(roberta-base's vocabulary and merges, no mask token) and a tiny prompt causal LM."""

import copy
import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

from hf_mezo.models import LlamaForPromptCausalLM
from hf_mezo.prompting import CausalPromptTemplate, PromptTemplate, Verbalizer, VerbalizerDataCollator
from hf_mezo.prompting.template import Sentence, Special, Text

from .conftest import SHARED

ROBERTA = SHARED / "tokenizers" / "roberta-base"
GREAT, TERRIBLE = 372, 6587  # ' great', ' terrible'
SENTENCES = [
    "a gorgeous, witty, seductive movie. ",
    "the plot is nothing but boilerplate clichés from start to finish, ",
    "it's a charming and often affecting journey. ",
    "bad. ",
]


# A tiny decoder on the full roberta/GPT-2 BPE vocabulary (the tokenizer below); Llama and Mistral take these fields.
TINY_CAUSAL = dict(
    vocab_size=50265,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    pad_token_id=1,
    bos_token_id=2,
    eos_token_id=2,
)


def gpt2_style_tokenizer(padding_side="right"):
    vocab = json.loads((ROBERTA / "vocab.json").read_text(encoding="utf-8"))
    lines = (ROBERTA / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_style_tokenizer()


def test_causal_spellings_mean_the_same_prompt():
    mezo = CausalPromptTemplate("{sentence} It was")
    assert mezo.parts == (Special("cls"), Sentence(), Text(" It was"), Special("mask"))
    assert CausalPromptTemplate("*cls**sent_0*_It_was") == mezo
    cloze = CausalPromptTemplate("*cls**sent_0*_It_was*mask*.*sep+*")
    assert cloze == mezo and cloze.dropped_parts == (Text("."), Special("sep", new_segment=True))
    assert CausalPromptTemplate(PromptTemplate("{sentence} It was {mask}.")) == mezo
    with pytest.raises(ValueError, match="sentence must come first"):
        CausalPromptTemplate("It was {mask}. {sentence}")


def test_encoding_equals_tokenizing_the_whole_prompt(tokenizer):
    template = CausalPromptTemplate("{sentence} It was")
    for sentence, encoding in zip(SENTENCES, template.encode_batch(tokenizer, SENTENCES)):
        expected = tokenizer(sentence.strip() + " It was")["input_ids"]
        assert encoding.input_ids == expected
        assert encoding.mask_position == len(expected) - 1  # the last prompt token scores the label word
    # *cls* is what the tokenizer itself puts first: nothing for GPT-2 style, <s> for a tokenizer that adds it.
    roberta = AutoTokenizer.from_pretrained(ROBERTA)
    encoding = CausalPromptTemplate("*cls**sent_0*_It_was*mask*.*sep+*").encode(roberta, "Fine.")
    assert roberta.decode(encoding.input_ids) == "<s>Fine. It was"


def test_truncation_cuts_only_the_sentence(tokenizer):
    sentence = " ".join(f"word{i % 97}" for i in range(500))
    sentence_ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    collator = VerbalizerDataCollator(tokenizer, "{sentence} It was", ["terrible", "great"], max_length=32)
    batch = collator([{"sentence": sentence, "label": 1}, {"sentence": "short", "label": 0}])
    tail = tokenizer(" It was", add_special_tokens=False)["input_ids"]
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 32 and ids[-len(tail) :] == tail
    assert ids[: 32 - len(tail)] == sentence_ids[: 32 - len(tail)]


def test_collator_labels_and_positions_for_either_padding_side():
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    batches = {}
    for side in ("right", "left"):
        tokenizer = gpt2_style_tokenizer(side)
        collator = VerbalizerDataCollator(
            tokenizer, "{sentence} It was", "{'0':'terrible','1':'great'}", return_class_labels=True
        )
        assert collator.causal and collator.verbalizer.token_ids == (TERRIBLE, GREAT)
        batch = batches[side] = collator(rows)
        assert batch["labels"].tolist() == batch["class_labels"].tolist() == [0, 1, 0, 1]
        mask = batch["attention_mask"]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
        assert batch["mask_positions"].tolist() == last.tolist()
        assert batch["input_ids"][torch.arange(4), last].tolist() == [tokenizer.convert_tokens_to_ids("Ġwas")] * 4
    left, right = batches["left"], batches["right"]
    assert (left["attention_mask"][:, -1] == 1).all() and (right["attention_mask"][:, 0] == 1).all()
    for i in range(4):
        assert left["input_ids"][i][left["attention_mask"][i].bool()].tolist() == (
            right["input_ids"][i][right["attention_mask"][i].bool()].tolist()
        )


def test_a_rows_scores_do_not_depend_on_padding_side_or_batch_mates():
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_CAUSAL)
    model = LlamaForPromptCausalLM(config, label_word_ids=[TERRIBLE, GREAT]).eval()
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    results = {}
    for side in ("right", "left"):
        collator = VerbalizerDataCollator(gpt2_style_tokenizer(side), "{sentence} It was", ["terrible", "great"])
        with torch.no_grad():
            results[side] = model(**collator(rows)).logits
            results[side + " alone"] = torch.cat([model(**collator([row])).logits for row in rows])
    for key in ("left", "right alone", "left alone"):
        torch.testing.assert_close(results[key], results["right"], rtol=0, atol=1e-5, msg=key)
    # The batch's scores are the stock model's full-vocabulary next-token logits after each whole prompt.
    tokenizer = gpt2_style_tokenizer()
    with torch.no_grad():
        for i, row in enumerate(rows):
            ids = torch.tensor([tokenizer(row["sentence"].strip() + " It was")["input_ids"]])
            logits = LlamaForCausalLM.forward(model, input_ids=ids).logits[0, -1]  # the stock forward
            torch.testing.assert_close(results["right"][i], logits[[TERRIBLE, GREAT]], rtol=0, atol=1e-5)


def test_multi_token_label_word_is_an_error_naming_word_and_tokens(tokenizer):
    with pytest.raises(ValueError, match=r"label word 'marvellousness'.*\['Ġmar', 'vell'"):
        Verbalizer(["terrible", "marvellousness"], tokenizer)


def test_collator_without_pad_token_says_how_to_set_one():
    tokenizer = gpt2_style_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad_token = tokenizer.eos_token"):
        VerbalizerDataCollator(tokenizer, "{sentence} It was", ["terrible", "great"])


def _tiny_llama(vocab_size=50265):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_stock_causal_lm_with_the_causal_collator_is_refused_before_any_work(tmp_path):
    """The issue's report: a stock causal LM reads the collator's class-index labels as token labels and dies in
    torch. MeZOTrainer now refuses it up front, naming the generic class, and checks the label words match."""
    from datasets import Dataset

    from hf_mezo import AutoModelForPromptCausalLM, MeZOTrainer

    from .conftest import mezo_args

    collator = VerbalizerDataCollator(gpt2_style_tokenizer(), "{sentence} It was", ["terrible", "great"])
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    stock = _tiny_llama()
    with pytest.raises(ValueError, match="Expected input batch_size"):  # what users saw
        stock(**collator(rows))
    data = Dataset.from_list(rows)
    args = mezo_args(tmp_path, remove_unused_columns=False, per_device_train_batch_size=4)
    with pytest.raises(ValueError, match=r"AutoModelForPromptCausalLM\.from_pretrained"):
        MeZOTrainer(model=stock, args=args, train_dataset=data, data_collator=collator)
    model = AutoModelForPromptCausalLM.from_model(stock, label_word_ids=[GREAT, TERRIBLE])
    with pytest.raises(ValueError, match="would score other words"):
        MeZOTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    model.set_label_word_ids(collator.verbalizer.label_word_ids)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_multi_token_label_words_from_words_to_scores():
    """A causal collator keeps a word the tokenizer splits; the generic causal LM scores it as the mean log-probability
    of its tokens after the prompt, which is checked here on the text: the stock model on "<prompt> <word>" alone."""
    from hf_mezo import AutoModelForPromptCausalLM

    tokenizer = gpt2_style_tokenizer()
    words = ["terrible", "marvellousness"]
    collator = VerbalizerDataCollator(tokenizer, "{sentence} It was", words)
    marvellousness = tokenizer(" marvellousness", add_special_tokens=False)["input_ids"]
    assert len(marvellousness) > 1 and collator.verbalizer.label_word_ids == [TERRIBLE, marvellousness]
    assert collator.verbalizer.multi_token
    stock = _tiny_llama()
    model = AutoModelForPromptCausalLM.from_model(
        copy.deepcopy(stock), label_word_ids=collator.verbalizer.label_word_ids
    )
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES)]
    with torch.no_grad():
        scores = model(**collator(rows)).logits
        for i, row in enumerate(rows):
            prompt = row["sentence"].strip() + " It was"
            n = len(tokenizer(prompt)["input_ids"])
            for c, word in enumerate(words):
                ids = torch.tensor([tokenizer(prompt + " " + word)["input_ids"]])
                log_probs = torch.log_softmax(stock(input_ids=ids).logits[0], dim=-1)
                expected = torch.stack([log_probs[j - 1, ids[0, j]] for j in range(n, ids.shape[1])]).mean()
                torch.testing.assert_close(scores[i, c], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multi-token label words; a masked LM"):
        VerbalizerDataCollator(
            tokenizer, "{sentence} It was {mask}.", Verbalizer(words, tokenizer, multi_token=True), causal=False
        )


def test_multi_token_words_through_the_trainers_evaluation(tmp_path):
    """Evaluation with build_compute_metrics(verbalizer) on multi-token words: accuracy of the argmax of the scores."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_mezo import AutoModelForPromptCausalLM, build_compute_metrics

    tokenizer = gpt2_style_tokenizer()
    collator = VerbalizerDataCollator(tokenizer, "{sentence} It was", ["marvellousness", "great"])
    model = AutoModelForPromptCausalLM.from_model(_tiny_llama(), label_word_ids=collator.verbalizer.label_word_ids)
    rows = [{"sentence": s, "label": i % 2} for i, s in enumerate(SENTENCES * 2)]
    compute_metrics, preprocess = build_compute_metrics(collator.verbalizer)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=3, remove_unused_columns=False, report_to="none"
        ),
        data_collator=collator,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess,
    )
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(rows))
    with torch.no_grad():
        predictions = [int(model(**collator([row])).logits.argmax(-1)) for row in rows]
    accuracy = sum(p == row["label"] for p, row in zip(predictions, rows)) / len(rows)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-12)
