"""Distributed MeZO: one reduced scalar per direction and step, no DDP, ranks checked for agreement.

Data parallel. Every process draws the same z from the same seed (z is a pure function of run seed,
step, direction and parameter position), evaluates L₊ and L₋ on its own shard of the batch, and only
the projected gradients g = (L₊ − L₋)/2ε — n float64 scalars — are mean-reduced through Accelerate.
Every process then applies the identical update θ ← θ − lr·(mean_j g_j·z_j + wd·θ), so the replicas
stay bit-identical without ever exchanging parameters. The traffic of a step does not depend on
the model's size.

No DDP. `DistributedDataParallel` exists to all-reduce gradients; MeZO has none. Wrapping anyway
allocates gradient buckets as large as the trainable parameters (MeZO's point is inference-level
memory), registers a hook per parameter, broadcasts the whole model at construction, and
Accelerate's CPU path wraps even a model with nothing to reduce, where DDP raises. (Its per-forward
buffer broadcast does not fire under `no_grad`, so the per-step traffic would be the same.) The
Trainer's model preparation therefore runs Accelerate's `prepare_model(..., evaluation_mode=True)`:
device placement, autocast and `torch.compile` as configured, no DDP. What DDP's constructor did
once — make every replica start from rank 0's weights — `synchronize_at_start` does, and only if
the replicas differ.

Rank consistency. Replicas that should be bit-identical are cheap to compare: each process sums the
bit patterns of each trainable tensor (as integers, so the sum is exact and order-independent) and
the short vector of sums, with the direction seed and step, is gathered. A mismatch raises
`RankDivergenceError` naming the ranks and tensors; it is checked at start, before every checkpoint
and evaluation, and on demand (`check_rank_consistency`).

Sharded models (FSDP2, `fully_shard`). Each process holds rows [a, b) of dim 0 of every parameter
as a `DTensor` shard. Forwards see the all-gathered parameter, which `perturbation.sharded` perturbs
with the full z; the update touches only the local shard (`shards.local_shard`), drawing z for flat elements
[a·row, b·row) of the full parameter — exactly the slice the unsharded update would apply
(`directions` draws any slice of a parameter's z bit-identically). A sharded run thus takes the
trajectory of an unsharded one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers.utils import logging

from .refusals import refuse_unsupported_accelerator
from .shards import is_sharded, local_shard, shard_rows

logger = logging.get_logger(__name__)

__all__ = [
    "RankDivergenceError",
    "check_rank_consistency",
    "local_shard",
    "parameter_checksums",
    "prepare_model_without_ddp",
    "shard_rows",
    "synchronize_at_start",
]

_DISTRIBUTIONS = ("gaussian", "rademacher")
_INTEGER_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RankDivergenceError(RuntimeError):
    """Processes that must hold identical MeZO state do not: they would silently train different models."""


# ---- checksums and the consistency check ----------------------------------------------------------


def parameter_checksums(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor: the wrapping sum of its elements' bit patterns (the local shard of a DTensor).

    Integer sums are exact and independent of reduction order, so equal tensors give equal checksums
    on any device and thread count, and a single flipped bit changes the checksum.
    """
    sums = []
    for tensor in tensors:
        local = tensor.detach()
        if is_sharded(local):
            local = local.to_local()
        bits = local.reshape(-1).view(_INTEGER_VIEW[local.element_size()])
        sums.append(bits.sum(dtype=torch.int64).cpu())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def _optimizer_fingerprint(optimizer) -> list[int]:
    """What must agree across ranks for them to draw the same z: seed, step, directions, distribution, ε."""
    if optimizer is None:
        return []
    group = optimizer.param_groups[0]
    eps_bits = struct.unpack("<q", struct.pack("<d", float(group["eps"])))[0]
    return [
        int(group["seed"]),
        int(group["zo_step"]),
        int(group["num_directions"]),
        _DISTRIBUTIONS.index(group["distribution"]),
        eps_bits,
        _method_digest(optimizer),
    ]


def _method_digest(optimizer) -> int:
    """63 bits of a hash of the method's recorded fields (family, estimator, update, rank, interval, momentum)."""
    method = getattr(optimizer, "method", None)
    key = repr(sorted(vars(method).items())) if method is not None else ""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


_FINGERPRINT_FIELDS = (
    "direction seed", "optimizer step", "zo_num_directions", "zo_distribution", "zo_eps", "zo_method and its knobs",
)  # fmt: skip


def _gather_rows(row: torch.Tensor) -> torch.Tensor:
    """All processes' `row` (same length everywhere), stacked: one all-gather of a few int64s."""
    from accelerate import PartialState
    from accelerate.utils import gather

    state = PartialState()
    # NCCL gathers device tensors only; gloo takes either.
    return gather(row.to(state.device)).cpu().view(state.num_processes, -1)


def _disagreement(rows: torch.Tensor, labels: list[str]) -> tuple[list[int], list[int], list[str]] | None:
    """(minority ranks, reference ranks, labels of the differing entries), or None when all rows agree."""
    groups: list[list[int]] = []
    for rank in range(rows.shape[0]):
        for group in groups:
            if torch.equal(rows[group[0]], rows[rank]):
                group.append(rank)
                break
        else:
            groups.append([rank])
    if len(groups) == 1:
        return None
    reference = max(groups, key=lambda g: (len(g), -g[0]))  # the largest group; ties go to the one with rank 0
    others = sorted(rank for group in groups if group is not reference for rank in group)
    differing = (rows[others] != rows[reference[0]]).any(dim=0).nonzero().flatten().tolist()
    return others, reference, [labels[i] for i in differing]


def _describe(labels: list[str], limit: int = 5) -> str:
    shown = ", ".join(labels[:limit])
    return shown + (f" (and {len(labels) - limit} more)" if len(labels) > limit else "")


