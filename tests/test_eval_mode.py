"""`eval_mode`: MeZO's passes run with every module in eval mode, without `PreTrainedModel.train()`'s mode switch
(hub-kernel re-kernelization) on every step, and the model is left in training mode as the stock step leaves it."""

import torch
from datasets import Dataset
from transformers import PreTrainedModel, RobertaForSequenceClassification

from hf_mezo import MeZOConfig, MeZOTrainer
from hf_mezo.eval_mode import eval_mode

from .conftest import tiny_roberta_config


def tiny_classifier(dropout: float = 0.5) -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = tiny_roberta_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=2)
    return RobertaForSequenceClassification(config)


def test_flags_off_inside_and_training_mode_after():
    model = tiny_classifier()
    model.train()
    model.roberta.encoder.layer[0].eval()  # a module the user left in eval mode: the stock step trains it too
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())

    model.train()
    with eval_mode(model):
        pass
    assert all(m.training for m in model.modules())


def test_a_mezo_step_does_not_switch_the_transformers_mode(tmp_path, monkeypatch):
    """Each `PreTrainedModel.train()` call moves the hub-kernels mode (and re-kernelizes on a change); the passes
    need only dropout off. Counted: the stock loop's own calls stay, the steps add none; every pass still runs
    with every module in eval mode."""
    calls = []
    original = PreTrainedModel.train

    def counting_train(self, mode=True):
        calls.append(mode)
        return original(self, mode)

    monkeypatch.setattr(PreTrainedModel, "train", counting_train)
    data = Dataset.from_dict({"input_ids": [[0, 5, 6, 7, 2]] * 8, "label": [0, 1] * 4})
    training_in_pass = []

    def run(steps: int) -> int:
        calls.clear()
        model = tiny_classifier()
        model.register_forward_hook(lambda m, _a, _o: training_in_pass.append(any(x.training for x in m.modules())))
        args = MeZOConfig(
            output_dir=str(tmp_path),
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
        )
        MeZOTrainer(model=model, args=args, train_dataset=data).train()
        assert model.training
        return len(calls)

    assert run(1) == run(5)
    assert len(training_in_pass) == 12 and not any(training_in_pass)  # 1 + 5 steps of two passes
