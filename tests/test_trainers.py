"""MeZOMixin composed with Trainer subclasses: the user's, TRL's SFTTrainer, Seq2SeqTrainer.

Each check compares the projected gradient implied by one MeZO step with the autograd directional
derivative of the loss the parent trainer itself defines (float64), computed independently.
"""

import dataclasses
import sys

import pytest
import torch
from transformers import HfArgumentParser, RobertaForSequenceClassification, Trainer

from hf_mezo import MeZOConfig, MeZOMixin, MeZOTrainer, ZerothOrderArguments

from .conftest import classification_dataset, mezo_args, snapshot, tiny_roberta_config


def directions(trainer):
    """{name: z} of step 0, direction 0, recomputed from the trainer's seed."""
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    return {n: opt.direction(p, 0).view_as(p).clone() for n, p, _ in opt.named_trainable_parameters()}


def implied_g(model, before, z, eta):
    """The scalar g of Δθ = −η·g·z, after checking that Δθ is exactly along z."""
    named = dict(model.named_parameters())
    deltas = {n: named[n].detach() - before[n] for n in z}
    g = sum((deltas[n] * z[n]).sum() for n in z) / (-eta * sum((z[n] ** 2).sum() for n in z))
    for n in z:
        torch.testing.assert_close(deltas[n], -eta * g * z[n], rtol=1e-9, atol=1e-15)
    return float(g)


def directional_derivative(model, loss_fn, z):
    """Autograd ∇L·z of `loss_fn(model)`, dropout off."""
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if n in z]
    grads = torch.autograd.grad(loss_fn(model), [p for _, p in named])
    model.zero_grad(set_to_none=True)
    model.train()
    return float(sum((g * z[n]).sum() for (n, _), g in zip(named, grads)))


# ---- configs ----------------------------------------------------------------------------------------


def test_zo_fields_are_defined_once_and_parse_with_hf_argument_parser(tmp_path):
    from hf_mezo.config import ZO_DEFAULTS

    zo_names = {f.name for f in dataclasses.fields(ZerothOrderArguments)}
    # MeZO's max_grad_norm 0 (no gradient to clip) and gradient_checkpointing unset (no backward pass to checkpoint)
    assert zo_names == set(ZO_DEFAULTS) | {"max_grad_norm", "gradient_checkpointing"}
    assert "zo_eps" not in MeZOConfig.__dict__.get("__annotations__", {})  # inherited, not copied
    (config,) = HfArgumentParser(MeZOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_eps", "0.02", "--zo_num_directions", "3", "--use_cpu", "true"]
    )
    assert (config.zo_eps, config.zo_num_directions) == (0.02, 3)
    with pytest.raises(ValueError, match="zo_num_directions"):
        HfArgumentParser(MeZOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--zo_num_directions", "0"]
        )


# ---- a user's own Trainer subclass ------------------------------------------------------------------


def _squared_distance_of_logits_to_3(model, inputs):
    # Deliberately not the model's cross-entropy: if MeZO evaluated the model's own loss, g would differ.
    logits = model(input_ids=inputs["input_ids"]).logits
    return 0.5 * ((logits - 3.0) ** 2).sum(-1).mean()


class UserTrainer(Trainer):
    """A user's Trainer subclass with its own loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = _squared_distance_of_logits_to_3(model, inputs)
        return (loss, None) if return_outputs else loss


class MeZOUserTrainer(MeZOMixin, UserTrainer):
    pass


def test_user_subclass_compute_loss_is_what_both_passes_evaluate(tmp_path):
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(tiny_roberta_config(num_labels=2)).double()
    data = classification_dataset(n=8)
    eta, eps = 1e-3, 1e-5
    args = mezo_args(tmp_path, learning_rate=eta, zo_eps=eps, weight_decay=0.0, zo_distribution="rademacher")
    trainer = MeZOUserTrainer(model=model, args=args, train_dataset=data)
    assert isinstance(trainer, UserTrainer) and not isinstance(trainer, MeZOTrainer)
    z = directions(trainer)
    batch = {"input_ids": torch.tensor(data["input_ids"])}
    expected = directional_derivative(model, lambda m: _squared_distance_of_logits_to_3(m, batch), z)
    model_loss = directional_derivative(model, lambda m: m(**batch, labels=torch.tensor(data["labels"])).loss, z)
    before = snapshot(model)
    trainer.train()
    g = implied_g(model, before, z, eta)
    assert abs(g - expected) <= 1e-6 * abs(expected)
    assert abs(g - model_loss) > 1e-3 * abs(model_loss)  # the check can tell the two losses apart


# ---- TRL's SFTTrainer -------------------------------------------------------------------------------

trl = pytest.importorskip("trl")


def _tiny_causal_lm(seed=0, tie=True):
    # GPT-2 computes in its weights' dtype throughout (Llama's RMSNorm and rotary tables run in float32, which
    # would leave float32 rounding in a float64 L₊ − L₋).
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=100,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        tie_word_embeddings=tie,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(config).double()


def _prompt_completion_rows(n=8, seed=0):
    """Pre-tokenized prompt + completion rows of varying lengths, with SFT's `completion_mask`."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "completion_mask": []}
    for i in range(n):
        prompt, completion = 2 + i % 3, 1 + (i * 5) % 4
        rows["input_ids"].append(torch.randint(3, 100, (prompt + completion,), generator=g).tolist())
        rows["completion_mask"].append([0] * prompt + [1] * completion)
    return Dataset.from_dict(rows)


