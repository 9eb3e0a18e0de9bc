"""The direction stream's chunk policy: z per device type, counts per pass, the fused θ + s·z.

The accelerator policy (16 Mi-element chunks) is plain device-agnostic code, so it is exercised here on
CPU by swapping the CPU entry of the policy; the one CUDA-only test runs the real thing when a GPU is lent.
"""

import pytest
import torch
from torch import nn

from hf_mezo import ZerothOrderSGD, directions
from hf_mezo.directions import (
    ACCELERATOR_CHUNK_NUMEL,
    CHUNK_NUMEL,
    add_direction,
    chunk_seed,
    chunks_per_pass,
    draw_direction,
)

STREAM = dict(run_seed=7, step=3, direction=1, distribution="gaussian")


def _draw(name, numel, device="cpu", dtype=torch.float32, **kw):
    return draw_direction(name, numel, **{**STREAM, "dtype": dtype, "device": device, **kw})


def _by_hand(name, numel, chunk, dtype=torch.float32):
    """z drawn independently of the stream's code: one seeded generator per chunk, concatenated."""
    pieces = []
    for index, lo in enumerate(range(0, numel, chunk)):
        generator = torch.Generator().manual_seed(chunk_seed(7, 3, 1, name, index))
        pieces.append(torch.empty(min(chunk, numel - lo), dtype=dtype).normal_(generator=generator))
    return torch.cat(pieces)


@pytest.fixture
def chunk_policy(monkeypatch):
    """Set the CPU chunk size of the policy (to run the accelerator policy's path on CPU)."""

    def use(numel: int) -> int:
        monkeypatch.setitem(directions.CHUNK_NUMEL_BY_DEVICE_TYPE, "cpu", numel)
        directions.clear_cache()
        return numel

    yield use
    directions.clear_cache()


def test_policy_keeps_64k_chunks_on_cpu_and_16m_on_accelerators():
    assert directions.chunk_numel("cpu") == CHUNK_NUMEL == 1 << 16
    assert directions.chunk_numel("cuda") == directions.chunk_numel("meta") == ACCELERATOR_CHUNK_NUMEL == 1 << 24


def test_cpu_z_is_unchanged_by_the_policy_one_seeded_generator_per_64k_chunk():
    numel = 2 * CHUNK_NUMEL + 777
    assert torch.equal(_draw("w", numel), _by_hand("w", numel, CHUNK_NUMEL))


def test_accelerator_policy_draws_a_whole_shard_independent_z(chunk_policy):
    """Real 16 Mi chunks: a shard [a, b) draws exactly the elements of the whole draw, across the boundary."""
    chunk = chunk_policy(ACCELERATOR_CHUNK_NUMEL)
    numel = chunk + 4099
    whole = _draw("emb.weight", numel)
    assert torch.equal(whole, _by_hand("emb.weight", numel, chunk))
    directions.reset_counters()
    for start, end in [(0, 10), (chunk - 5, chunk + 5), (chunk - 5, numel), (12345, 2 * 12345), (chunk + 1, numel)]:
        assert torch.equal(_draw("emb.weight", numel, start=start, end=end), whole[start:end])
    # Partial chunks are drawn whole once and cached: 16 Mi values drawn for the first shard, the next slice of
    # the same chunk comes from the cache; the tail chunk (4099 values) is redrawn only when the cache moved on.
    assert directions.reset_counters().seedings <= 5
    state = torch.get_rng_state()
    _draw("emb.weight", numel, start=3, end=chunk + 3)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("chunk", [1000, 1 << 14])
def test_shards_equal_the_whole_draw_under_any_policy(chunk_policy, chunk):
    chunk_policy(chunk)
    numel = 5 * chunk + 123
    whole = _draw("w", numel, distribution="rademacher")
    for start, end in [(0, 1), (chunk - 1, chunk + 1), (3 * chunk + 7, numel), (1, 4 * chunk), (numel, numel)]:
        assert torch.equal(_draw("w", numel, distribution="rademacher", start=start, end=end), whole[start:end])


def test_counters_match_a_hand_count(chunk_policy):
    chunk = chunk_policy(1000)
    numel = 3 * chunk + 5  # chunks 0, 1, 2 whole and chunk 3 of 5 elements
    directions.reset_counters()
    _draw("w", numel)
    assert directions.reset_counters() == directions.StreamCounters(seedings=4, launches=4, values=numel)
    _draw("w", numel, start=500, end=2500)  # chunk 0 partial, 1 whole, 2 partial: partials drawn whole + copy
    assert directions.reset_counters() == directions.StreamCounters(seedings=3, launches=5, values=3 * chunk)
    _draw("w", numel, start=2500, end=2800)  # the rest of chunk 2: from the cache, one copy
    assert directions.reset_counters() == directions.StreamCounters(seedings=0, launches=1, values=0)
    _draw("w", numel, distribution="rademacher")  # random_, mul_, sub_ per chunk
    assert directions.reset_counters() == directions.StreamCounters(seedings=4, launches=12, values=numel)
    add_direction(torch.zeros(numel), "w", numel, **STREAM, scale=0.5)  # per chunk: one fill, one add
    assert directions.reset_counters() == directions.StreamCounters(seedings=4, launches=8, values=numel)
    # chunks_per_pass reads only numel: meta tensors (nothing allocated) give the same count.
    metas = [torch.empty(numel, device="meta"), torch.empty(10, device="meta")]
    assert chunks_per_pass(metas, "cpu") == 4 + 1
    assert chunks_per_pass([ACCELERATOR_CHUNK_NUMEL + 1, 5], "cuda") == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [CHUNK_NUMEL, 1000])
