"""The local SST-2 `evaluate` module and `build_compute_metrics`, against hand counts and scikit-learn."""

import os
import subprocess
import sys

import evaluate
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, EvalPrediction, RobertaForMaskedLM, Trainer, TrainingArguments

from hf_mezo.data import load_sst2
from hf_mezo.metrics import SST2_METRIC_PATH, build_compute_metrics, load_sst2_metric
from hf_mezo.prompting import VerbalizerDataCollator

from .conftest import REPO, SHARED, tiny_roberta_config

GREAT, TERRIBLE = 372, 6587


def _hand_scores(predictions, references):
    correct = sum(int(p == r) for p, r in zip(predictions, references))
    tp = sum(int(p == 1 and r == 1) for p, r in zip(predictions, references))
    fp = sum(int(p == 1 and r == 0) for p, r in zip(predictions, references))
    fn = sum(int(p == 0 and r == 1) for p, r in zip(predictions, references))
    return correct / len(references), 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("path", [SST2_METRIC_PATH, SST2_METRIC_PATH / "sst2.py"])
def test_metric_module_loads_offline_and_matches_a_hand_count(path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 101).tolist()
    predictions = rng.integers(0, 2, 101).tolist()
    scores = evaluate.load(str(path), keep_in_memory=True).compute(predictions=predictions, references=references)
    accuracy, f1 = _hand_scores(predictions, references)
    assert scores == pytest.approx({"accuracy": accuracy, "f1": f1}, abs=1e-12)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert scores["f1"] == pytest.approx(sklearn.f1_score(references, predictions), abs=1e-12)
    assert load_sst2_metric().compute(predictions=[1, 0], references=[0, 0]) == {"accuracy": 0.5, "f1": 0.0}


def test_metric_module_loads_in_a_fresh_offline_process():
    """No hub fallback: a process with every offline switch set loads and computes the module."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = (
        "import evaluate, sys; m = evaluate.load(sys.argv[1]); "
        "print(m.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(SST2_METRIC_PATH)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "{'accuracy': 0.75, 'f1': 0.6666666666666666}"


def _random_eval(batch=12, length=9, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    label_word_ids = [7, 31]
    positions = rng.integers(1, length - 1, batch)
    classes = rng.integers(0, 2, batch)
    labels = np.full((batch, length), -100)
    labels[np.arange(batch), positions] = np.array(label_word_ids)[classes]
    return logits, labels, label_word_ids, positions, classes


def test_compute_metrics_on_full_vocab_logits_matches_hand_count():
    logits, labels, label_word_ids, positions, classes = _random_eval()
    predictions = [int(logits[i, positions[i], 31] > logits[i, positions[i], 7]) for i in range(len(classes))]
    accuracy, f1 = _hand_scores(predictions, classes.tolist())
    compute_metrics, preprocess = build_compute_metrics(label_word_ids)
    # Without preprocessing (full-vocab numpy logits) ...
    assert compute_metrics(EvalPrediction(logits, labels)) == pytest.approx({"accuracy": accuracy, "f1": f1})
    # ... and with it: shrunk on the fly to (batch, classes) = the label words' logits at the mask.
    shrunk = preprocess(torch.from_numpy(logits), torch.from_numpy(labels))
    assert shrunk.shape == (len(classes), 2)
    torch.testing.assert_close(shrunk, torch.from_numpy(logits[np.arange(len(classes)), positions][:, [7, 31]]))
    assert compute_metrics(EvalPrediction(shrunk.numpy(), labels)) == pytest.approx({"accuracy": accuracy, "f1": f1})


def test_compute_metrics_on_class_logits_of_a_label_word_head():
    rng = np.random.default_rng(1)
    class_logits = rng.normal(size=(10, 2))
    _, labels, label_word_ids, _, classes = _random_eval(batch=10)
    accuracy, f1 = _hand_scores(class_logits.argmax(-1).tolist(), classes.tolist())
    compute_metrics, preprocess = build_compute_metrics(label_word_ids)
    assert preprocess(torch.from_numpy(class_logits), torch.from_numpy(labels)) is not None
    expected = {"accuracy": accuracy, "f1": f1}
    assert compute_metrics(EvalPrediction(class_logits, labels)) == pytest.approx(expected)  # MLM labels
    assert compute_metrics(EvalPrediction(class_logits, (labels, classes))) == pytest.approx(expected)  # + classes
    assert compute_metrics(EvalPrediction(class_logits, classes)) == pytest.approx(expected)  # classes only


def test_compute_metrics_rejects_labels_it_cannot_read():
    logits, labels, label_word_ids, positions, _ = _random_eval()
    compute_metrics, preprocess = build_compute_metrics(label_word_ids)
    two_marked = labels.copy()
    two_marked[0, 0] = 7
    with pytest.raises(ValueError, match=r"rows \[0\] mark \[2\] positions"):
        compute_metrics(EvalPrediction(logits, two_marked))
    other_word = labels.copy()
    other_word[0, positions[0]] = 5
    with pytest.raises(ValueError, match=r"token ids \[5\], which are not label words \[7, 31\]"):
        compute_metrics(EvalPrediction(logits, other_word))
    with pytest.raises(ValueError, match="at least 2 distinct token ids"):
        build_compute_metrics([7, 7])


def test_trainer_evaluate_with_stock_mlm_equals_per_sentence_hand_accuracy(tmp_path):
    """The Trainer's eval loop (uneven batches, per-batch padding, preprocess) vs one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "roberta-base")
    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config(vocab_size=50265, max_position_embeddings=130)).eval()
    rows = load_sst2(k=16, seed=42)["test"].select(range(23))
    compute_metrics, preprocess = build_compute_metrics([TERRIBLE, GREAT])
    shapes = []
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=5, remove_unused_columns=False, report_to="none"
        ),
        data_collator=VerbalizerDataCollator(
            tokenizer, "*cls**sent_0*_It_was*mask*.*sep+*", "{'0':'terrible','1':'great'}", max_length=128
        ),
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: shapes.append(logits.shape) or preprocess(logits, labels),
    )
    metrics = trainer.evaluate(eval_dataset=rows)

    predictions = []
    with torch.no_grad():
        for row in rows:
            encoded = tokenizer(row["sentence"].strip() + " It was<mask>.", return_tensors="pt")
            position = encoded["input_ids"][0].tolist().index(tokenizer.mask_token_id)
            logits = model(**encoded).logits[0, position]
            predictions.append(int(logits[GREAT] > logits[TERRIBLE]))
    accuracy, f1 = _hand_scores(predictions, rows["label"])
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["eval_f1"] == pytest.approx(f1, abs=1e-12)
    assert len(shapes) == 5 and all(s[-1] == 50265 for s in shapes)  # full-vocab logits shrunk batch by batch
    # Sharper than the accuracy: the same prediction for every sentence, in order.
    assert trainer.predict(rows).predictions.argmax(-1).tolist() == predictions
    assert 0 < sum(predictions) < len(predictions), "degenerate model: both classes should be predicted"


