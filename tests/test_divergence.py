"""Non-finite training stops with an error naming the last good step; nothing non-finite is logged as a number
or written to disk.

Before the fix, weights that became NaN mid-run skipped every later step with two warnings, logged the loss as 0
(the Trainer's `logging_nan_inf_filter`), ran to the end, wrote NaN weights into every later checkpoint and still
reported an evaluation accuracy.
"""

import math

import pytest
import torch
from transformers import RobertaForSequenceClassification, TrainerCallback

from hf_mezo import MeZOTrainer
from hf_mezo.divergence import MAX_NON_FINITE_STEPS, NonFiniteTrainingError

from .conftest import classification_dataset, mezo_args, tiny_roberta_config


def _classifier(seed=0):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2))


class _PoisonAt(TrainerCallback):
    """Writes a NaN into one weight at the end of `step` (as an overflowing update or a buggy callback would)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.classifier.dense.weight[0, 0] = float("nan")


def test_weights_that_become_nan_stop_training_before_the_checkpoint_is_written(tmp_path):
    args = mezo_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=1, logging_steps=1)
    trainer = MeZOTrainer(_classifier(), args, train_dataset=classification_dataset(n=48))
    trainer.add_callback(_PoisonAt(step=2))
    with pytest.raises(
        NonFiniteTrainingError, match=r"step 2 before checkpoint save.*'classifier\.dense\.weight'.*Last good step: 1"
    ):
        trainer.train()
    out = tmp_path / "out"
    assert (out / "checkpoint-1").exists() and not (out / "checkpoint-2").exists()
    assert not (out / "checkpoint-3").exists()


def test_nan_weights_refuse_evaluation_and_saving(tmp_path):
    model = _classifier()
    trainer = MeZOTrainer(model, mezo_args(tmp_path), eval_dataset=classification_dataset())
    with torch.no_grad():
        model.classifier.out_proj.bias[0] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match=r"before evaluation.*'classifier\.out_proj\.bias'"):
        trainer.evaluate()
    with pytest.raises(NonFiniteTrainingError, match="save"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()


def test_a_run_of_non_finite_losses_stops_training_and_is_logged_as_nan(tmp_path):
    def nan_after_two_steps(model, inputs):
        loss = model(**inputs).loss
        return loss * float("nan") if trainer.state.global_step >= 2 else loss

    args = mezo_args(tmp_path, max_steps=20, logging_steps=1)  # logging_nan_inf_filter at its default (True)
    trainer = MeZOTrainer(
        _classifier(), args, train_dataset=classification_dataset(n=160), objective=nan_after_two_steps
    )
    with (
        pytest.warns(RuntimeWarning, match="skipped"),
        pytest.raises(NonFiniteTrainingError, match=rf"{MAX_NON_FINITE_STEPS} consecutive steps.*Last good step: 2"),
    ):
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 + MAX_NON_FINITE_STEPS - 1  # the step that raises is not logged
    assert all(math.isfinite(x) for x in losses[:2]) and all(math.isnan(x) for x in losses[2:]), losses


def test_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
    def nan_at_step_one(model, inputs):
        loss = model(**inputs).loss
        return loss * float("nan") if trainer.state.global_step == 1 else loss

    args = mezo_args(tmp_path, max_steps=3, logging_steps=1)
    trainer = MeZOTrainer(_classifier(), args, train_dataset=classification_dataset(n=24), objective=nan_at_step_one)
    with pytest.warns(RuntimeWarning, match="skipped"):
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2]), losses
