"""Zeroth-order methods (hf_mezo.methods) against independent computations, each through MeZOTrainer.

For every method: the estimate each probe measured equals autograd's directional derivative along that
method's own directions (plus, for one-sided probes, the second-order term ε/2·zᵀHz from an autograd
Hessian-vector product, so the check stays at 1e-6); the applied update is the method's rule; lr = 0 is
bit-identical; resume is bit-identical (momentum state and refresh periods crossing the checkpoint);
gradient accumulation equals the big batch; the expected update is a descent direction.
"""

import math

import pytest
import torch
from transformers import HfArgumentParser, RobertaForSequenceClassification

from hf_mezo import MeZOConfig, MeZOTrainer, ZerothOrderSGD
from hf_mezo.methods import METHODS, newton_schulz
from hf_mezo.perturbation import perturbed

from .conftest import classification_dataset, mezo_args, snapshot, tiny_roberta_config

ALL_METHODS = ["mezo", "fzoo", "lozo", "zo_muon"]
# Ranks below the tiny model's smallest matrix side (16), so every weight matrix is factored.
SMALL_RANK = {"lozo": {"zo_rank": 2}, "zo_muon": {"zo_rank": 4}}


def _classifier(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    # Eager attention: the one-sided check takes a Hessian-vector product, which SDPA's CPU kernel lacks.
    config = tiny_roberta_config(num_labels=2, attn_implementation="eager")
    return RobertaForSequenceClassification(config).to(dtype)


def _args(tmp_path, method, **overrides):
    kwargs = {"learning_rate": 1e-2, "seed": 5, "zo_method": method, **SMALL_RANK.get(method, {}), **overrides}
    return mezo_args(tmp_path, **kwargs)


def _recording_step(optimizer, records):
    """Wrap `optimizer.step` to record each step's per-probe estimates g_j and coefficients c_j first."""
    step = optimizer.step

    def recorded(*args, **kwargs):
        accumulated = optimizer.projected_grads().clone()
        records.append(
            {
                "g": optimizer.estimator.projected_grads(accumulated, optimizer.eps).clone(),
                "c": optimizer.estimator.coefficients(accumulated, optimizer.eps),
            }
        )
        return step(*args, **kwargs)

    optimizer.step = recorded


def _flat_grad(loss, params):
    return torch.autograd.grad(loss, params, create_graph=True)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_probe_measures_the_directional_derivative_float64(tmp_path, method):
    model, data = _classifier(), classification_dataset(n=8)
    eta, eps = 1e-3, 1e-6
    trainer = MeZOTrainer(model=model, args=_args(tmp_path, method, learning_rate=eta, zo_eps=eps), train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    named = [(n, p) for n, p, _ in opt.named_trainable_parameters()]
    params = [p for _, p in named]
    z = [{n: opt.direction(p, j).view_as(p).clone() for n, p in named} for j in range(opt.num_directions)]

    # Independent: autograd gradient and Hessian-vector products of the same batch loss, dropout off.
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "labels")}
    model.eval()
    grads = _flat_grad(model(**batch).loss, params)
    expected = []
    for zj in z:
        directional = sum((g * zj[n]).sum() for (n, _), g in zip(named, grads))
        if METHODS[method].estimator == "central":
            expected.append(float(directional.detach()))  # (L₊ − L₋)/2ε = zᵀ∇L + O(ε²)
        else:
            hvp = torch.autograd.grad(directional, params, retain_graph=True)
            curvature = sum((h * zj[n]).sum() for (n, _), h in zip(named, hvp))
            expected.append(
                float((directional + eps / 2 * curvature).detach())
            )  # (L_j − L₀)/ε = zᵀ∇L + ε/2·zᵀHz + O(ε²)
    model.zero_grad(set_to_none=True)

    before = snapshot(model)
    records = []
    _recording_step(opt, records)
    trainer.train()
    measured = records[0]["g"].tolist()
    scale = max(abs(e) for e in expected)  # the directional derivatives' size: the tolerance is relative to it
    for m, e in zip(measured, expected):
        assert abs(m - e) <= 1e-6 * scale, (measured, expected)

    # The update is the method's rule applied to those measurements.
    c = records[0]["c"]
    if METHODS[method].estimator == "one_sided_normalized":  # FZOO: c_j = d_j/(n·σ), σ the spread of the L_j
        d = torch.tensor(expected, dtype=torch.float64) * eps
        assert c == pytest.approx((d / (len(d) * d.std())).tolist(), rel=1e-5)
    deltas = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    sgd = {n: -eta * sum(cj * zj[n] for cj, zj in zip(c, z)) for n in z[0]}
    for n, p in named:
        if METHODS[method].update == "orthogonalized" and opt.factored(p):
            _check_orthogonalized(opt, p, deltas[n], sgd[n])
        else:
            torch.testing.assert_close(deltas[n], sgd[n], rtol=1e-9, atol=1e-15, msg=n)


