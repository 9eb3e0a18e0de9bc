"""Seeded perturbation directions: z as a pure function of (run seed, step, direction, parameter, position).

MeZO never stores z: it is regenerated from a seed whenever needed (the + pass, the − pass, the
update). The reference implementation reseeds the *global* RNG with one seed per step and draws all
parameters in sequence, so a parameter's z depends on which parameters came before it, and the
global RNG that drives dropout and data order is consumed. Here every parameter is cut into chunks
of `CHUNK_NUMEL` elements of its flattened full tensor, and each chunk is drawn from its own
`torch.Generator`, seeded by a hash of (run seed, step, direction, parameter name, chunk index).
Hence z of an element depends only on its name and position, which makes it:

- independent of which other parameters exist (freezing a layer does not change the rest),
- independent of sharding (a rank holding elements [a, b) of a parameter draws exactly those),
- reproducible across resumes (nothing but the step counter is state).

Directions are drawn in float32 (float64 for float64 parameters) and rounded once to the
parameter's dtype. z differs between CPU and CUDA generators: a trajectory is per device type.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Elements per independently seeded chunk: large enough that seeding (~µs) costs nothing next to
# drawing (~150 µs at 400 M values/s), small enough that a 768×768 matrix splits across CPU threads
# and a shard boundary wastes little.
CHUNK_NUMEL = 1 << 16

# One generator per (thread, device). On CPU, `normal_` is single-threaded, so chunks are drawn by a
# small thread pool (one worker per intra-op thread): 2 threads draw ~2× faster on 2 cores.
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def chunk_seed(run_seed: int, step: int, direction: int, name: str, chunk: int) -> int:
    """A 63-bit seed for one chunk of one parameter's direction; stable across processes and versions."""
    key = f"{run_seed}/{step}/{direction}/{name}/{chunk}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def _generator(device: torch.device) -> torch.Generator:
    generators = _local.__dict__.setdefault("generators", {})
    if device not in generators:
        generators[device] = torch.Generator(device=device)
    return generators[device]


def _cpu_pool() -> ThreadPoolExecutor | None:
    global _pool, _pool_size
    workers = torch.get_num_threads()
    if workers <= 1:
        return None
    if _pool is None or _pool_size != workers:
        _pool, _pool_size = ThreadPoolExecutor(workers, thread_name_prefix="hf_mezo_rng"), workers
    return _pool


def draw_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """z is drawn in float64 for float64 parameters and in float32 for everything else."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def _fill(chunk: torch.Tensor, distribution: str, generator: torch.Generator) -> None:
    if distribution == "gaussian":
        chunk.normal_(generator=generator)
    elif distribution == "rademacher":  # ±1 with equal probability (random_ is 4× faster than bernoulli_)
        chunk.random_(0, 2, generator=generator).mul_(2).sub_(1)
    elif distribution == "uniform":  # U[0, 1): the random bits of stochastic rounding
        chunk.uniform_(generator=generator)
    else:
        raise ValueError(f"unknown direction distribution {distribution!r}")


def draw_direction(
    name: str,
    numel: int,
    *,
    run_seed: int,
    step: int,
    direction: int,
    distribution: str,
    dtype: torch.dtype,
    device: torch.device,
    start: int = 0,
    end: int | None = None,
) -> torch.Tensor:
    """Elements [start, end) of the flattened direction z for parameter `name` of `numel` elements.

    Returns a new 1-D tensor of `dtype` (float32 or float64) on `device`.
    """
    end = numel if end is None else end
    if not 0 <= start <= end <= numel:
        raise ValueError(f"direction slice [{start}, {end}) is outside parameter {name!r} of {numel} elements")
    device = torch.device(device)
    out = torch.empty(end - start, dtype=dtype, device=device)
    chunks = range(start // CHUNK_NUMEL, (end - 1) // CHUNK_NUMEL + 1) if end > start else range(0)

    def draw_chunk(chunk: int) -> None:
        chunk_start = chunk * CHUNK_NUMEL
        chunk_end = min(chunk_start + CHUNK_NUMEL, numel)
        lo, hi = max(start, chunk_start), min(end, chunk_end)
        generator = _generator(device)
        generator.manual_seed(chunk_seed(run_seed, step, direction, name, chunk))
        if lo == chunk_start and hi == chunk_end:
            _fill(out[lo - start : hi - start], distribution, generator)
        else:  # a partial chunk (shard boundary): draw it whole so values match the unsharded draw
            whole = torch.empty(chunk_end - chunk_start, dtype=dtype, device=device)
            _fill(whole, distribution, generator)
            out[lo - start : hi - start] = whole[lo - chunk_start : hi - chunk_start]

    # Handing work to threads costs tens of µs (ms on a busy machine): only worth it for a few chunks or more.
    pool = _cpu_pool() if device.type == "cpu" and len(chunks) >= 4 else None
    if pool is None:
        for chunk in chunks:
            draw_chunk(chunk)
    else:
        # Each worker takes an interleaved share; the values do not depend on which thread draws a chunk.
        workers = min(_pool_size, len(chunks))
        list(pool.map(lambda w: [draw_chunk(c) for c in chunks[w::workers]], range(workers)))
    return out
