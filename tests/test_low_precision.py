"""bf16/fp16 weights: exact restore, updates that survive rounding (unbiasedly), and a float32 loss for g."""

import pytest
import torch
from peft import get_peft_model
from transformers import RobertaForSequenceClassification

from hf_mezo import MeZOTrainer, ZerothOrderSGD, perturbed_forward
from hf_mezo import optimizer as optimizer_module
from hf_mezo.adapters import lora_config_for_mezo
from hf_mezo.precision import float32_logits, logits_module

from .conftest import classification_dataset, mezo_args, tiny_roberta_config

LOW_PRECISION = [torch.bfloat16, torch.float16]


def _classifier(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = tiny_roberta_config(num_labels=2, hidden_size=32, intermediate_size=64)
    return RobertaForSequenceClassification(config).to(dtype)


def _dataset(n=16, length=12, seed=0):
    return classification_dataset(n, length, seed)


def _args(tmp_path, **overrides):
    return mezo_args(tmp_path, **{"max_steps": 3, "per_device_train_batch_size": 16, "weight_decay": 0.0, **overrides})


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_lr_zero_steps_leave_low_precision_weights_bit_identical(tmp_path, dtype, adapter):
    model = _classifier(dtype)
    if adapter:  # peft keeps LoRA weights in float32 on a bf16/fp16 base (autocast_adapter_dtype)
        model = get_peft_model(model, lora_config_for_mezo(init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = MeZOTrainer(model=model, args=_args(tmp_path, learning_rate=0.0), train_dataset=_dataset(n=48))
    trainer.train()
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n
    assert all(log["grad_norm"] > 0 for log in trainer.state.log_history if "grad_norm" in log)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_updates_far_below_half_an_ulp_move_weights_only_with_stochastic_rounding(tmp_path, dtype):
    # |lr·g·z| ~ 1e-7 against weights ≥ 1e-2 (bf16 ulp ≥ 6e-5, fp16 ≥ 7e-6): round-to-nearest drops every update.
    # (Zero-initialized biases are left out: near 0 the ulp is tiny and any update survives rounding.)
    moved = {}
    for stochastic in (False, True):
        model = _classifier(dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = _args(tmp_path, learning_rate=1e-6, zo_stochastic_rounding=stochastic)
        MeZOTrainer(model=model, args=args, train_dataset=_dataset(n=48)).train()
        moved[stochastic] = sum(
            int(((p.detach() != before[n]) & (before[n].abs() >= 1e-2)).sum()) for n, p in model.named_parameters()
        )
    assert moved[False] == 0
    assert moved[True] > 0


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_stochastic_rounding_is_unbiased_along_the_direction(dtype):
    """E[Δθ] = −lr·g·z even when every |lr·g·z| is ~1% of an ulp: checked on Σ Δθ·z over 2¹⁸ weights (5σ)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter((0.05 * torch.randn(1 << 18, generator=g)).to(dtype))
    before = weight.detach().double().clone()
    lr, projected_grad = 1e-6, 1.0
    opt = ZerothOrderSGD([("weight", weight)], lr=lr, stochastic_rounding=True)
    z = opt.direction(weight, 0).double()
    expected = -lr * projected_grad * z  # the update in exact arithmetic
    # The gap to the next representable weight in the update's direction.
    toward = torch.where(expected > 0, float("inf"), float("-inf")).to(dtype)
    gap = (torch.nextafter(weight.detach(), toward).double() - before).abs()
    below_gap = expected.abs() < gap  # all but the weights nearest 0
    assert float(below_gap.double().mean()) > 0.95 and float((expected.abs() / gap).median()) < 0.05
    opt.accumulate(0, torch.tensor(projected_grad))
    opt.step()
    delta = (weight.detach().double() - before)[below_gap]
    z, expected, gap = z[below_gap], expected[below_gap], gap[below_gap]
    assert 0 < int((delta != 0).sum()) < 0.2 * delta.numel()
    assert bool(((delta == 0) | (delta == torch.sign(expected) * gap)).all())  # zero or one step, never backwards
    # Each weight moves one gap with probability |u|/gap: Var[Δθ·z] = Σ z²·(|u|·gap − u²).
    sigma = float((z**2 * (expected.abs() * gap - expected**2)).sum().sqrt())
    assert abs(float((delta * z).sum() - (expected * z).sum())) < 5 * sigma
    assert float((delta * z).sum()) < -10 * sigma  # and the signal is well above the rounding noise


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_training_moves_the_weights_and_keeps_the_dtype(tmp_path, dtype):
    """One step, nearest rounding: θ₁ = fl(θ₀ − lr·g·a) with a = (fl(θ₀ + εz) − fl(θ₀ − εz))/2ε and g measured on an
    explicitly perturbed copy: computed here independently of the trainer, coordinate by coordinate."""
    import copy

    model = _classifier(dtype)
    data = _dataset(n=16)
    eps, lr = 1e-2, 5e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, max_steps=1, learning_rate=lr, zo_eps=eps, zo_stochastic_rounding=False)
    trainer = MeZOTrainer(model=model, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    z = {n: opt.direction(p, 0).view_as(p).clone() for n, p, _ in opt.named_trainable_parameters()}
    explicit = copy.deepcopy(model).eval()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    perturbed, losses = {}, []
    for scale in (eps, -eps):
        with torch.no_grad():
            for (n, p), q in zip(model.named_parameters(), explicit.parameters()):
                perturbed[n, scale] = torch.add(p.float(), z[n], alpha=scale).to(dtype)
                q.copy_(perturbed[n, scale])
            logits = explicit(input_ids=batch["input_ids"]).logits.float()
        losses.append(float(torch.nn.functional.cross_entropy(logits, batch["labels"])))
    g = (losses[0] - losses[1]) / (2 * eps)
    trainer.train()
    assert all(p.dtype == dtype for p in model.parameters())
    same, total, moved = 0, 0, 0
    for n, p in model.named_parameters():
        applied = (perturbed[n, eps].float() - perturbed[n, -eps].float()) / (2 * eps)
        expected = torch.add(before[n].float(), applied, alpha=-lr * g).to(dtype)
        same += int((p.detach() == expected).sum())
        total += p.numel()
        moved += int((p.detach() != before[n]).sum())
        up, down = (torch.nextafter(expected, torch.full_like(expected, v)) for v in (torch.inf, -torch.inf))
        neighbour = (p.detach() == expected) | (p.detach() == up) | (p.detach() == down)
        # This g and the trainer's differ by ~5e-5 relative (the trainer's sampler sums the batch's losses in another
        # order; L₊ − L₋ is 1e-3 of L). That flips some rounding ties, and where θ₀ − lr·g·a nearly cancels it
        # exceeds the (fine) spacing there: allow that much, relative to the update itself.
        close = (p.detach().float() - expected.float()).abs() <= 1e-4 * (lr * g * applied).abs()
        assert (neighbour | close).all(), n
    assert same > 0.95 * total
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(abs(g), rel=1e-4)
    assert moved > 0.3 * total


def _projected_grads(model, opt, batch, steps, reference=None, float32=True):
    """g = (L₊ − L₋)/2ε for `steps` directions; with `reference` (a float64 model), computed by it on the very
    same perturbed low-precision weights (cast to float64), i.e. what g would be without rounding in the forward."""
    grads = []
    eps = opt.eps
    ref_params = dict(reference.named_parameters()) if reference is not None else None
    for step in range(steps):
        opt.param_groups[0]["zo_step"] = step
        losses = []
        for scale in (eps, -eps):
            if reference is None:
                with perturbed_forward(model, opt, 0, scale), float32_logits(model, enabled=float32):
                    losses.append(model(**batch).loss.double())
            else:
                with torch.no_grad():
                    for name, p, _ in opt.named_trainable_parameters():
                        ref_params[name].copy_(opt.perturbed(p, 0, scale).double())
                    losses.append(reference(**batch).loss)
        grads.append(float((losses[0] - losses[1]) / (2 * eps)))
    return torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_float32_logits_stop_the_low_precision_loss_from_zeroing_projected_gradients(dtype, capsys):
    """Loss ≈ 0.69 of a 2-class head: in bf16 its spacing is 3.9e-3, so L₊ − L₋ (~1e-4) is mostly rounded to 0.

    Measured here (tiny RoBERTa classifier, batch 16, ε = 1e-3, 20 directions; relative error of g against a
    float64 forward on the same perturbed weights): bf16 loss → g = 0 on 50% of directions, error 14.1; float32
    logits → 0%, 0.061. fp16 loss → 30%, 5.1; float32 logits → 0%, 0.009.
    """
    reference = _classifier(torch.float64).eval()
    model = _classifier(dtype).eval()
    opt = ZerothOrderSGD(model.named_parameters(), eps=1e-3, seed=1)
    data = _dataset()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    assert logits_module(model) is model.classifier
    exact = _projected_grads(model, opt, batch, 20, reference=reference)
    plain = _projected_grads(model, opt, batch, 20, float32=False)
    upcast = _projected_grads(model, opt, batch, 20, float32=True)

    def error(g):
        return float((g - exact).norm() / exact.norm())

    zero_plain, zero_upcast = float((plain == 0).double().mean()), float((upcast == 0).double().mean())
    with capsys.disabled():
        print(
            f"\n{dtype}: g == 0 on {zero_plain:.0%} of directions with the {dtype} loss, {zero_upcast:.0%} with float32 "
            f"logits; relative error vs float64 forward {error(plain):.3f} → {error(upcast):.3f}"
        )
    assert bool((exact != 0).all())
    assert zero_upcast == 0.0 and zero_plain >= 0.15
    assert error(upcast) < 0.1 and error(plain) > 5 * error(upcast)


def test_the_trainer_upcasts_low_precision_logits_unless_disabled(tmp_path):
    zero_fraction = {}
    for float32 in (False, True):
        args = _args(
            tmp_path, learning_rate=0.0, max_steps=10, per_device_train_batch_size=8, zo_float32_logits=float32
        )
        trainer = MeZOTrainer(model=_classifier(torch.bfloat16), args=args, train_dataset=_dataset(n=80))
        trainer.train()
        grads = [log["grad_norm"] for log in trainer.state.log_history if "grad_norm" in log]
        zero_fraction[float32] = sum(g == 0 for g in grads) / len(grads)
    assert zero_fraction[True] == 0.0 and zero_fraction[False] >= 0.3


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
def test_the_blockwise_update_is_bit_identical_to_updating_the_whole_tensor(dtype, monkeypatch):
    """The update runs block by block (small float32 temporaries); blocks must not change a single bit."""
    results = []
    for block_numel in (1 << 16, 1 << 30):  # 1<<30: one block, i.e. the whole tensor at once
        monkeypatch.setattr(optimizer_module, "UPDATE_BLOCK_NUMEL", block_numel)
        g = torch.Generator().manual_seed(0)
        weight = torch.nn.Parameter((0.05 * torch.randn(5 * (1 << 16) + 123, 3, generator=g)).to(dtype))
        opt = ZerothOrderSGD([{"params": [("weight", weight)], "weight_decay": 0.1}], lr=1e-3, num_directions=2)
        for _ in range(2):
            opt.accumulate(0, torch.tensor(0.7))
            opt.accumulate(1, torch.tensor(-1.3))
            opt.step()
        results.append(weight.detach().view(torch.uint8).clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_stochastic_rounding_lands_on_a_neighbour_and_keeps_exact_values_and_specials(dtype):
    opt = ZerothOrderSGD([("w", torch.nn.Parameter(torch.zeros(8, dtype=dtype)))], lr=1.0)
    param = opt.param_groups[0]["params"][0]
    exact = torch.tensor([1.0, -2.0, 0.0, -0.0, float("inf"), float("-inf"), 0.5, 3.0])
    rounded = opt._stochastic_round(exact.clone(), param)
    assert torch.equal(rounded.float().view(torch.int32), exact.view(torch.int32))  # -0.0 keeps its sign bit
    assert torch.isnan(opt._stochastic_round(torch.full((8,), float("nan")), param)).all()
    # Between two representable neighbours (across a binade edge too: just below 1.0, and negative).
    values = torch.tensor([1.0 - 1e-4, -(1.0 - 1e-4), 1.0 + 1e-3, -3.001, 1e-3, -1e-3, 100.01, 7.3])
    rounded = opt._stochastic_round(values.clone(), param).float()
    down = values.to(dtype).float()
    up = torch.nextafter(values.to(dtype), torch.where(values > down, float("inf"), float("-inf")).to(dtype)).float()
    assert bool(((rounded == down) | (rounded == up)).all())