def _check_orthogonalized(opt, param, delta, sgd_step):
    """ZO-Muon's matrix update: in the subspace span(P), singular values equalised, the SGD step's Frobenius norm."""
    opt_step = opt.param_groups[0]["zo_step"]
    key = opt._direction_key(param, 0)
    key = type(key)(key.name, key.shape, key.run_seed, opt_step - 1, 0)
    basis = opt.family.shared_factor(key, opt.family.period(opt_step - 1), torch.float64, param.device)
    assert float((delta - basis @ (basis.t() @ delta)).norm()) <= 1e-10 * float(delta.norm())  # within span(P)
    assert float(delta.norm()) == pytest.approx(float(sgd_step.norm()), rel=1e-9)
    # Independent: the exact orthogonal polar factor (SVD) of the SGD step's subspace coordinates; Newton–Schulz
    # (5 quintic steps) approximates it, singular values within [0.68, 1.2] of each other.
    u, _, vh = torch.linalg.svd(basis.t() @ sgd_step, full_matrices=False)
    polar = basis @ (u @ vh)
    cosine = float((delta * polar).sum() / (delta.norm() * polar.norm()))
    assert cosine > 0.97, cosine
    singular = torch.linalg.svdvals(delta)[: opt.family.rank]
    raw = torch.linalg.svdvals(sgd_step)[: opt.family.rank]
    assert float(singular.max() / singular.min()) < min(1.8, float(raw.max() / raw.min()))


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lr_zero_leaves_every_weight_bit_identical(tmp_path, method, dtype):
    model = _classifier(dtype)
    before = snapshot(model)
    args = _args(tmp_path, method, learning_rate=0.0, max_steps=3, zo_momentum=0.9 if method == "lozo" else None)
    MeZOTrainer(model=model, args=args, train_dataset=classification_dataset(n=24)).train()
    for n, p in model.named_parameters():
        assert torch.equal(
            p.view(torch.int16) if dtype == torch.bfloat16 else p,
            before[n].view(torch.int16) if dtype == torch.bfloat16 else before[n],
        ), n


@pytest.mark.parametrize(
    "method,knobs",
    [("fzoo", {}), ("lozo", {"zo_momentum": 0.9, "zo_refresh_interval": 2}), ("zo_muon", {"zo_refresh_interval": 2, "zo_momentum": 0.5})],
    ids=["fzoo", "lozo_momentum", "zo_muon_momentum"],
)  # fmt: skip
def test_resume_is_bit_identical(tmp_path, method, knobs):
    """The checkpoint carries the method and its state (momentum buffers); periods cross the checkpoint."""
    data = classification_dataset(n=40)
    straight = _classifier(torch.float32)
    MeZOTrainer(model=straight, args=_args(tmp_path / "a", method, max_steps=5, **knobs), train_dataset=data).train()
    halves = _classifier(torch.float32)
    args = _args(tmp_path / "b", method, max_steps=3, save_strategy="steps", save_steps=3, **knobs)
    MeZOTrainer(model=halves, args=args, train_dataset=data).train()
    resumed = _classifier(torch.float32, seed=123)
    MeZOTrainer(model=resumed, args=_args(tmp_path / "b", method, max_steps=5, **knobs), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3")
    )
    moved = False
    for (n, p), q, r in zip(straight.named_parameters(), resumed.parameters(), halves.parameters()):
        assert torch.equal(p, q), n
        moved |= not torch.equal(p, r)
    assert moved


