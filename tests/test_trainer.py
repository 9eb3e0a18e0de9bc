"""MeZOTrainer against independent computations: autograd, bit-identity, resume, accumulation."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_mezo import MeZOConfig, MeZOTrainer, ZerothOrderSGD

from .conftest import SHARED, classification_dataset, mezo_args, snapshot, tiny_roberta_config


def _classifier(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).to(dtype)


_dataset = classification_dataset
_snapshot = snapshot


def _args(tmp_path, **overrides):
    return mezo_args(tmp_path, **{"learning_rate": 1e-2, "seed": 5, **overrides})


def test_projected_gradient_equals_autograd_directional_derivative_float64(tmp_path):
    model = _classifier(torch.float64)
    data = _dataset(n=8)
    eta, eps = 1e-3, 1e-5
    args = _args(tmp_path, learning_rate=eta, zo_eps=eps, zo_distribution="rademacher", weight_decay=0.0)
    before = _snapshot(model)

    # Independent computation: autograd gradient of the same batch loss, dropout off.
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    model.eval()
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    model.zero_grad(set_to_none=True)

    trainer = MeZOTrainer(model=model, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    z = {n: opt.direction(p, 0).view_as(p).clone() for n, p, _ in opt.named_trainable_parameters()}
    directional = sum((g * z[n]).sum() for (n, _), g in zip(model.named_parameters(), grads))

    trainer.train()
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    # Δθ = −η·g·z for every parameter, with one scalar g.
    g_observed = sum((deltas[n] * z[n]).sum() for n in z) / (-eta * sum((z[n] ** 2).sum() for n in z))
    for n in z:
        torch.testing.assert_close(deltas[n], -eta * g_observed * z[n], rtol=1e-9, atol=1e-15)
    assert abs(g_observed - directional) <= 1e-6 * abs(directional)
    assert abs(trainer.state.log_history[0]["grad_norm"] - abs(float(directional))) <= 1e-5 * abs(float(directional))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_leaves_every_parameter_bit_identical(tmp_path, dtype):
    model = _classifier(dtype)
    before = _snapshot(model)
    trainer = MeZOTrainer(model=model, args=_args(tmp_path, learning_rate=0.0, max_steps=3), train_dataset=_dataset())
    trainer.train()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n
    # The passes did see different weights (bf16 losses are coarse: some steps may tie).
    assert any(log.get("grad_norm", 0) > 0 for log in trainer.state.log_history)


class _SnapshotBeforeEachUpdate(TrainerCallback):
    """Records the weights right before every optimizer step, i.e. after that step's perturbed passes."""

    def __init__(self, model):
        self.model, self.before_update, self.after_update = model, [], []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.before_update.append(_snapshot(self.model))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after_update.append(_snapshot(self.model))


def test_bf16_autocast_trains(tmp_path):
    """Under bf16 autocast, g is (L₊ − L₋)/2ε of a copy whose weights are explicitly θ ± εz, under the same autocast."""
    model = _classifier()
    data = _dataset(n=8)
    eps, eta = 1e-2, 1e-3
    before = _snapshot(model)
    args = _args(tmp_path, bf16=True, max_steps=1, zo_eps=eps, learning_rate=eta, weight_decay=0.0)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    z = {n: opt.direction(p, 0).view_as(p).clone() for n, p, _ in opt.named_trainable_parameters()}
    explicit = copy.deepcopy(model).eval()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    losses = []
    for scale in (eps, -eps):
        with torch.no_grad():
            for (n, p), q in zip(model.named_parameters(), explicit.parameters()):
                q.copy_(p + scale * z[n])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = explicit(input_ids=batch["input_ids"]).logits
            losses.append(float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"])))
    expected = (losses[0] - losses[1]) / (2 * eps)
    trainer.train()
    implied = sum(float(((p.detach() - before[n]) * z[n]).sum()) for n, p in model.named_parameters())
    implied /= -eta * sum(float((zn**2).sum()) for zn in z.values())
    assert implied == pytest.approx(expected, rel=1e-3)
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(abs(expected), rel=1e-4)


def test_bf16_weights_train_with_exact_restore(tmp_path):
    """After each step's two perturbed passes the bf16 weights are bit-for-bit what they were before them."""
    model = _classifier(torch.bfloat16)
    initial = _snapshot(model)
    snapshots = _SnapshotBeforeEachUpdate(model)
    args = _args(tmp_path, max_steps=3, learning_rate=1e-3, zo_eps=1e-2)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=_dataset(), callbacks=[snapshots])
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(snapshots.before_update) == 3
    for step, before in enumerate(snapshots.before_update):
        previous = initial if step == 0 else snapshots.after_update[step - 1]
        for n in before:
            assert torch.equal(before[n].view(torch.int16), previous[n].view(torch.int16)), (step, n)
    moved = sum(int((snapshots.after_update[-1][n] != initial[n]).sum()) for n in initial)
    assert moved > 0.1 * sum(p.numel() for p in initial.values())  # and the updates did move the weights


