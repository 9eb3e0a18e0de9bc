"""The seed log: replaying the recorded scalars onto the base weights gives the trained weights bit for bit."""

import json

import pytest
import torch
from transformers import RobertaForSequenceClassification

from hf_mezo import MeZOTrainer, SeedLogError, load_seed_log, replay_seed_log, write_seed_log_dir

from .conftest import classification_dataset, mezo_args, tiny_roberta_config

SMALL_RANK = {"lozo": {"zo_rank": 2, "zo_momentum": 0.5, "zo_refresh_interval": 2}, "zo_muon": {"zo_rank": 4, "zo_refresh_interval": 2}}  # fmt: skip


def _classifier(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).to(dtype)


def _train(tmp_path, model, method="mezo", **overrides):
    kwargs = dict(
        learning_rate=1e-2, max_steps=5, zo_seed_log=True, zo_method=method, weight_decay=0.1,
        lr_scheduler_type="linear", warmup_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        **SMALL_RANK.get(method, {}),
    )  # fmt: skip
    kwargs.update(overrides)
    trainer = MeZOTrainer(model=model, args=mezo_args(tmp_path, **kwargs), train_dataset=classification_dataset(n=40))
    trainer.train()
    return trainer


def _assert_same(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach().view(torch.uint8), q.detach().view(torch.uint8)), n


@pytest.mark.parametrize(
    "method,dtype",
    [("mezo", torch.float32), ("fzoo", torch.float32), ("lozo", torch.float32), ("zo_muon", torch.float32),
     ("mezo", torch.bfloat16), ("lozo", torch.bfloat16)],
)  # fmt: skip
def test_replay_is_bit_identical_to_training(tmp_path, method, dtype):
    """GA 2, linear schedule with warm-up, weight decay; bf16 with stochastic rounding."""
    trained = _classifier(dtype)
    trainer = _train(tmp_path, trained, method)
    log = tmp_path / "out" / "seed_log.json"
    header, records = load_seed_log(log)
    assert len(records) == 5 and header["method"]["name"] == method
    assert len({tuple(r["lr"]) for r in records}) > 1  # the schedule's learning rates were recorded per step
    base = _classifier(dtype)
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), trained.parameters()))

    def no_forward(*args, **kwargs):
        raise AssertionError("replay ran a forward pass")

    base.forward = no_forward
    replay_seed_log(base, log)
    _assert_same(base, trained)
    assert trainer.state.global_step == 5


def test_a_resumed_run_continues_the_log(tmp_path):
    """A constant schedule, so that the interrupted run (max_steps 3, then 6) follows the straight one."""
    straight = _classifier()
    _train(tmp_path / "a", straight, max_steps=6, lr_scheduler_type="constant")
    first = _classifier()
    _train(tmp_path / "b", first, max_steps=3, save_strategy="steps", save_steps=3, lr_scheduler_type="constant")
    assert len(load_seed_log(tmp_path / "b" / "out" / "checkpoint-3")[1]) == 3  # written with the checkpoint
    resumed = _classifier(seed=9)
    args = mezo_args(tmp_path / "b", learning_rate=1e-2, max_steps=6, zo_seed_log=True, weight_decay=0.1,
                     lr_scheduler_type="constant", warmup_steps=2, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2)  # fmt: skip
    MeZOTrainer(model=resumed, args=args, train_dataset=classification_dataset(n=40)).train(
        resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3")
    )
    header, records = load_seed_log(tmp_path / "b" / "out")
    assert [r["step"] for r in records] == list(range(6))
    base = _classifier()
    replay_seed_log(base, tmp_path / "b" / "out")
    _assert_same(resumed, straight)
    _assert_same(base, resumed)


def test_lora_adapter_replays(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora_model():
        model = _classifier()
        torch.manual_seed(1)
        return get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))

    trained = lora_model()
    _train(tmp_path, trained, "lozo", learning_rate=1e-1)
    header, _ = load_seed_log(tmp_path / "out")
    assert all("lora_" in p["name"] or "classifier" in p["name"] for p in header["parameters"])
    base = lora_model()
    replay_seed_log(base, tmp_path / "out")
    _assert_same(base, trained)


def test_other_base_weights_and_damaged_logs_are_refused(tmp_path):
    trained = _classifier()
    _train(tmp_path, trained)
    log = tmp_path / "out" / "seed_log.json"
    other = _classifier(seed=1)
    with pytest.raises(SeedLogError, match="roberta.embeddings.word_embeddings.weight.*differs from the weights"):
        replay_seed_log(other, log)
    assert torch.equal(other.roberta.embeddings.word_embeddings.weight, _classifier(seed=1).roberta.embeddings.word_embeddings.weight)  # fmt: skip
    with pytest.raises(SeedLogError, match="is bfloat16"):
        replay_seed_log(_classifier(torch.bfloat16), log)

    text = log.read_text()
    (tmp_path / "truncated.json").write_text(text[: len(text) // 2])
    with pytest.raises(SeedLogError, match="not a complete seed log"):
        replay_seed_log(_classifier(), tmp_path / "truncated.json")
    document = json.loads(text)
    document["steps"]["values"][2][0] *= 1.5
    (tmp_path / "edited.json").write_text(json.dumps(document))
    with pytest.raises(SeedLogError, match="checksum does not match"):
        replay_seed_log(_classifier(), tmp_path / "edited.json")
    document = json.loads(text)
    for column in document["steps"].values():
        del column[-1]
    from hf_mezo.seed_log import _checksum

    document["checksum"] = _checksum(document["header"], document["steps"])  # a consistent but shorter log
    (tmp_path / "short.json").write_text(json.dumps(document))
    assert len(load_seed_log(tmp_path / "short.json")[1]) == 4


def test_shareable_directory_has_a_model_card_and_replays(tmp_path):
    trained = _classifier()
    _train(tmp_path, trained, "lozo")
    shared = write_seed_log_dir(tmp_path / "share", tmp_path / "out", base_model="tiny-roberta", description="test")
    card = (shared / "README.md").read_text()
    assert "base_model: tiny-roberta" in card and "lozo" in card
    base = _classifier()
    replay_seed_log(base, shared)
    _assert_same(base, trained)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_run_writes_one_log_that_replays(tmp_path):
    """Data parallel: the log holds the reduced scalars (equal on every rank); rank 0 writes it."""
    from .test_distributed import _launch, _load

    run = _launch(
        "distributed_worker.py", "--out", str(tmp_path), "--steps", "4", "--zo_method", "lozo", "--zo_seed_log"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    trained = _load(tmp_path / "rank0.pt")["params"]
    torch.manual_seed(0)
    base = RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).double()  # the worker's init
    replay_seed_log(base, tmp_path / "trainer" / "seed_log.json")
    for name, param in base.named_parameters():
        assert torch.equal(param.detach(), trained[name]), name