@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradient_accumulation_equals_the_big_batch(tmp_path, method):
    def run(batch, accumulation):
        model = _classifier()
        args = _args(tmp_path / f"{batch}", method, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=2)  # fmt: skip
        MeZOTrainer(model=model, args=args, train_dataset=classification_dataset(n=16)).train()
        return model

    small, big = run(4, 2), run(8, 1)
    for (n, p), q in zip(small.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=n)


def test_low_rank_transient_term_equals_the_materialised_perturbation():
    """The pass adds s·(x·B)·Aᵀ to Linear outputs (and s·A[ids]·Bᵀ to Embedding rows) instead of forming W ± εz."""
    from hf_mezo.perturbation.plan import plan_for

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(50, 12), torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 5)
    ).double()
    ids = torch.randint(0, 50, (4, 7))
    for method in ("lozo", "zo_muon"):
        opt = ZerothOrderSGD(model.named_parameters(), method=method, rank=3, seed=1)
        plan = plan_for(model, [p for _, p, _ in opt.named_trainable_parameters()], opt)
        assert {type(m).__name__ for m, _ in plan.transient} == {"Embedding", "Linear"}
        for probe in range(opt.num_directions):
            with perturbed(model, opt, probe, 1e-2) as touched:
                transient = model(ids)
            assert touched == {id(p) for p in model.parameters()}
            originals = {n: p.data for n, p in model.named_parameters()}
            for _, p in model.named_parameters():
                p.data = opt.perturbed(p, probe, 1e-2)
            materialised = model(ids)
            for n, p in model.named_parameters():
                p.data = originals[n]
            torch.testing.assert_close(transient, materialised, rtol=1e-12, atol=1e-12)
            z = opt.direction(model[1].weight, probe).view(20, 12)
            assert int(torch.linalg.matrix_rank(z)) == 3


