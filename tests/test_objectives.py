"""Objectives without gradients: hand-counted metrics, both passes use them, and how often g is exactly 0."""

import functools

import pytest
import torch
from datasets import Dataset
from sklearn.metrics import f1_score
from transformers import GPT2Config, GPT2LMHeadModel, RobertaForMaskedLM
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_mezo import MeZOTrainer
from hf_mezo.objectives import generation_objective, negative_accuracy, negative_f1, token_f1

from .conftest import mezo_args, tiny_roberta_config

LABEL_WORDS = [10, 11]  # the "verbalizer" of the tiny prompt task: class c is token LABEL_WORDS[c] at the mask


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **inputs):
        return SequenceClassifierOutput(logits=self.logits)


def test_accuracy_and_f1_match_a_hand_count_and_sklearn():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 5.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, -100, 2])  # predictions 0, 1, 2, (ignored), 2
    model, inputs = FixedLogits(logits), {"labels": labels}
    assert float(negative_accuracy(model, inputs)) == -3 / 4
    kept = labels != -100
    expected = f1_score(labels[kept].numpy(), logits[kept].argmax(-1).numpy(), average="macro")
    assert float(negative_f1(model, inputs)) == pytest.approx(-expected)
    expected_binary = f1_score(labels[kept].numpy(), logits[kept].argmax(-1).numpy(), labels=[2], average="macro")
    assert float(negative_f1(model, inputs, positive_class=2)) == pytest.approx(-expected_binary)


def test_label_words_turn_masked_lm_logits_into_class_predictions():
    logits = torch.zeros(2, 3, 12)
    logits[0, 1, 11], logits[0, 1, 5] = 1.0, 9.0  # token 5 wins overall, but among the label words: class 1
    logits[1, 2, 10] = 1.0  # class 0
    labels = torch.full((2, 3), -100)
    labels[0, 1], labels[1, 2] = 11, 11  # true classes 1, 1
    inputs = {"labels": labels}
    assert float(negative_accuracy(FixedLogits(logits), inputs)) == -0.0  # full-vocabulary argmax: 5, 10
    assert float(negative_accuracy(FixedLogits(logits), inputs, label_word_ids=LABEL_WORDS)) == -0.5
    with pytest.raises(ValueError, match=r"token ids \[7\] at the mask, which are not label words \[10, 11\]"):
        negative_accuracy(
            FixedLogits(logits), {"labels": labels.masked_fill(labels == 11, 7)}, label_word_ids=LABEL_WORDS
        )


