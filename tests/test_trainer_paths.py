"""Every Trainer path either correct or refused before any work, with the option and the alternative named."""

import pytest
import torch
from transformers import RobertaForMaskedLM, RobertaForSequenceClassification, TrainerCallback, TrainingArguments

from hf_mezo import MeZOConfig, MeZOTrainer, ZerothOrderSGD
from hf_mezo.models import freeze_all_but_top_layers

from .conftest import classification_dataset, mezo_args, snapshot, tiny_roberta_config


def _classifier(seed=0, dtype=torch.float32, layers=2):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2, num_hidden_layers=layers)).to(dtype)


def _plain_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "plain"), use_cpu=True, report_to=[], max_steps=1, save_strategy="no")
    return TrainingArguments(**{**kwargs, **overrides})


# ---- refused --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option,value,alternative",
    [
        ("neftune_noise_alpha", 5.0, "Unset neftune_noise_alpha"),
        ("optim", "adafactor", "Leave `optim` at its default"),
        ("optim_args", "beta1=0.9", "zo_\\* fields"),
        ("max_grad_norm", 0.5, "max_grad_norm=0"),
        ("adam_beta1", 0.8, "Leave them at their defaults"),
        ("adam_epsilon", 1e-6, "Leave them at their defaults"),
    ],
)
def test_options_mezo_cannot_honour_are_refused(tmp_path, option, value, alternative):
    with pytest.raises(ValueError, match=f"{option}=.*{alternative}"):
        mezo_args(tmp_path, **{option: value})  # MeZOConfig refuses when built
    plain = _plain_args(tmp_path, **{option: value})  # a plain TrainingArguments is refused by the trainer
    with pytest.raises(ValueError, match=f"{option}=.*{alternative}"):
        MeZOTrainer(_classifier(), plain, train_dataset=classification_dataset())


def test_max_grad_norm_defaults(tmp_path):
    assert mezo_args(tmp_path).max_grad_norm == 0.0
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        mezo_args(tmp_path, max_grad_norm=1.0)
    # TrainingArguments' own default 1.0 is indistinguishable from a chosen 1.0: accepted, and nothing is clipped.
    trainer = MeZOTrainer(_classifier(), _plain_args(tmp_path), train_dataset=classification_dataset())
    assert trainer.args.max_grad_norm == 1.0


def test_data_parallel_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(MeZOConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match="DataParallel.*accelerate launch"):
        MeZOTrainer(_classifier(), mezo_args(tmp_path), train_dataset=classification_dataset())


def test_disk_offloaded_trainable_parameters_are_refused_before_any_work(tmp_path):
    from accelerate import disk_offload

    model = RobertaForMaskedLM(tiny_roberta_config(tie_word_embeddings=False))
    disk_offload(model.roberta.embeddings, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    model.hf_device_map = {"roberta.embeddings": "disk", "roberta.encoder": "cpu", "lm_head": "cpu"}
    with pytest.raises(ValueError, match="offload.*freeze them"):
        MeZOTrainer(model, mezo_args(tmp_path), train_dataset=classification_dataset())


# ---- honoured -------------------------------------------------------------------------------------------------


def test_model_init_gets_zo_train_top_layers(tmp_path):
    models = []

    def model_init():
        models.append(_classifier(layers=3))
        return models[-1]

    args = mezo_args(tmp_path, zo_train_top_layers=1, max_steps=2)
    trainer = MeZOTrainer(model_init=model_init, args=args, train_dataset=classification_dataset())
    before = snapshot(_classifier(layers=3))  # what model_init builds (same seed)
    trainer.train()
    model = models[-1]
    assert trainer.model is model
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("roberta.encoder.layer.2.", "classifier.")) for n in changed), changed
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("roberta.encoder.layer.0."))


