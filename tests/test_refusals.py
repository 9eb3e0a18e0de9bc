"""What MeZO cannot honour is refused (or warned about once) before any work, with the option and the fix named."""

import logging

import pytest
import torch
from torch import nn
from transformers import RobertaForSequenceClassification, Trainer, TrainingArguments

from hf_mezo import MeZOMixin, MeZOTrainer

from .conftest import classification_dataset, mezo_args, snapshot, tiny_roberta_config


def _classifier(seed=0):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2))


# ---- the class: checked when it is defined ----------------------------------------------------------------------


class _CountingTrainer(Trainer):
    calls = 0

    def training_step(self, *args, **kwargs):
        type(self).calls += 1
        return super().training_step(*args, **kwargs)


def test_mixin_after_the_trainer_is_refused_when_the_class_is_defined():
    # MRO: Y, _CountingTrainer, Trainer, MeZOMixin: Trainer's step and AdamW would run, every zo_* setting ignored.
    with pytest.raises(TypeError, match=r"MeZOMixin must come before.*class Y\(MeZOMixin, _CountingTrainer\)"):

        class Y(_CountingTrainer, MeZOMixin):
            pass


def test_a_training_step_the_mixin_would_bypass_is_refused_when_the_class_is_defined():
    # Before the fix, 3 steps called _CountingTrainer.training_step 0 times, without a word.
    with pytest.raises(TypeError, match=r"_CountingTrainer\.training_step would never run.*compute_loss"):

        class X(MeZOMixin, _CountingTrainer):
            pass


def test_a_training_step_of_the_mezo_class_itself_is_allowed_and_called(tmp_path):
    class Mine(MeZOTrainer):
        calls = 0

        def training_step(self, *args, **kwargs):
            type(self).calls += 1
            return super().training_step(*args, **kwargs)

    trainer = Mine(_classifier(), mezo_args(tmp_path, max_steps=3), train_dataset=classification_dataset())
    trainer.train()
    assert Mine.calls == 3


def test_a_trainer_without_training_step_composes_in_either_documented_way():
    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            return super().compute_loss(model, inputs, **kwargs)

    class X(MeZOMixin, MyTrainer):
        pass

    assert X.training_step is MeZOMixin.training_step


# ---- the constructor -------------------------------------------------------------------------------------------


def test_no_args_falls_back_to_tmp_trainer_like_the_stock_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = MeZOTrainer(_classifier(), train_dataset=classification_dataset())
    stock = Trainer(_classifier(), train_dataset=classification_dataset())
    assert trainer.args.output_dir == stock.args.output_dir == "tmp_trainer"
    assert trainer.zo["zo_eps"] == 1e-3  # the paper's defaults, as for any plain TrainingArguments
    before = snapshot(trainer.model)
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
def test_gradient_checkpointing_is_refused_before_any_work(tmp_path):
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        with pytest.raises(ValueError, match=f"{name}=True.*no backward pass.*Unset {name}"):
            mezo_args(tmp_path, **{name: True})
    plain = TrainingArguments(str(tmp_path / "p"), gradient_checkpointing=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="activation_checkpointing=True"):  # the alias resolved to its new name
        MeZOTrainer(_classifier(), plain, train_dataset=classification_dataset())


# ---- buffers the forward writes (BatchNorm running statistics) -------------------------------------------------


class _BatchNormClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, labels=None):
        hidden = self.norm(self.embed(input_ids).mean(dim=1))
        logits = self.head(hidden)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_running_statistics_mezo_cannot_update_are_named_in_one_warning(tmp_path, caplog):
    # Measured here: after 8 steps the stock Trainer's BatchNorm has moved running statistics and
    # num_batches_tracked 8; MeZO's passes run in eval mode (both must see the same function of θ), so its
    # statistics stay at their initial values. That is frozen BatchNorm, a legitimate choice, but never a silent one.
    data = classification_dataset(n=16)
    stock = _BatchNormClassifier()
    Trainer(
        stock,
        TrainingArguments(str(tmp_path / "s"), max_steps=8, per_device_train_batch_size=2, use_cpu=True, report_to=[]),
        train_dataset=data,
    ).train()
    assert int(stock.norm.num_batches_tracked) == 8 and float(stock.norm.running_mean.abs().sum()) > 0

    model = _BatchNormClassifier()
    with caplog.at_level(logging.WARNING, logger="hf_mezo"):
        trainer = MeZOTrainer(
            model, mezo_args(tmp_path, max_steps=8, per_device_train_batch_size=2), train_dataset=data
        )
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "running statistics" in r.getMessage()]
    assert len(warnings) == 1 and "'norm'" in warnings[0] and "eval mode" in warnings[0], warnings
    assert int(model.norm.num_batches_tracked) == 0 and float(model.norm.running_mean.abs().sum()) == 0.0


def test_batch_statistics_without_running_buffers_need_no_warning(tmp_path, caplog):
    model = _BatchNormClassifier()
    model.norm = nn.BatchNorm1d(8, track_running_stats=False)  # batch statistics in both modes: nothing is written
    with caplog.at_level(logging.WARNING, logger="hf_mezo"):
        MeZOTrainer(model, mezo_args(tmp_path), train_dataset=classification_dataset())
    assert not [r for r in caplog.records if "running statistics" in r.getMessage()]


# ---- resuming --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting,value,named",
    [("zo_seed", 7, "zo_seed"), ("zo_eps", 1e-2, "zo_eps"), ("zo_num_directions", 2, "zo_num_directions")],
)
def test_resuming_with_other_zo_settings_is_refused(tmp_path, setting, value, named):
    # Before the fix, a resume with zo_seed=7 silently kept drawing from the checkpoint's seed.
    data = classification_dataset(n=32)
    first = mezo_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, zo_seed=3)
    MeZOTrainer(_classifier(), first, train_dataset=data).train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    again = mezo_args(tmp_path, max_steps=4, **{"zo_seed": 3, setting: value})
    with pytest.raises(ValueError, match=rf"Resuming from .*checkpoint-2.*{named}: {value!r} now.*in the checkpoint"):
        MeZOTrainer(_classifier(), again, train_dataset=data).train(resume_from_checkpoint=checkpoint)
    same = mezo_args(tmp_path, max_steps=4, zo_seed=3)
    MeZOTrainer(_classifier(), same, train_dataset=data).train(resume_from_checkpoint=checkpoint)


# ---- the model card ----------------------------------------------------------------------------------------------


def test_the_model_card_names_mezo_and_its_settings_not_adamw(tmp_path):
    # Before the fix: "optimizer: Use OptimizerNames.ADAMW_TORCH_FUSED ..." and no word of MeZO or ε.
    args = mezo_args(tmp_path, zo_eps=2e-3, zo_num_directions=2, zo_seed=11)
    trainer = MeZOTrainer(_classifier(), args, train_dataset=classification_dataset())
    trainer.create_model_card(model_name="tiny", tags=["mine"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "ADAMW" not in card.upper()
    optimizer_line = next(line for line in card.splitlines() if line.startswith("- optimizer:"))
    for expected in ("MeZO", "zo_eps=0.002", "zo_num_directions=2", "direction seed=11", "no backward pass"):
        assert expected in optimizer_line
    for tag in ("- mezo", "- zeroth-order", "- mine"):
        assert tag in card
    assert "- lr_scheduler_type: constant" in card  # the rest of the Trainer's card is kept