def test_token_f1_is_squads_bag_of_tokens_f1():
    assert token_f1([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1([1, 1], [1]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1([], []) == 1.0 and token_f1([7], []) == 0.0
    assert token_f1([3, -100], [3]) == 1.0


def _prompt_dataset(n=64, length=8, seed=0):
    """A tiny cloze task: the class is cued by token 20 + y at position 1 and to be predicted at position 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(12, 100, (n, length), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    ids[:, 0], ids[:, -1], ids[:, 1], ids[:, 3] = 0, 2, 20 + y, 4
    labels = torch.full_like(ids, -100)
    labels[:, 3] = torch.tensor(LABEL_WORDS)[y]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _args(tmp_path, **overrides):
    return mezo_args(tmp_path, **{"max_steps": 2, **overrides})


def _masked_lm(seed=0):
    torch.manual_seed(seed)
    return RobertaForMaskedLM(tiny_roberta_config())


def test_objective_is_used_in_both_passes_and_logged_as_the_training_loss(tmp_path):
    values = []

    def recording_objective(model, inputs):
        value = negative_accuracy(model, inputs, label_word_ids=LABEL_WORDS) + 0.01 * model(**inputs).loss
        values.append(float(value))
        return value

    eps = 1e-1
    trainer = MeZOTrainer(
        model=_masked_lm(),
        args=_args(tmp_path, zo_eps=eps),
        train_dataset=_prompt_dataset(),
        objective=recording_objective,
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "grad_norm" in log]
    assert len(values) == 2 * len(logs) == 4  # L₊ and L₋ of each step
    for step, log in enumerate(logs):
        plus, minus = values[2 * step : 2 * step + 2]
        assert log["loss"] == pytest.approx((plus + minus) / 2, abs=1e-6)
        assert log["grad_norm"] == pytest.approx(abs(plus - minus) / (2 * eps), rel=1e-5)


def test_config_names_a_builtin_objective(tmp_path):
    trainer = MeZOTrainer(model=_masked_lm(), args=_args(tmp_path, zo_objective="negative_accuracy"))
    assert trainer.zo_objective is negative_accuracy
    with pytest.raises(ValueError, match="zo_objective"):
        _args(tmp_path, zo_objective="accuracy")
    with pytest.raises(ValueError, match="unknown objective"):
        MeZOTrainer(model=_masked_lm(), args=_args(tmp_path), objective="accuracy")


def _zero_gradient_fraction(tmp_path, objective, eps, steps):
    trainer = MeZOTrainer(
        model=_masked_lm(),
        args=_args(tmp_path, max_steps=steps, zo_eps=eps),
        train_dataset=_prompt_dataset(n=8 * steps),
        objective=objective,
    )
    trainer.train()
    grads = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
    assert len(grads) == steps
    return sum(g == 0.0 for g in grads) / steps


def test_accuracy_objective_gives_zero_projected_gradients_most_of_the_time(tmp_path, record_property, capsys):
    """0/1 accuracy over a batch of 8 is piecewise constant: ±εz rarely flips a prediction, so L₊ = L₋.

    Measured here (tiny RoBERTa, 2 label words, 30 steps, seed 0): accuracy with ε = 1e-3 → g = 0 on
    100% of steps; with ε = 1e-1 (the paper's prefix ε) → ~40–60%; cross-entropy → 0% (never exactly 0).
    """
    steps = 30
    accuracy = functools.partial(negative_accuracy, label_word_ids=LABEL_WORDS)
    fractions = {
        "cross_entropy_eps1e-3": _zero_gradient_fraction(tmp_path, None, 1e-3, steps),
        "accuracy_eps1e-3": _zero_gradient_fraction(tmp_path, accuracy, 1e-3, steps),
        "accuracy_eps1e-1": _zero_gradient_fraction(tmp_path, accuracy, 1e-1, steps),
    }
    for name, fraction in fractions.items():
        record_property(f"zero_grad_fraction_{name}", fraction)
    with capsys.disabled():
        print(f"\nfraction of MeZO steps with g == 0 over {steps} steps, batch 8: {fractions}")
    assert fractions["cross_entropy_eps1e-3"] == 0.0
    assert fractions["accuracy_eps1e-3"] >= 0.9
    assert fractions["accuracy_eps1e-3"] >= fractions["accuracy_eps1e-1"]


def test_generation_objective_scores_greedy_continuations_in_both_passes(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0))
    n, target = 16, [7, 8, 9]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (n, 5), generator=g)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "answer_ids": [target] * n})
    scores = []

    def answer_f1(new_tokens, inputs):
        score = torch.tensor([token_f1(p, r) for p, r in zip(new_tokens.tolist(), inputs["answer_ids"].tolist())])
        scores.append(score.mean().item())
        return score

    objective = generation_objective(answer_f1, max_new_tokens=3, min_new_tokens=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = MeZOTrainer(
        model=model,
        args=_args(tmp_path, zo_eps=1.0, remove_unused_columns=False),
        train_dataset=data,
        objective=objective,
    )
    trainer.train()
    assert len(scores) == 4
    logs = [log for log in trainer.state.log_history if "grad_norm" in log]
    assert [log["loss"] for log in logs] == pytest.approx([-(scores[0] + scores[1]) / 2, -(scores[2] + scores[3]) / 2])
    moved = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert moved == any(log["grad_norm"] > 0 for log in logs)
    with pytest.raises(ValueError, match="deterministic"):
        generation_objective(answer_f1, do_sample=True)