class _RecordEps(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        while not isinstance(optimizer, ZerothOrderSGD):
            optimizer = optimizer.optimizer
        self.seen.append((args.zo_eps, optimizer.eps))


def test_hyperparameter_search_trials_use_their_own_zo_settings(tmp_path):
    import optuna

    record = _RecordEps()
    trainer = MeZOTrainer(
        model_init=lambda: _classifier(),
        args=mezo_args(tmp_path, max_steps=1, eval_strategy="no"),
        train_dataset=classification_dataset(),
        eval_dataset=classification_dataset(n=4, seed=1),
        callbacks=[record],
    )
    grid = {"zo_eps": [1e-2, 1e-4]}
    trainer.hyperparameter_search(
        hp_space=lambda trial: {"zo_eps": trial.suggest_categorical("zo_eps", grid["zo_eps"])},
        backend="optuna",
        n_trials=2,
        direction="minimize",
        sampler=optuna.samplers.GridSampler(grid, seed=0),
    )
    assert sorted(record.seen) == [(1e-4, 1e-4), (1e-2, 1e-2)]


def test_frozen_parameters_never_move_with_a_user_built_optimizer(tmp_path):
    model = _classifier(layers=3)
    freeze_all_but_top_layers(model, 1)
    before = snapshot(model)
    optimizer = ZerothOrderSGD(model.named_parameters(), lr=1e-2)  # the docstring's usage: includes frozen ones
    trainer = MeZOTrainer(
        model, mezo_args(tmp_path, max_steps=3), train_dataset=classification_dataset(), optimizers=(optimizer, None)
    )
    trainer.train()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 20
    for n in frozen:
        assert torch.equal(model.get_parameter(n).view(torch.int32), before[n].view(torch.int32)), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_a_micro_batch_without_labelled_items_still_runs_both_passes_when_sharded(tmp_path, monkeypatch):
    """Under FSDP2 every rank must run every forward (all-gathers); an empty micro-batch contributes 0 to g."""
    from datasets import Dataset

    rows = classification_dataset(n=4).to_list()
    for row in rows[:2]:
        row["labels"] = -100  # the first micro-batch has no labelled item
    data = Dataset.from_list(rows)
    forwards = []
    results = {}
    for sharded in (False, True):
        model = _classifier()
        model.register_forward_pre_hook(lambda m, a, s=sharded: forwards.append(s))
        args = mezo_args(tmp_path / str(sharded), per_device_train_batch_size=2, gradient_accumulation_steps=2)
        trainer = MeZOTrainer(model, args, train_dataset=data)
        monkeypatch.setattr(type(trainer), "_zo_runs_collectives", lambda self, model, s=sharded: s)
        trainer.train_dataset = data
        trainer.get_train_dataloader = _sequential_loader(trainer, data)
        trainer.train()
        results[sharded] = snapshot(model)
    assert forwards.count(False) == 2 and forwards.count(True) == 4  # the empty micro-batch: 0 vs 2 forwards
    for n, p in results[False].items():
        assert torch.equal(p, results[True][n]), n  # and it changed nothing in the update


def _sequential_loader(trainer, data):
    from torch.utils.data import DataLoader

    def loader():
        return DataLoader(data, batch_size=trainer.args.per_device_train_batch_size, collate_fn=trainer.data_collator)

    return loader


class _OutOfMemoryOnce(TrainerCallback):
    """Raises an out-of-memory error once, after the first micro-batch of the first attempt was accumulated."""

    def __init__(self):
        self.raised = False

    def on_substep_end(self, args, state, control, **kwargs):
        if not self.raised:
            self.raised = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")


def test_auto_find_batch_size_discards_the_partial_step(tmp_path):
    data = classification_dataset(n=16)
    reference = _classifier()
    args = dict(max_steps=2, per_device_train_batch_size=7, gradient_accumulation_steps=2)
    MeZOTrainer(reference, mezo_args(tmp_path / "ref", **args), train_dataset=data).train()
    model = _classifier()
    oom = _OutOfMemoryOnce()
    retried = MeZOTrainer(
        model,
        mezo_args(tmp_path / "oom", auto_find_batch_size=True, **{**args, "per_device_train_batch_size": 8}),
        train_dataset=data,
        callbacks=[oom],
    )
    retried.train()
    assert oom.raised and retried._train_batch_size == 7  # Accelerate retries at 90% of the batch size
    for (n, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n  # the retry's trajectory is that of a fresh run at the smaller batch size


@pytest.mark.parametrize("loss_option", ["compute_loss_func", "loss_is_scaled_for_ga"])
def test_an_objective_is_weighted_by_labelled_items_whatever_the_loss_options(tmp_path, loss_option, monkeypatch):
    """objective= under accumulation: micro-batches with 2 and 6 labelled tokens make the mean over all 8, as one
    batch would, even when compute_loss_func / loss_is_scaled_for_ga (which concern compute_loss only) are set."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    rows = []
    for labelled in (1, 1, 3, 3):
        ids = torch.randint(5, 100, (8,), generator=g)
        labels = torch.full_like(ids, -100)
        labels[1 : 1 + labelled] = ids[1 : 1 + labelled]
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    data = Dataset.from_list(rows)

    def objective(model, inputs):
        return model(**inputs).loss

    results = []
    for accumulation, batch in ((1, 4), (2, 2)):
        torch.manual_seed(0)
        model = RobertaForMaskedLM(tiny_roberta_config()).double()
        args = mezo_args(
            tmp_path / str(accumulation),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            zo_eps=1e-6,
        )
        extra = {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.loss}
        trainer = MeZOTrainer(
            model,
            args,
            train_dataset=data,
            objective=objective,
            **(extra if accumulation > 1 and loss_option == "compute_loss_func" else {}),
        )
        if accumulation > 1 and loss_option == "loss_is_scaled_for_ga":
            trainer.loss_is_scaled_for_ga = True
        trainer.get_train_dataloader = _sequential_loader(trainer, data)
        trainer.train()
        results.append(snapshot(model))
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, rtol=1e-9, atol=1e-13)