def check_rank_consistency(
    named_tensors: Iterable[tuple[str, torch.Tensor]] | nn.Module,
    optimizer=None,
    *,
    where: str = "on demand",
) -> None:
    """Raise `RankDivergenceError` unless every process holds bit-identical trainable tensors and direction stream.

    Args:
        named_tensors: a model (its trainable parameters are compared) or `(name, tensor)` pairs.
        optimizer: a `ZerothOrderSGD` whose seed, step, direction count, distribution and ε must agree.
        where: what the caller is about to do, for the error message ("checkpoint save", "evaluation").

    A collective: every process must call it. Sharded (`DTensor`) parameters differ across ranks by
    design and are left out; the optimizer fingerprint still covers them. Costs one read of the
    trainable parameters and one all-gather of (5 + number of tensors) int64s.
    """
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return
    if isinstance(named_tensors, nn.Module):
        named_tensors = [(n, p) for n, p in named_tensors.named_parameters() if p.requires_grad]
    named = [(n, t) for n, t in named_tensors if not is_sharded(t)]
    fingerprint = _optimizer_fingerprint(optimizer)
    row = torch.cat([torch.tensor(fingerprint, dtype=torch.int64), parameter_checksums(t for _, t in named)])
    labels = list(_FINGERPRINT_FIELDS[: len(fingerprint)]) + [f"parameter {n!r}" for n, _ in named]
    found = _disagreement(_gather_rows(row), labels)
    if found is None:
        return
    others, reference, differing = found
    step = f" (optimizer step {fingerprint[1]} on rank 0)" if fingerprint else ""
    raise RankDivergenceError(
        f"MeZO rank consistency check failed at {where}{step}: rank(s) {others} disagree with rank(s) {reference} "
        f"on {_describe(differing)}. Data-parallel MeZO needs every process to apply identical updates from the "
        "same seed; a divergence comes from a different seed or zo_* setting per process, a process that resumed "
        "from another checkpoint, or a non-deterministic write to the weights. Restart from the last good checkpoint."
    )


@torch.no_grad()
def synchronize_at_start(model: nn.Module, optimizer=None) -> bool:
    """Before training: make every replica start from rank 0's weights, as DDP's constructor does.

    Checks the direction stream first (a seed that differs per process is an error, never averaged
    away), then compares checksums of all parameters and buffers; only if they differ — typically a
    head initialized without a common seed — broadcasts rank 0's tensors (a warning names the ranks).
    Returns whether a broadcast happened. A collective; a no-op in a single process.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast

    state = PartialState()
    if state.num_processes == 1:
        return False
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers()) if not is_sharded(t)]
    fingerprint = _optimizer_fingerprint(optimizer)
    row = torch.cat([torch.tensor(fingerprint, dtype=torch.int64), parameter_checksums(t for _, t in tensors)])
    labels = list(_FINGERPRINT_FIELDS[: len(fingerprint)]) + [n for n, _ in tensors]
    found = _disagreement(_gather_rows(row), labels)
    if found is None:
        return False
    others, reference, differing = found
    config = [label for label in differing if label in _FINGERPRINT_FIELDS]
    if config:
        raise RankDivergenceError(
            f"MeZO processes disagree on their {', '.join(config)} at the start of training (rank(s) {others} vs "
            f"{reference}): they would draw different directions. Give every process the same `seed` / `zo_seed` "
            "and zo_* settings, and resume all of them from the same checkpoint."
        )
    if state.is_main_process:
        logger.warning(
            f"Rank(s) {others} start with weights that differ from rank 0 in {_describe(differing)} (e.g. a head "
            "initialized without a common seed); broadcasting rank 0's parameters and buffers, as DDP would."
        )
    for _, tensor in tensors:
        on_device = tensor.data.to(state.device)  # NCCL broadcasts device tensors only
        broadcast(on_device, from_process=0)
        if on_device.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(on_device)
    return True


# ---- model preparation without DDP ------------------------------------------------------------------


def is_data_parallel(accelerator) -> bool:
    """Several processes, each with a whole replica (DDP-style), as opposed to one process or a sharding engine."""
    # MULTI_CPU, MULTI_GPU, MULTI_XPU, MULTI_NPU, ...: every backend Accelerate would wrap in DDP.
    return accelerator.num_processes > 1 and accelerator.distributed_type.name.startswith("MULTI_")


def prepare_model_without_ddp(accelerator, model: nn.Module) -> nn.Module:
    """Accelerate's model preparation minus the DDP wrapper: device placement, autocast, torch.compile.

    The model is marked prepared, so the Trainer's later `accelerator.prepare(model, optimizer)` leaves
    it as is and prepares only the optimizer.
    """
    return accelerator.prepare_model(model, evaluation_mode=True)


def wrap_model_for_mezo(
    trainer, wrap: Callable[..., nn.Module], model: nn.Module, training: bool, dataloader
) -> nn.Module:
    """`MeZOTrainer._wrap_model`: the Trainer's wrapping, except that data-parallel training gets no DDP.

    `wrap` is the Trainer's own `_wrap_model`. For data-parallel training the model is prepared here
    without DDP and the replicas are synchronized once (seeds verified, weights made equal).
    """
    accelerator = trainer.accelerator
    refuse_unsupported_accelerator(accelerator)
    wrapped = wrap(model, training=training, dataloader=dataloader)
    # Evaluation, a wrapper of the Trainer's own (DataParallel, ...), or no replicas to keep in step.
    if not training or wrapped is not model or not is_data_parallel(accelerator):
        return wrapped
    synchronize_at_start(model, trainer.zo_optimizer if trainer.optimizer is not None else None)
    return prepare_model_without_ddp(accelerator, model)
