"""The labelled items a micro-batch's loss averages over, counted the way the model's loss actually counts them.

transformers leaves `loss_type` unset on some causal LMs (GPT-2: `GPT2LMHeadModel` matches no loss name), so
the Trainer's `_loss_shifts_labels` says "not shifted" for a loss that does shift; the count then includes
position 0 of every row and weights micro-batches of unequal length wrongly. Before the fix, g was 17.7% off.
"""

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, RobertaForMaskedLM

from hf_mezo import MeZOTrainer
from hf_mezo.label_items import loss_shifts_labels, shift_is_known

from .conftest import mezo_args, snapshot, tiny_roberta_config
from .test_trainers import directional_derivative, directions, implied_g


def _float64_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **kwargs):
    """transformers' ForCausalLMLoss without its float32 upcast (which caps a float64 identity near 1e-3): shift,
    ignore -100, sum / num_items_in_batch or mean. Installed as the model's `_loss_function`, which GPT-2's forward
    calls through `self.loss_function`, so the shift under test is still the model's own."""
    targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, vocab_size), targets, ignore_index=ignore_index, reduction=reduction
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=100, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0)
    model = GPT2LMHeadModel(config).double()
    model._loss_function = _float64_causal_lm_loss
    return model


def _rows(lengths=(8, 7, 5, 6), seed=0):
    """labels = input_ids, rows of different lengths (the collator pads labels with -100)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 100, (n,), generator=g).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def _pad_collator(rows):
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: [x + [v] * (width - len(x)) for x in xs]  # noqa: E731
    ids = torch.tensor(pad([r["input_ids"] for r in rows], 0))
    return {
        "input_ids": ids,
        "attention_mask": torch.tensor(pad([[1] * len(r["input_ids"]) for r in rows], 0)),
        "labels": torch.tensor(pad([r["labels"] for r in rows], -100)),
    }


def _hand_mean_token_loss(model, rows):
    """Mean next-token NLL over every target of the step, each row forwarded alone (no padding, no Trainer)."""
    total, count = 0.0, 0
    for ids in rows["input_ids"]:
        ids = torch.tensor([ids])
        logits = model(input_ids=ids).logits[0, :-1]
        total = total + nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        count += ids.shape[1] - 1
    return total / count


def test_gpt2_labels_equal_input_ids_under_accumulation_give_the_steps_mean_token_loss(tmp_path):
    model, rows, eta = _gpt2(), _rows(), 1e-3
    assert model.loss_type is None and not shift_is_known(model)  # what the Trainer's flag is read from: unset
    args = mezo_args(
        tmp_path,
        learning_rate=eta,
        zo_eps=1e-6,  # the central difference's O(ε²) error is 1.7e-6 relative at 1e-5 on this model
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,  # micro-batches of [8, 7] and [5, 6] tokens: [14, 9] real targets
        zo_distribution="rademacher",
    )
    trainer = MeZOTrainer(model, args, train_dataset=rows, data_collator=_pad_collator)
    z = directions(trainer)
    expected = directional_derivative(model, lambda m: _hand_mean_token_loss(m, rows), z)
    before = snapshot(model)
    trainer.train()
    g = implied_g(model, before, z, eta)
    assert abs(g - expected) <= 1e-6 * abs(expected), (g, expected)


def _neox(seed=0):
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return GPTNeoXForCausalLM(config)


@pytest.mark.parametrize(
    "build,shifts",
    [(_gpt2, True), (_neox, True), (lambda: RobertaForMaskedLM(tiny_roberta_config()), False)],
    ids=["gpt2-loss_type-unset", "gpt-neox", "roberta-mlm"],
)
def test_the_shift_is_measured_from_the_models_loss(build, shifts):
    model = build()
    batch = _pad_collator(list(_rows()))
    assert loss_shifts_labels(model, batch) is shifts
    assert model.training  # the probe leaves the mode as it found it


def test_no_measurement_without_token_labels():
    model = _gpt2()
    assert (
        loss_shifts_labels(model, {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2)}) is None
    )


def test_no_probe_where_transformers_knows_the_loss():
    assert shift_is_known(_neox()) and shift_is_known(RobertaForMaskedLM(tiny_roberta_config()))