@pytest.mark.parametrize("method", ALL_METHODS)
def test_expected_update_is_a_descent_direction(method):
    """Averaged over 200 seeds, Δθ points along −∇L (cosine > 0.5); the sign of a broken estimator would flip it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randint(0, 3, (32,))

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss_fn(), list(model.parameters()))])
    rank = {"lozo": 2, "zo_muon": 3}.get(method)
    total = torch.zeros_like(gradient)
    for seed in range(200):
        before = [p.detach().clone() for p in model.parameters()]
        opt = ZerothOrderSGD(model.named_parameters(), lr=1e-3, eps=1e-4, method=method, rank=rank, seed=seed)
        losses = []
        with torch.no_grad():
            for probe, scale in opt.passes():
                if probe is None:
                    losses.append(loss_fn().double())
                else:
                    with perturbed(model, opt, probe, scale):
                        losses.append(loss_fn().double())
        opt.accumulate_passes(losses)
        opt.step()
        total += torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        with torch.no_grad():
            for p, b in zip(model.parameters(), before):
                p.copy_(b)
    cosine = float(torch.dot(total, -gradient) / (total.norm() * gradient.norm()))
    assert cosine > 0.5, cosine


def test_method_knobs_parse_and_bad_combinations_are_refused(tmp_path):
    (config,) = HfArgumentParser(MeZOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--zo_method", "lozo", "--zo_rank", "4", "--zo_momentum", "0.9", "--use_cpu", "true"]
    )  # fmt: skip
    assert (config.zo_method, config.zo_rank, config.zo_momentum) == ("lozo", 4, 0.9)
    refused = {
        "zo_method": ({"zo_method": "adam"}, "zo_method must be one of"),
        "rank on full": ({"zo_rank": 4}, "zo_rank / zo_refresh_interval apply to factored"),
        "momentum on full": ({"zo_method": "fzoo", "zo_momentum": 0.9}, "buffer the size of the model"),
        "normalised single probe": ({"zo_method": "fzoo", "zo_num_directions": 1}, "zo_num_directions ≥ 2"),
        "bad rank": ({"zo_method": "lozo", "zo_rank": 0}, "zo_rank must be an integer ≥ 1"),
        "bad momentum": ({"zo_method": "lozo", "zo_momentum": 1.0}, r"zo_momentum must be in \[0, 1\)"),
    }
    for case, (overrides, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            mezo_args(tmp_path, **overrides)
        assert case


def test_forward_counts_per_method():
    """Forwards per step: 2 per two-point probe; one-sided probes share one unperturbed pass."""
    assert {name: METHODS[name].forwards_per_step for name in ALL_METHODS} == {
        "mezo": 2, "fzoo": 5, "lozo": 2, "zo_muon": 5,
    }  # fmt: skip


def test_newton_schulz_equalises_singular_values():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([10.0, 5, 2, 1, 0.5, 0.2], dtype=torch.float64)
    )
    singular = torch.linalg.svdvals(newton_schulz(matrix))
    assert float(singular.min()) > 0.6 and float(singular.max()) < 1.3
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert math.isclose(
        float(torch.nn.functional.cosine_similarity(newton_schulz(matrix).flatten(), (u @ vh).flatten(), dim=0)),
        1.0,
        abs_tol=0.02,
    )


@pytest.mark.parametrize("method", ["lozo", "zo_muon"])
def test_factored_methods_through_the_depth_cache_and_the_shared_prefix_float64(method, tmp_path):
    """OPT prompt LM, top layer trainable, depth cache and shared prefix on: each probe's g_j = zᵀ∇L of the unshared
    model (autograd), with the top layer's Linear weights perturbed by the low-rank transient term."""
    from datasets import Dataset

    from hf_mezo.models import freeze_all_but_top_layers

    from .test_shared_prefix import make_models, prefixed_batch

    # SDPA keeps OPT float64 throughout (eager attention's softmax is float32); SDPA has no double backward, so the
    # second-order term of the one-sided probes is a central difference of autograd gradients instead.
    prompt, _ = make_models("opt", dtype=torch.float64)
    freeze_all_but_top_layers(prompt, 1)
    ids, mask = prefixed_batch("right", suffixes=[3, 5, 2, 4, 1, 6, 3, 2])
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": [0, 1, 2] * 2 + [0, 1]})  # fmt: skip
    eps = 1e-6
    args = mezo_args(tmp_path, learning_rate=1e-3, zo_eps=eps, weight_decay=0.0, zo_method=method, zo_rank=2)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(data["labels"])}
    named = [(n, p) for n, p in prompt.named_parameters() if p.requires_grad]
    prompt.share_prefix = False

    def gradient_along(shift=None, h=0.0):
        with torch.no_grad():
            originals = [p.detach().clone() for _, p in named]
            if shift is not None:
                for n, p in named:
                    p.add_(shift[n], alpha=h)
        grads = torch.autograd.grad(prompt(**batch).loss, [p for _, p in named])
        with torch.no_grad():
            for (_, p), original in zip(named, originals):
                p.copy_(original)
        return grads

    grads = gradient_along()
    prompt.share_prefix = True
    prompt.reset_shared_prefix_stats()

    trainer = MeZOTrainer(model=prompt, args=args, train_dataset=data)
    trainer.create_optimizer()
    opt = trainer.zo_optimizer
    assert any(opt.factored(p) for _, p in named)
    expected = []
    for j in range(opt.num_directions):
        zj = {n: opt.direction(p, j).view_as(p) for n, p in named}
        directional = sum((g * zj[n]).sum() for (n, _), g in zip(named, grads))
        if METHODS[method].estimator != "central":  # + ε/2·zᵀHz, zᵀHz = zᵀ(∇L(θ + hz) − ∇L(θ − hz))/2h, h = 1e-5
            prompt.share_prefix = False
            plus, minus = gradient_along(zj, 1e-5), gradient_along(zj, -1e-5)
            prompt.share_prefix = True
            curvature = sum(((a - b) * zj[n]).sum() for (n, _), a, b in zip(named, plus, minus)) / 2e-5
            directional = directional + eps / 2 * curvature
        expected.append(float(directional))
    records = []
    _recording_step(opt, records)
    trainer.train()
    scale = max(abs(e) for e in expected)
    for m, e in zip(records[0]["g"].tolist(), expected):
        assert abs(m - e) <= 1e-6 * scale, (records[0]["g"], expected)
    assert prompt.shared_prefix_stats["shared_layer_runs"] >= 2
    plan = prompt.__dict__["_zo_perturbation_plan"]
    assert plan.transient, "the top layer's Linear weights should take the low-rank transient path"