def _tokenizer():
    from transformers import AutoTokenizer

    from .conftest import SHARED

    return AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "roberta-base"))  # pad id 1, as the model


def _sft_args(tmp_path, **overrides):
    from hf_mezo import MeZOSFTConfig

    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        weight_decay=0.0,
        zo_eps=1e-6,
        zo_distribution="rademacher",
        completion_only_loss=True,
        max_length=None,
        dataset_num_proc=None,
        bf16=False,
    )
    kwargs.update(overrides)
    return MeZOSFTConfig(**kwargs)


def _hand_completion_loss(model, rows):
    """Mean next-token NLL over the completion tokens of all rows, each row forwarded alone (no padding)."""
    total, count = 0.0, 0
    for ids, mask in zip(rows["input_ids"], rows["completion_mask"]):
        ids = torch.tensor([ids])
        logits = model(input_ids=ids).logits[0, :-1]
        targets = torch.tensor(mask[1:]).bool()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        total, count = total + nll[targets].sum(), count + int(targets.sum())
    return total / count


@pytest.mark.parametrize(
    "variant", ["tied", "untied", pytest.param("padding_free", marks=pytest.mark.filterwarnings("ignore"))]
)
def test_sft_projected_gradient_is_the_directional_derivative_of_the_completion_only_loss(tmp_path, variant):
    from hf_mezo import MeZOSFTTrainer

    model, rows, eta = _tiny_causal_lm(tie=variant != "untied"), _prompt_completion_rows(), 1e-3
    extra = {"padding_free": True} if variant == "padding_free" else {}
    trainer = MeZOSFTTrainer(
        model=model, args=_sft_args(tmp_path, **extra), train_dataset=rows, processing_class=_tokenizer()
    )
    z = directions(trainer)
    expected = directional_derivative(model, lambda m: _hand_completion_loss(m, rows), z)
    before = snapshot(model)
    trainer.train()
    g = implied_g(model, before, z, eta)
    assert abs(g - expected) <= 1e-6 * abs(expected)
    log = trainer.state.log_history[0]
    assert 0 <= log["mean_token_accuracy"] <= 1 and log["num_tokens"] == sum(len(r) for r in rows["input_ids"])


def test_sft_gradient_accumulation_equals_the_big_batch_under_token_count_normalization(tmp_path):
    from hf_mezo import MeZOSFTTrainer

    def run(batch, accumulation):
        model = _tiny_causal_lm()
        args = _sft_args(
            tmp_path / f"{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation
        )
        trainer = MeZOSFTTrainer(
            model=model, args=args, train_dataset=_prompt_completion_rows(), processing_class=_tokenizer()
        )
        trainer.train()
        return model, trainer.state.log_history[0]

    small, small_log = run(4, 2)
    big, big_log = run(8, 1)
    for (n, p), q in zip(small.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12, msg=n)
    assert small_log["grad_norm"] == pytest.approx(big_log["grad_norm"], rel=1e-6)
    assert small_log["loss"] == pytest.approx(big_log["loss"], rel=1e-6)


def test_sft_resume_is_bit_identical(tmp_path):
    from hf_mezo import MeZOSFTTrainer

    rows = _prompt_completion_rows(n=16)

    def trainer(model, out, **overrides):
        args = _sft_args(out, per_device_train_batch_size=4, zo_eps=1e-3, **overrides)
        return MeZOSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_tokenizer())

    straight = _tiny_causal_lm()
    trainer(straight, tmp_path / "a", max_steps=4).train()
    halves = _tiny_causal_lm()
    trainer(halves, tmp_path / "b", max_steps=2, save_strategy="steps", save_steps=2).train()
    resumed = _tiny_causal_lm(seed=7)
    trainer(resumed, tmp_path / "b", max_steps=4).train(resume_from_checkpoint=str(tmp_path / "b/out/checkpoint-2"))
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_trl_trainers_mezo_cannot_make_exact_are_refused_when_the_class_is_defined():
    from trl import DPOTrainer, SFTTrainer

    with pytest.raises(TypeError, match="DPOTrainer"):

        class MeZODPO(MeZOMixin, DPOTrainer):
            pass

    with pytest.raises(TypeError, match="MeZOSFTTrainer"):

        class PlainMixinSFT(MeZOMixin, SFTTrainer):
            pass