def test_resume_is_bit_identical(tmp_path):
    data = _dataset(n=32)
    straight = _classifier()
    MeZOTrainer(model=straight, args=_args(tmp_path / "a", max_steps=6), train_dataset=data).train()

    halves = _classifier()
    MeZOTrainer(
        model=halves, args=_args(tmp_path / "b", max_steps=3, save_strategy="steps", save_steps=3), train_dataset=data
    ).train()
    resumed = _classifier(seed=123)  # different init: everything must come from the checkpoint
    MeZOTrainer(model=resumed, args=_args(tmp_path / "b", max_steps=6), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3")
    )
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def _mlm_data(n, seed=0):
    # Token-level loss with a different number of labelled tokens per row: the Trainer's
    # num_items_in_batch path must weight micro-batches by their token counts.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, 8), generator=g)
    labels = torch.full_like(ids, -100)
    for row in range(n):
        labels[row, 1 : 2 + row % 5] = ids[row, 1 : 2 + row % 5]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


@pytest.mark.parametrize("kind", ["classification", "masked_lm"])
def test_gradient_accumulation_equals_the_big_batch(tmp_path, kind):
    def run(batch, accumulation):
        torch.manual_seed(0)
        if kind == "classification":
            model, data = _classifier(torch.float64), _dataset(n=8)
        else:
            model, data = RobertaForMaskedLM(tiny_roberta_config()).double(), _mlm_data(8)
        args = _args(
            tmp_path / f"{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
        )
        trainer = MeZOTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return model, trainer.state.log_history[0]

    small, small_log = run(4, 2)
    big, big_log = run(8, 1)
    for (n, p), q in zip(small.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=n)
    assert small_log["loss"] == pytest.approx(big_log["loss"], rel=1e-6)
    assert small_log["grad_norm"] == pytest.approx(big_log["grad_norm"], rel=1e-6)


def test_logged_loss_is_the_mean_of_the_two_perturbed_losses(tmp_path):
    seen = []

    class Recording(MeZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append(float(loss))
            return loss

    trainer = Recording(model=_classifier(), args=_args(tmp_path), train_dataset=_dataset(n=8))
    trainer.train()
    log = trainer.state.log_history[0]
    assert len(seen) == 2 and seen[0] != seen[1]
    assert log["loss"] == pytest.approx((seen[0] + seen[1]) / 2, rel=1e-6)
    assert log["grad_norm"] == pytest.approx(abs(seen[0] - seen[1]) / 2e-3, rel=1e-4)


def test_non_finite_loss_skips_the_update_and_training_goes_on(tmp_path, caplog):
    snapshots = []

    class Flaky(MeZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * float("nan") if self.state.global_step == 1 else loss

    class Snap:
        def __call__(self, *a, **k):
            pass

    model = _classifier()
    trainer = Flaky(model=model, args=_args(tmp_path, max_steps=3), train_dataset=_dataset())
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            snapshots.append(_snapshot(model))

    trainer.add_callback(Record())
    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning, match="skipped"):
        trainer.train()
    assert any("non-finite" in r.message for r in caplog.records)
    assert len(snapshots) == 3
    for n in snapshots[0]:
        assert torch.equal(snapshots[0][n], snapshots[1][n]), n  # step 2 (NaN) changed nothing
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[0])  # step 3 trained


def test_drop_in_with_auto_model_and_default_collator(tmp_path):
    """A user's script: AutoModel, tokenized text with padding, the default collator, swap Trainer for MeZOTrainer."""
    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "roberta-base"))
    texts = ["a good movie", "an awful, long and boring film", "great", "bad acting, worse plot"] * 2
    data = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0] * 2}).map(
        lambda b: tokenizer(b["text"], padding="max_length", max_length=12), batched=True, remove_columns=["text"]
    )
    torch.manual_seed(0)
    config = tiny_roberta_config(vocab_size=tokenizer.vocab_size, num_labels=2, hidden_dropout_prob=0.1)
    model = AutoModelForSequenceClassification.from_config(config).double()
    before = _snapshot(model)
    args = _args(tmp_path, learning_rate=1e-3, zo_eps=1e-5, per_device_train_batch_size=8, weight_decay=0.0)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data)  # default collator, stock model

    model.eval()  # independent computation: autograd on the whole (single-batch) dataset
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    loss = model(**batch, labels=torch.tensor(data["label"])).loss
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    directional = sum(
        (grads[n] * opt.direction(p, 0).view_as(p)).sum() for n, p, _ in opt.named_trainable_parameters()
    )

    trainer.train()
    z = z_list(opt, model, step=0)
    deltas = [p.detach() - before[n] for n, p in model.named_parameters()]
    g_observed = sum((d * zi).sum() for d, zi in zip(deltas, z)) / (-1e-3 * sum((zi**2).sum() for zi in z))
    assert abs(float(g_observed) - float(directional)) <= 1e-5 * abs(float(directional))
    assert model.training  # the Trainer's train mode is restored after the eval-mode passes
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # no optimizer state, let alone O(model)