def test_metric_module_is_packaged():
    assert SST2_METRIC_PATH.is_relative_to(REPO / "hf_mezo") and (SST2_METRIC_PATH / "sst2.py").is_file()


def test_label_word_head_and_stock_mlm_give_the_same_eval_through_the_trainer(tmp_path):
    """Either model kind through the same collator and compute_metrics: class logits vs full-vocab logits."""
    from hf_mezo.models import RobertaForPromptMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "roberta-base")
    torch.manual_seed(0)
    stock = RobertaForMaskedLM(tiny_roberta_config(vocab_size=50265, max_position_embeddings=130)).eval()
    stock.save_pretrained(tmp_path / "model")
    head = RobertaForPromptMaskedLM.from_pretrained(tmp_path / "model", label_word_ids=[TERRIBLE, GREAT]).eval()
    rows = load_sst2(k=16, seed=42)["test"].select(range(23))
    results = {}
    for name, model, return_class_labels in (("stock", stock, False), ("head", head, True)):
        compute_metrics, preprocess = build_compute_metrics([TERRIBLE, GREAT])
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(tmp_path / name),
                per_device_eval_batch_size=5,
                remove_unused_columns=False,
                report_to="none",
            ),
            data_collator=VerbalizerDataCollator(
                tokenizer,
                "*cls**sent_0*_It_was*mask*.*sep+*",
                "{'0':'terrible','1':'great'}",
                max_length=128,
                return_class_labels=return_class_labels,
            ),
            compute_metrics=compute_metrics,
            preprocess_logits_for_metrics=preprocess,
        )
        output = trainer.predict(rows)
        results[name] = (output.predictions.argmax(-1).tolist(), output.metrics["test_accuracy"])
    assert results["head"] == results["stock"]
    assert 0 < sum(results["stock"][0]) < len(rows)


def test_more_than_two_classes_report_macro_f1_not_the_binary_f1_of_class_1():
    # Before the fix, 5 classes with 5 label words reported `f1` = the binary F1 of class 1.
    rng = np.random.default_rng(3)
    label_word_ids = [5, 9, 14, 22, 30]
    class_logits = rng.normal(size=(40, 5))
    classes = rng.integers(0, 5, 40)
    classes[:3] = 4  # every class present
    compute_metrics, _ = build_compute_metrics(label_word_ids)
    scores = compute_metrics(EvalPrediction(class_logits, classes))
    predictions = class_logits.argmax(-1)
    per_class = []
    for c in range(5):  # hand count, one-vs-rest
        tp = int(np.sum((predictions == c) & (classes == c)))
        fp = int(np.sum((predictions == c) & (classes != c)))
        fn = int(np.sum((predictions != c) & (classes == c)))
        per_class.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert set(scores) == {"accuracy", "macro_f1"}
    assert scores["accuracy"] == pytest.approx(float(np.mean(predictions == classes)), abs=1e-12)
    assert scores["macro_f1"] == pytest.approx(float(np.mean(per_class)), abs=1e-12)
    sklearn = pytest.importorskip("sklearn.metrics")
    expected = sklearn.f1_score(classes, predictions, average="macro", labels=range(5), zero_division=0)
    assert scores["macro_f1"] == pytest.approx(expected, abs=1e-12)
    # A class never predicted nor present still counts (F1 0), as with labels=range(C).
    few = build_compute_metrics(label_word_ids)[0](EvalPrediction(np.eye(5)[[0, 1, 1]], np.array([0, 1, 0])))
    assert few["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 5, abs=1e-12)