# ---- Seq2SeqTrainer -----------------------------------------------------------------------------------


def _tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=100,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.1,
    )
    return T5ForConditionalGeneration(config).double()


def _seq2seq_rows(n=8, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (n, 6), generator=g)
    labels = torch.randint(2, 100, (n, 4), generator=g)
    for row in range(n):
        labels[row, 1 + row % 3 :] = -100  # different numbers of target tokens per row
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _t5_layer_norm_in_its_dtype(self, hidden_states):
    # T5LayerNorm takes the variance in float32 whatever the dtype; a float64 identity needs it in float64.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def test_seq2seq_projected_gradient_and_predict_with_generate(tmp_path, monkeypatch):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from hf_mezo import MeZOSeq2SeqConfig, MeZOSeq2SeqTrainer

    monkeypatch.setattr(T5LayerNorm, "forward", _t5_layer_norm_in_its_dtype)

    model, rows, eta = _tiny_t5(), _seq2seq_rows(), 1e-3
    args = MeZOSeq2SeqConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        learning_rate=eta,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        weight_decay=0.0,
        zo_eps=1e-6,
        zo_distribution="rademacher",
        predict_with_generate=True,
        generation_max_length=5,
        per_device_eval_batch_size=8,
    )
    trainer = MeZOSeq2SeqTrainer(model=model, args=args, train_dataset=rows)
    z = directions(trainer)
    batch = {k: torch.tensor(rows[k]) for k in ("input_ids", "labels")}
    expected = directional_derivative(model, lambda m: m(**batch).loss, z)  # the stock model's loss
    before = snapshot(model)
    trainer.train()
    assert abs(implied_g(model, before, z, eta) - expected) <= 1e-6 * abs(expected)

    predictions = trainer.predict(rows.remove_columns("labels")).predictions
    model.eval()
    generated = model.generate(input_ids=batch["input_ids"], max_length=5, do_sample=False)
    assert predictions.shape[0] == 8
    torch.testing.assert_close(torch.as_tensor(predictions)[:, : generated.shape[1]], generated)


def test_sft_and_seq2seq_configs_parse_with_hf_argument_parser(tmp_path):
    from hf_mezo import MeZOSeq2SeqConfig, MeZOSFTConfig

    for config_class, own in ((MeZOSFTConfig, ["--completion_only_loss", "true"]), (MeZOSeq2SeqConfig, [])):
        (config,) = HfArgumentParser(config_class).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--zo_eps", "0.005", "--zo_num_directions", "2", "--use_cpu", "true", *own]
        )
        assert (config.zo_eps, config.zo_num_directions, config.max_grad_norm) == (0.005, 2, 0.0)
        with pytest.raises(ValueError, match="zo_eps"):
            config_class(output_dir=str(tmp_path), zo_eps=-1.0)


# ---- examples/sft.py --------------------------------------------------------------------------------


def _import_sft_example():
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("sft_example", REPO / "examples" / "sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_sft_example_end_to_end_on_a_tiny_model(tmp_path, capsys):
    model_dir = tmp_path / "tiny-lm"
    tokenizer = _tokenizer()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=128)
    ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    example = _import_sft_example()
    common = ["--model_name_or_path", str(model_dir), "--num_train", "16", "--num_eval", "8", "--max_steps", "3"]
    common += ["--per_device_train_batch_size", "4", "--use_cpu", "true", "--disable_tqdm", "true"]
    frozen = example.main([*common, "--output_dir", str(tmp_path / "a"), "--learning_rate", "0"])
    # lr 0: MeZO's passes leave every weight bit-identical, so the held-out loss cannot move.
    assert frozen["eval_loss_after"] == frozen["eval_loss_before"] and frozen["steps"] == 3
    moved = example.main([*common, "--output_dir", str(tmp_path / "b"), "--learning_rate", "1e-2"])
    assert moved["eval_loss_before"] == frozen["eval_loss_before"]  # same model, same held-out pairs
    assert moved["eval_loss_after"] != moved["eval_loss_before"]
    out = capsys.readouterr().out
    assert "held-out completion-only loss: before" in out and "sample: " in out
    assert (tmp_path / "b" / "all_results.json").is_file()