def test_fused_add_equals_cast_add_cast_bit_for_bit(chunk_policy, chunk, dtype):
    chunk_policy(chunk)
    numel = 4 * chunk + 321
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(dtype)
    z = _draw("w", numel, dtype=directions.draw_dtype(dtype))
    reference = torch.add(theta.to(z.dtype), z, alpha=-2e-3).to(dtype)  # cast, add, cast: rounded once
    fused = add_direction(theta, "w", numel, **STREAM, scale=-2e-3)
    assert fused.dtype == dtype and torch.equal(fused.view(torch.uint8), reference.view(torch.uint8))
    lo, hi = chunk - 3, 3 * chunk + 11  # a slice at an offset, across chunk boundaries
    piece = add_direction(theta[lo:hi], "w", numel, **STREAM, scale=-2e-3, start=lo)
    assert torch.equal(piece.view(torch.uint8), reference[lo:hi].view(torch.uint8))
    in_place = theta.clone()
    add_direction(in_place, "w", numel, **STREAM, scale=-2e-3, out=in_place)
    assert torch.equal(in_place.view(torch.uint8), reference.view(torch.uint8))


def _train(params, steps, chunk_policy_numel, state=None):
    opt = ZerothOrderSGD(params, lr=1e-2, weight_decay=0.1, num_directions=2, seed=5)
    if state is not None:
        opt.load_state_dict(state)
    for _ in range(steps):
        opt.accumulate(0, torch.tensor(0.3 + opt.step_count))
        opt.accumulate(1, torch.tensor(-0.7))
        opt.step()
    return opt


@pytest.mark.parametrize("chunk", [ACCELERATOR_CHUNK_NUMEL, 1000])
def test_resume_is_bit_exact_under_the_accelerator_policy(chunk_policy, chunk):
    chunk_policy(chunk)

    def params():
        g = torch.Generator().manual_seed(1)
        return [
            ("w", nn.Parameter(torch.randn(37, 101, generator=g))),  # 3737 elements: 4 chunks of 1000
            ("h", nn.Parameter(torch.randn(2500, generator=g).to(torch.bfloat16))),  # stochastic rounding
        ]

    straight = params()
    _train(straight, 4, chunk)
    resumed = params()
    state = _train(resumed, 2, chunk).state_dict()
    _train(resumed, 2, chunk, state=state)
    for (_, a), (_, b) in zip(straight, resumed):
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8))


def test_update_under_the_accelerator_policy_is_minus_lr_g_z_with_z_drawn_by_hand(chunk_policy):
    chunk_policy(ACCELERATOR_CHUNK_NUMEL)
    p = nn.Parameter(torch.randn(64, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    before = p.detach().clone()
    opt = ZerothOrderSGD([("layer.weight", p)], lr=0.1, seed=7)
    opt.param_groups[0]["zo_step"] = 3
    opt.accumulate(0, torch.tensor(2.0))
    opt.step()
    generator = torch.Generator().manual_seed(chunk_seed(7, 3, 0, "layer.weight", 0))  # one chunk: one seeding
    z = torch.empty(p.numel(), dtype=torch.float64).normal_(generator=generator).view_as(p)
    torch.testing.assert_close(p.detach(), before - 0.1 * 2.0 * z, rtol=0, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draws_the_same_z_whole_and_in_shards():
    chunk = directions.chunk_numel("cuda")
    numel = 2 * chunk + 12345
    directions.reset_counters()
    whole = _draw("emb.weight", numel, device="cuda")
    assert directions.reset_counters().seedings == 3  # O(tensors): one seeding per 16 Mi elements
    for start, end in [(0, 10), (chunk - 5, chunk + 5), (chunk + 3, numel), (17, 2 * chunk), (1 << 20, 5 << 20)]:
        assert torch.equal(_draw("emb.weight", numel, device="cuda", start=start, end=end), whole[start:end])
    theta = torch.randn(numel, device="cuda").to(torch.bfloat16)
    reference = torch.add(theta.float(), whole, alpha=1e-3).to(torch.bfloat16)
    fused = add_direction(theta, "emb.weight", numel, **STREAM, scale=1e-3)
    assert torch.equal(fused.view(torch.int16), reference.view(torch.int16))
    directions.clear_cache()
