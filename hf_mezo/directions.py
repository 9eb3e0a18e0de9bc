"""Seeded perturbation directions: z as a pure function of (run seed, step, direction, parameter, position).

MeZO never stores z: it is regenerated from a seed whenever needed (the + pass, the − pass, the
update). The reference implementation reseeds the *global* RNG with one seed per step and draws all
parameters in sequence, so a parameter's z depends on which parameters came before it, and the
global RNG that drives dropout and data order is consumed. Here every parameter is cut into chunks
of `chunk_numel(device)` elements of its flattened full tensor, and each chunk is drawn from its own
`torch.Generator`, seeded by a hash of (run seed, step, direction, parameter name, chunk index).
Hence z of an element depends only on its name and position, which makes it:

- independent of which other parameters exist (freezing a layer does not change the rest),
- independent of sharding (a rank holding elements [a, b) of a parameter draws exactly those),
- reproducible across resumes (nothing but the step counter is state).

The chunk size is per device type. Each chunk costs a Python hash, a `manual_seed` and a fill launch:
on CPU that is µs next to the ~250 µs of drawing 64 Ki values, and small chunks let a thread pool
share one matrix. On a GPU a launch draws 16 Mi values in well under a millisecond, so chunks of
16 Mi make the seedings and launches of a pass O(number of parameter tensors) (roberta-large: 397,
OPT-13B: 1,299; see benchmarks/direction_stream.py) instead of one per 64 Ki elements.

`add_direction` computes θ + s·z chunk by chunk (one read of θ, one write, z alive for one chunk), for
the perturbed forwards and the update alike. Directions are drawn in float32 (float64 for float64
parameters) and θ + s·z is computed in that dtype and rounded once to θ's dtype. z differs between
CPU and CUDA generators: a trajectory is per device type (and, on CUDA, the values of a large `normal_`
launch may depend on the GPU model, since Philox offsets follow the launch grid).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

# Elements per independently seeded chunk on CPU: large enough that seeding (~µs) costs nothing next to
# drawing (~150 µs at 400 M values/s), small enough that a 768×768 matrix splits across CPU threads
# and a shard boundary wastes little. Changing it would change every CPU trajectory.
CHUNK_NUMEL = 1 << 16
# Elements per chunk on accelerators (CUDA, ...): a parameter of up to 16 Mi elements is one seeding and one
# fill launch; only the largest matrices (vocabulary embeddings) take a few.
ACCELERATOR_CHUNK_NUMEL = 1 << 24
# The policy: chunk size by `torch.device.type`; any type not listed gets `ACCELERATOR_CHUNK_NUMEL`.
# Tests swap the CPU entry to run the accelerator policy's code on CPU.
CHUNK_NUMEL_BY_DEVICE_TYPE: dict[str, int] = {"cpu": CHUNK_NUMEL}


def chunk_numel(device: torch.device | str) -> int:
    """Elements per seeded chunk of z on `device` (the policy above)."""
    return CHUNK_NUMEL_BY_DEVICE_TYPE.get(torch.device(device).type, ACCELERATOR_CHUNK_NUMEL)


def chunks_per_pass(tensors: Iterable[torch.Tensor | int], device: torch.device | str) -> int:
    """Chunks (= generator seedings = fill launches) to draw z once for all `tensors` on `device`.

    Reads only `numel()`, so meta tensors (nothing allocated) or plain element counts work.
    """
    size = chunk_numel(device)
    return sum(math.ceil((t if isinstance(t, int) else t.numel()) / size) for t in tensors)


@dataclass
class StreamCounters:
    """Work done by the stream since the last `reset_counters()` (read by benchmarks and tests)."""

    seedings: int = 0  # generator.manual_seed calls (one hash each)
    launches: int = 0  # tensor operations issued: fills, copies and adds (kernel launches on a GPU)
    values: int = 0  # random values drawn


counters = StreamCounters()
_counters_lock = threading.Lock()


def reset_counters() -> StreamCounters:
    """Return the counts so far and start again from zero."""
    global counters
    with _counters_lock:
        done, counters = counters, StreamCounters()
    return done


def _count(seedings: int = 0, launches: int = 0, values: int = 0) -> None:
    with _counters_lock:
        counters.seedings += seedings
        counters.launches += launches
        counters.values += values


# Per thread: one generator per device, and the last chunk that was drawn whole but used in part (a shard
# or block boundary inside a chunk), so that the next slice of the same chunk is not drawn again.
_local = threading.local()
# On CPU, `normal_` is single-threaded, so chunks are drawn by a small thread pool (one worker per intra-op
# thread): 2 threads draw ~2× faster on 2 cores.
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


def clear_cache() -> None:
    """Drop this thread's cached partial chunk (up to one chunk of memory per device)."""
    _local.__dict__.pop("partial", None)


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
    # normal_ is the fastest exact Gaussian available (benchmarks/direction_stream.py measures the others).
    if distribution == "gaussian":
        chunk.normal_(generator=generator)
        _count(launches=1, values=chunk.numel())
    elif distribution == "rademacher":  # ±1 with equal probability (random_ is 4× faster than bernoulli_)
        chunk.random_(0, 2, generator=generator).mul_(2).sub_(1)
        _count(launches=3, values=chunk.numel())
    elif distribution == "uniform":  # U[0, 1): the random bits of stochastic rounding
        chunk.uniform_(generator=generator)
        _count(launches=1, values=chunk.numel())
    else:
        raise ValueError(f"unknown direction distribution {distribution!r}")


