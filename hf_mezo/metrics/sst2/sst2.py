"""SST-2 metric for `evaluate`, loadable offline: accuracy, plus F1 (binary for 2 classes, macro otherwise).

`evaluate.load("glue", "sst2")` fetches its script from the hub; this module is the same metric
(accuracy) from a local path, with F1 added:

    metric = evaluate.load("path/to/hf_mezo/metrics/sst2")
    metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])  # {'accuracy': 0.667, 'f1': 0.8}

F1 = 2·TP / (2·TP + FP + FN) for `pos_label` (1 = positive); 0.0 when there is no positive
prediction or reference (the harmonic mean of an undefined precision and recall).

With more than two classes (`num_classes` > 2, or labels beyond 0/1) the binary F1 of one class would
be a misleading summary, so the module reports `macro_f1` instead: the mean over classes 0 … C−1 of
each class's one-vs-rest F1 (scikit-learn's `f1_score(average="macro", labels=range(C))`).
"""

import datasets
import evaluate
import numpy as np

_CITATION = """\
@inproceedings{socher2013recursive,
  title={Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank},
  author={Socher, Richard and Perelygin, Alex and Wang, Jean and Chuang, Jason and Manning, Christopher D.
          and Ng, Andrew and Potts, Christopher},
  booktitle={EMNLP},
  year={2013}
}
"""

_DESCRIPTION = (
    "Accuracy (GLUE's SST-2 metric) and binary F1 of the positive class for 0/1 labels; accuracy and macro-F1 for "
    "more classes."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class indices (0 = negative, 1 = positive).
    references (`list` of `int`): gold class indices.
    pos_label (`int`, default 1): the class whose F1 is reported (two classes).
    num_classes (`int`, optional): the number of classes; default: 2, or more if the labels go beyond 1.
Returns:
    accuracy (`float`): fraction of predictions equal to their reference.
    f1 (`float`): F1 of `pos_label`, for two classes.
    macro_f1 (`float`): mean one-vs-rest F1 over all classes, for more than two (instead of `f1`).
Examples:
    >>> metric = evaluate.load("hf_mezo/metrics/sst2")
    >>> metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Sst2(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
            reference_urls=["https://gluebenchmark.com/", "https://nlp.stanford.edu/sentiment/"],
        )

    def _compute(self, predictions, references, pos_label=1, num_classes=None):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("SST-2 metric got no predictions.")
        if num_classes is None:
            num_classes = max(2, int(max(predictions.max(), references.max())) + 1)
        scores = {"accuracy": float(np.mean(predictions == references))}
        if num_classes == 2:
            scores["f1"] = _f1(predictions, references, pos_label)
        else:
            scores["macro_f1"] = float(np.mean([_f1(predictions, references, c) for c in range(num_classes)]))
        return scores


def _f1(predictions, references, label):
    """One-vs-rest F1 of `label`: 2·TP / (2·TP + FP + FN), 0.0 when the class is neither predicted nor present."""
    true_positive = int(np.sum((predictions == label) & (references == label)))
    false_positive = int(np.sum((predictions == label) & (references != label)))
    false_negative = int(np.sum((predictions != label) & (references == label)))
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else 0.0