def z_list(opt, model, step):
    """The directions of `step` for each parameter of `model`, recomputed from the seed."""
    saved = [g["zo_step"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["zo_step"] = step
    try:
        return [opt.direction(p, 0).view_as(p) for _, p in model.named_parameters()]
    finally:
        for g, s in zip(opt.param_groups, saved):
            g["zo_step"] = s


def test_plain_training_arguments_get_mezo_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    trainer = MeZOTrainer(model=_classifier(), args=args, train_dataset=_dataset())
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    assert (opt.eps, opt.num_directions, opt.param_groups[0]["distribution"]) == (1e-3, 1, "gaussian")
    # Weight decay grouping is the Trainer's: no decay for biases and LayerNorm weights.
    no_decay = [n for n, p, g in opt.named_trainable_parameters() if g["weight_decay"] == 0.0]
    assert any("LayerNorm" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)


def test_n_directions_average(tmp_path):
    """Δθ = −η·(1/n)·Σ_d (z_dᵀ∇L)·z_d: the mean over directions, checked against autograd (a sum would be 3× off)."""
    model = _classifier(torch.float64)
    data = _dataset(n=8)
    eta = 1e-3
    before = _snapshot(model)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    model.eval()
    grads = dict(
        zip(
            [n for n, _ in model.named_parameters()],
            torch.autograd.grad(model(**batch).loss, list(model.parameters())),
        )
    )
    args = _args(tmp_path, zo_num_directions=3, learning_rate=eta, zo_eps=1e-6, weight_decay=0.0)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    z = [{n: opt.direction(p, d).view_as(p).clone() for n, p, _ in opt.named_trainable_parameters()} for d in range(3)]
    directional = [sum(float((grads[n] * zd[n]).sum()) for n in zd) for zd in z]
    trainer.train()
    for n, p in model.named_parameters():
        expected = -eta / 3 * sum(g * zd[n] for g, zd in zip(directional, z))
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-5, atol=1e-12)


def test_bad_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="zo_eps"):
        _args(tmp_path, zo_eps=0.0)
    with pytest.raises(ValueError, match="zo_num_directions"):
        _args(tmp_path, zo_num_directions=0)
    with pytest.raises(ValueError, match="zo_distribution"):
        _args(tmp_path, zo_distribution="cauchy")
    with pytest.raises(ValueError, match="GradScaler"):
        _args(tmp_path, fp16=True)
    model = _classifier()
    adam = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="ZerothOrderSGD"):
        MeZOTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), optimizers=(adam, None))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MeZOTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset())


def test_config_parses_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(MeZOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--zo_eps",
            "0.01",
            "--zo_num_directions",
            "4",
            "--zo_distribution",
            "rademacher",
        ]
    )
    assert (config.zo_eps, config.zo_num_directions, config.zo_distribution) == (0.01, 4, "rademacher")


def test_stock_trainer_is_untouched_by_import(tmp_path):
    # hf_mezo changes nothing globally: the stock Trainer still back-propagates with AdamW.
    model = _classifier()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    trainer.create_optimizer()
    assert not isinstance(trainer.optimizer, ZerothOrderSGD)


def test_train_top_layers_freezes_the_rest(tmp_path):
    torch.manual_seed(0)
    model = RobertaForMaskedLM(tiny_roberta_config())
    before = _snapshot(model)
    trainer = MeZOTrainer(
        model=model, args=_args(tmp_path, zo_train_top_layers=1, max_steps=2), train_dataset=_mlm_data(8)
    )
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("roberta.encoder.layer.1.", "lm_head.")) for n in changed)
    assert "lm_head.decoder.weight" not in changed and "roberta.embeddings.word_embeddings.weight" not in changed
    assert any(n.startswith("roberta.encoder.layer.1.") for n in changed) and "lm_head.dense.weight" in changed
