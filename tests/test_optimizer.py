"""ZerothOrderSGD and the direction stream: purity of z, exact updates, state."""

import pytest
import torch
from torch import nn

from hf_mezo import ZerothOrderSGD
from hf_mezo.directions import CHUNK_NUMEL, draw_direction


def _draw(name, numel, **kw):
    args = dict(run_seed=7, step=3, direction=0, distribution="gaussian", dtype=torch.float32, device="cpu")
    args.update(kw)
    return draw_direction(name, numel, **args)


def test_direction_is_a_pure_function_of_seed_step_direction_name():
    a = _draw("layer.weight", 1000)
    assert torch.equal(a, _draw("layer.weight", 1000))
    assert not torch.equal(a, _draw("layer.weight", 1000, step=4))
    assert not torch.equal(a, _draw("layer.weight", 1000, direction=1))
    assert not torch.equal(a, _draw("other.weight", 1000))
    assert not torch.equal(a, _draw("layer.weight", 1000, run_seed=8))


def test_direction_does_not_touch_the_global_rng():
    state = torch.get_rng_state()
    _draw("w", 5000)
    assert torch.equal(state, torch.get_rng_state())


def test_direction_of_a_shard_equals_the_slice_of_the_full_direction():
    numel = 2 * CHUNK_NUMEL + 12345
    full = _draw("big", numel)
    for start, end in [(0, 10), (CHUNK_NUMEL - 5, CHUNK_NUMEL + 5), (CHUNK_NUMEL + 3, numel), (17, 2 * CHUNK_NUMEL)]:
        assert torch.equal(_draw("big", numel, start=start, end=end), full[start:end])