@dataclass(frozen=True)
class _Stream:
    """Which z: one parameter's direction for one step, as drawn on one device in one dtype."""

    name: str
    numel: int
    run_seed: int
    step: int
    direction: int
    distribution: str
    dtype: torch.dtype
    device: torch.device
    chunk_numel: int

    def chunks(self, start: int, end: int) -> range:
        return range(start // self.chunk_numel, (end - 1) // self.chunk_numel + 1) if end > start else range(0)

    def span(self, chunk: int) -> tuple[int, int]:
        chunk_start = chunk * self.chunk_numel
        return chunk_start, min(chunk_start + self.chunk_numel, self.numel)

    def draw(self, chunk: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """The whole chunk `chunk` of z, drawn into `into` when given."""
        chunk_start, chunk_end = self.span(chunk)
        if into is None:
            into = torch.empty(chunk_end - chunk_start, dtype=self.dtype, device=self.device)
        generator = _generator(self.device)
        generator.manual_seed(chunk_seed(self.run_seed, self.step, self.direction, self.name, chunk))
        _count(seedings=1)
        _fill(into, self.distribution, generator)
        return into

    def partial(self, chunk: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) (absolute positions) of chunk `chunk`, which they do not cover whole.

        The chunk is drawn whole, so the values match the unsharded draw, and kept for the next slice.
        """
        key, cached = (self, chunk), _local.__dict__.get("partial")
        if cached is None or cached[0] != key:
            cached = (key, self.draw(chunk))
            _local.partial = cached
        chunk_start = self.span(chunk)[0]
        return cached[1][lo - chunk_start : hi - chunk_start]

    def for_each_chunk(self, start: int, end: int, work: Callable[[int, int, int], None]) -> None:
        """Call work(chunk, lo, hi) for every chunk overlapping [start, end), with [lo, hi) the overlap."""
        chunks = self.chunks(start, end)

        def run(chunk: int) -> None:
            chunk_start, chunk_end = self.span(chunk)
            # No autograd: z is a constant, and pool threads would not inherit the caller's no_grad (per thread).
            with torch.no_grad():
                work(chunk, max(start, chunk_start), min(end, chunk_end))

        # Handing work to threads costs tens of µs (ms on a busy machine): only worth it for a few chunks or more.
        pool = _cpu_pool() if self.device.type == "cpu" and len(chunks) >= 4 else None
        if pool is None:
            for chunk in chunks:
                run(chunk)
        else:
            # Each worker takes an interleaved share; the values do not depend on which thread draws a chunk.
            workers = min(_pool_size, len(chunks))
            list(pool.map(lambda w: [run(c) for c in chunks[w::workers]], range(workers)))


def _stream(name, numel, run_seed, step, direction, distribution, dtype, device, start, end) -> tuple[_Stream, int]:
    end = numel if end is None else end
    if not 0 <= start <= end <= numel:
        raise ValueError(f"direction slice [{start}, {end}) is outside parameter {name!r} of {numel} elements")
    device = torch.device(device)
    stream = _Stream(name, numel, run_seed, step, direction, distribution, dtype, device, chunk_numel(device))
    return stream, end


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
    stream, end = _stream(name, numel, run_seed, step, direction, distribution, dtype, device, start, end)
    out = torch.empty(end - start, dtype=dtype, device=stream.device)

    def draw_chunk(chunk: int, lo: int, hi: int) -> None:
        if (lo, hi) == stream.span(chunk):
            stream.draw(chunk, into=out[lo - start : hi - start])
        else:
            out[lo - start : hi - start] = stream.partial(chunk, lo, hi)
            _count(launches=1)

    stream.for_each_chunk(start, end, draw_chunk)
    return out


def add_direction(
    values: torch.Tensor,
    name: str,
    numel: int,
    *,
    run_seed: int,
    step: int,
    direction: int,
    distribution: str,
    scale: float,
    start: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = values + scale·z, where `values` are elements [start, start + values.numel()) of the flattened
    parameter `name` of `numel` elements and z its direction; computed chunk by chunk.

    Computed in z's dtype (`draw_dtype(values.dtype)`) and rounded once to `values.dtype`: bit-identical to
    `(values.to(z.dtype) + scale·z).to(values.dtype)`, without ever holding more than one chunk of z. `out`
    defaults to a new tensor like `values`; pass `out=values` to update in place.
    """
    dtype = draw_dtype(values.dtype)
    end = start + values.numel()
    stream, end = _stream(name, numel, run_seed, step, direction, distribution, dtype, values.device, start, end)
    out = torch.empty_like(values, memory_format=torch.contiguous_format) if out is None else out
    if not (values.is_contiguous() and out.is_contiguous()):  # rare (a strided view): z drawn whole for it
        z = draw_direction(name, numel, run_seed=run_seed, step=step, direction=direction, distribution=distribution,
                           dtype=dtype, device=values.device, start=start, end=end)  # fmt: skip
        _count(launches=1)
        with torch.no_grad():
            return torch.add(values, z.view_as(values), alpha=scale, out=out)
    flat_values, flat_out = values.view(-1), out.view(-1)
    # For a float32/float64 result the chunk of z can be drawn straight into `out` (when that is not `values`).
    draw_into_out = out.dtype == dtype and out.data_ptr() != values.data_ptr()

    def add_chunk(chunk: int, lo: int, hi: int) -> None:
        piece_values, piece_out = flat_values[lo - start : hi - start], flat_out[lo - start : hi - start]
        if (lo, hi) != stream.span(chunk):
            z = stream.partial(chunk, lo, hi)
        else:
            z = stream.draw(chunk, into=piece_out if draw_into_out else None)
        # One (mixed-dtype for bf16/fp16) add: TensorIterator computes in float32 and rounds once on store.
        torch.add(piece_values, z, alpha=scale, out=piece_out)
        _count(launches=1)

    stream.for_each_chunk(start, end, add_chunk)
    return out
