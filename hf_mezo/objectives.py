"""Training objectives for MeZO that need no gradient: accuracy, F1, scores of generated text.

MeZO only ever evaluates the loss, L₊ = L(θ + εz) and L₋ = L(θ − εz), so the loss need not be
differentiable. An objective is any callable

    objective(model, inputs) -> scalar tensor        (lower is better)

that runs the model on the batch (a forward, or `model.generate`) and scores it. Give it to the
trainer, `MeZOTrainer(..., objective=negative_accuracy)`, or name a built-in one in the config,
`MeZOConfig(zo_objective="negative_accuracy")`. The trainer calls it in both perturbed passes in
place of `compute_loss` and logs its value as the training loss; evaluation is unchanged.

    from functools import partial
    objective = partial(negative_accuracy, label_word_ids=[tokenizer.convert_tokens_to_ids("Ġterrible"),
                                                           tokenizer.convert_tokens_to_ids("Ġgreat")])
    MeZOTrainer(model=model, args=args, objective=objective, ...)

From `generate` (the paper's F1 on SQuAD), score the new tokens against references in the batch:

    def answer_f1(new_tokens, inputs):
        return torch.tensor([token_f1(p, r) for p, r in zip(new_tokens.tolist(), inputs["answer_ids"].tolist())])

    objective = generation_objective(answer_f1, max_new_tokens=16)   # greedy: both passes comparable

Under gradient accumulation each micro-batch's value is weighted by its share of the step's labelled
items, so a mean over items (accuracy) is exact; F1 is not a mean, so it is then a weighted mean of
per-micro-batch F1s.

A caveat the MeZO paper's "non-differentiable objectives" experiment hides: a 0/1 metric over a
small batch is piecewise constant in θ. With ε = 1e-3 the two passes rarely flip a prediction, so
L₊ = L₋ and the projected gradient is exactly 0 on most steps (no update), whereas the
cross-entropy gives a non-zero g on every step. Measured in `benchmarks/objective_zero_gradients.py`
and `tests/test_objectives.py`; use a larger ε (the paper's prefix setting, 1e-1) or larger batches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .label_words import IGNORE_INDEX, label_word_classes

Objective = Callable[[nn.Module, dict[str, Any]], torch.Tensor]


def predictions_and_targets(
    model: nn.Module, inputs: dict[str, Any], label_word_ids: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, true class) of every labelled item in the batch, as 1-D tensors.

    Runs `model(**inputs)` and takes the argmax of its logits. Items are the positions whose label is
    not -100: each example for a classifier (logits batch × classes, `labels` batch) or a label-word
    model (`class_labels`), each labelled token for a language model (logits batch × length × vocab).
    With `label_word_ids` (one token per class) the argmax is over those vocabulary entries only and
    the true class is the index of the labelled token among them, i.e. prompt-based classification.
    """
    outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    labels = inputs.get("class_labels")
    if labels is None or labels.shape != logits.shape[:-1]:
        labels = inputs.get("labels")
    if labels is None or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"cannot pair logits of shape {tuple(logits.shape)} with the batch's labels "
            f"({None if labels is None else tuple(labels.shape)}): an accuracy/F1 objective needs `labels` (or "
            "`class_labels`) with the logits' shape minus the last dimension."
        )
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    if label_word_ids is not None:
        words = torch.as_tensor(list(label_word_ids), device=labels.device)
        logits, labels = logits[:, words], label_word_classes(labels, words)
    return logits.argmax(dim=-1), labels


def negative_accuracy(
    model: nn.Module, inputs: dict[str, Any], *, label_word_ids: Sequence[int] | None = None
) -> torch.Tensor:
    """−(fraction of labelled items predicted correctly): minimizing it maximizes accuracy."""
    predicted, target = predictions_and_targets(model, inputs, label_word_ids)
    if target.numel() == 0:
        return torch.zeros((), device=target.device)
    return -(predicted == target).double().mean()


def negative_f1(
    model: nn.Module,
    inputs: dict[str, Any],
    *,
    label_word_ids: Sequence[int] | None = None,
    positive_class: int | None = None,
) -> torch.Tensor:
    """−F1 over the batch: macro-averaged over the classes present, or of `positive_class` alone."""
    predicted, target = predictions_and_targets(model, inputs, label_word_ids)
    classes = [positive_class] if positive_class is not None else torch.cat([predicted, target]).unique().tolist()
    scores = []
    for c in classes:
        true_pos = ((predicted == c) & (target == c)).sum()
        denominator = (predicted == c).sum() + (target == c).sum()  # 2·TP + FP + FN
        scores.append(2 * true_pos / denominator if denominator > 0 else torch.zeros((), device=target.device))
    return -torch.stack(scores).double().mean() if scores else torch.zeros((), device=target.device)


def token_f1(predicted: Sequence[int], reference: Sequence[int], *, ignore: Sequence[int] = (IGNORE_INDEX,)) -> float:
    """SQuAD-style bag-of-tokens F1 between two token-id sequences (`ignore`d ids, e.g. padding, dropped)."""
    predicted_counts = Counter(t for t in predicted if t not in ignore)
    reference_counts = Counter(t for t in reference if t not in ignore)
    common = sum((predicted_counts & reference_counts).values())
    if common == 0:
        return float(predicted_counts == reference_counts)  # both empty: a perfect (empty) answer
    precision = common / sum(predicted_counts.values())
    recall = common / sum(reference_counts.values())
    return 2 * precision * recall / (precision + recall)


def generation_objective(
    score: Callable[[torch.Tensor, dict[str, Any]], torch.Tensor], **generate_kwargs
) -> Objective:
    """An objective from generated text: −mean of `score(new_tokens, inputs)` over the batch.

    `model.generate` gets the batch's `input_ids` and `attention_mask` (all other keys are for `score`)
    and `generate_kwargs`; `new_tokens` are the generated ids after the prompt (batch × new, padded
    with the pad token). Every forward inside `generate` sees the same perturbed weights. Decoding must
    be deterministic (greedy or beam search, the default here): sampling would make L₊ and L₋ differ by
    chance and draw from the global RNG.
    """
    if generate_kwargs.get("do_sample"):
        raise ValueError("generation_objective needs deterministic decoding: do_sample=True makes L₊ − L₋ random.")
    generate_kwargs.setdefault("do_sample", False)

    def objective(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        prompt = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        generated = model.generate(**prompt, **generate_kwargs)
        new_tokens = generated[:, prompt["input_ids"].shape[1] :]
        return -torch.as_tensor(score(new_tokens, inputs), dtype=torch.float64).mean()

    return objective


# Objectives a config can name (`MeZOConfig(zo_objective=...)`).
OBJECTIVES: dict[str, Objective] = {"negative_accuracy": negative_accuracy, "negative_f1": negative_f1}


def resolve_objective(objective: Objective | str | None) -> Objective | None:
    """The callable for an objective given as a callable, a name in `OBJECTIVES`, or None (the model's loss)."""
    if objective is None or callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}; built-in objectives are {sorted(OBJECTIVES)}. For another one, pass "
            "a callable objective(model, inputs) -> scalar tensor to MeZOTrainer(objective=...)."
        )
    return OBJECTIVES[objective]