def test_gaussian_and_rademacher_statistics():
    z = _draw("w", 200_000)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    r = _draw("w", 200_000, distribution="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01


def _named(*shapes, dtype=torch.float64):
    torch.manual_seed(0)
    return [(f"p{i}", nn.Parameter(torch.randn(*s, dtype=dtype))) for i, s in enumerate(shapes)]


def test_z_of_a_parameter_is_independent_of_the_other_parameters():
    a, b, c = _named((4, 3), (5,), (2, 2))
    opt_all = ZerothOrderSGD([a, b, c], seed=1)
    opt_one = ZerothOrderSGD([b], seed=1)
    assert torch.equal(opt_all.direction(b[1], 0), opt_one.direction(b[1], 0))


def test_step_applies_minus_lr_g_z_plus_weight_decay():
    ((name, p),) = _named((6, 5))
    before = p.detach().clone()
    opt = ZerothOrderSGD([{"params": [(name, p)], "weight_decay": 0.1}], lr=0.5, seed=3, num_directions=2)
    z0, z1 = opt.direction(p, 0).view_as(p).clone(), opt.direction(p, 1).view_as(p).clone()
    opt.accumulate(0, torch.tensor(0.25))
    opt.accumulate(0, torch.tensor(0.75))  # micro-batches add up: g0 = 1.0
    opt.accumulate(1, torch.tensor(-2.0))
    opt.step()
    expected = before * (1 - 0.5 * 0.1) - 0.5 * (1.0 * z0 + -2.0 * z1) / 2
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
    assert opt.step_count == 1
    assert not torch.equal(opt.direction(p, 0).view_as(p), z0)  # next step, next direction


def test_lr_zero_step_is_bit_exact_even_for_negative_zero():
    ((name, p),) = _named((3, 3), dtype=torch.float32)
    with torch.no_grad():
        p[0, 0] = -0.0
    before = p.detach().clone()
    opt = ZerothOrderSGD([(name, p)], lr=0.0)
    opt.accumulate(0, torch.tensor(3.0))
    opt.step()
    assert torch.equal(p.view(torch.int32), before.view(torch.int32))


def test_non_finite_projected_gradient_skips_the_update():
    ((name, p),) = _named((3,))
    before = p.detach().clone()
    opt = ZerothOrderSGD([(name, p)], lr=1.0)
    opt.accumulate(0, torch.tensor(float("nan")))
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(p.detach(), before) and opt.step_count == 1
    opt.accumulate(0, torch.tensor(1.0))
    opt.step()
    assert not torch.equal(p.detach(), before)


def test_state_dict_round_trip_resumes_the_stream():
    ((name, p),) = _named((4,))
    opt = ZerothOrderSGD([(name, p)], seed=11)
    for _ in range(3):
        opt.accumulate(0, torch.tensor(0.1))
        opt.step()
    fresh = ZerothOrderSGD([(name, p)], seed=0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.step_count == 3
    assert torch.equal(fresh.direction(p, 0), opt.direction(p, 0))
    assert not opt.state  # no per-parameter state, let alone O(model) buffers


def test_bad_arguments_are_refused_before_work():
    named = _named((2,))
    with pytest.raises(TypeError, match="named parameters"):
        ZerothOrderSGD([p for _, p in named])
    with pytest.raises(ValueError, match="eps"):
        ZerothOrderSGD(named, eps=0.0)
    with pytest.raises(ValueError, match="num_directions"):
        ZerothOrderSGD(named, num_directions=0)
    with pytest.raises(ValueError, match="distribution"):
        ZerothOrderSGD(named, distribution="uniform")
    with pytest.raises(ValueError, match="no parameters"):
        ZerothOrderSGD([{"params": []}])


def test_bf16_update_below_precision_moves_weights_with_stochastic_rounding():
    torch.manual_seed(0)
    p = nn.Parameter(torch.full((20_000,), 1.0, dtype=torch.bfloat16))
    opt = ZerothOrderSGD([("w", p)], lr=1e-4, eps=1e-2, distribution="rademacher")
    z = opt.direction(p, 0)
    opt.accumulate(0, torch.tensor(1.0))
    opt.step()
    delta = p.detach().float() - 1.0
    # bf16 spacing at 1.0 is 2^-7 ≈ 7.8e-3, 78× the update 1e-4: nearest rounding would lose it entirely.
    assert delta.abs().max() > 0
    # The update follows the perturbation the passes applied: fl(1 ± 0.01) = 1.0078125 / 0.98828125 in bf16.
    applied = ((1.0 + 1e-2 * z).bfloat16().float() - (1.0 - 1e-2 * z).bfloat16().float()) / 2e-2
    assert torch.allclose(applied.abs(), torch.full_like(applied, (1.0078125 - 0.98828125) / 2e-2))
    # Unbiased: the mean update along -z matches lr·mean(applied·z) (to sampling error of ±3σ).
    projected = float((delta * -z).mean())
    assert abs(projected - 1e-4 * float((applied * z).mean())) < 3 * 2**-7 / (20_000**0.5)


def test_bf16_coordinates_whose_perturbation_rounds_away_stay_bit_identical():
    """At ε = 1e-3 a bf16 weight of 1.0 sees θ ± εz = θ: the loss knows nothing of it, so it must not move."""
    values = torch.cat([torch.full((9_000,), 1.0), torch.zeros(1_000)]).bfloat16()
    p = nn.Parameter(values.clone())
    opt = ZerothOrderSGD([("w", p)], lr=1e-2, eps=1e-3)
    z = opt.direction(p, 0)
    rounded_away = (values.float() + 1e-3 * z).bfloat16() == (values.float() - 1e-3 * z).bfloat16()
    assert 0.9 < float(rounded_away[:9_000].float().mean()) and not rounded_away[9_000:].any()
    opt.accumulate(0, torch.tensor(3.0))
    with pytest.warns(RuntimeWarning, match=r"rounds back to θ for \d+% of 'w'"):
        opt.step()
    assert torch.equal(p.detach()[rounded_away], values[rounded_away])
    moved = p.detach() != values
    assert moved[~rounded_away].float().mean() > 0.5  # the small weights, whose perturbation was applied, train


def test_direction_does_not_depend_on_the_number_of_drawing_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = _draw("w", 5 * CHUNK_NUMEL + 7)
        torch.set_num_threads(2)
        parallel = _draw("w", 5 * CHUNK_NUMEL + 7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel)
