"""Where a parameter's local elements sit in its full flattened tensor (FSDP2 `DTensor` shards).

A layout question, not a process-level one: the optimizer must know which slice of the full direction
z its local rows are, and the sharded perturbation must know that a tensor is a shard at all. Kept
below the optimizer so that it imports nothing of the distributed machinery (`hf_mezo.distributed`).
"""

from __future__ import annotations

import math

import torch

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = Replicate = Shard = None


def is_sharded(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def shard_rows(rows: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Rows [start, end) of dim 0 that shard `shard_index` of `num_shards` holds, as `torch.chunk` (FSDP2) cuts."""
    per_shard = math.ceil(rows / num_shards) if rows else 0
    start = min(shard_index * per_shard, rows)
    return start, min(start + per_shard, rows)


def local_shard(param: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the tensor this process updates, flat offset of its first element in the full parameter).

    A plain tensor is its own shard at offset 0. A `DTensor` must be sharded on dim 0 over at most one
    mesh dimension (FSDP2's layout, replicated elsewhere as in HSDP), so the shard is one contiguous
    run of the flattened full parameter.
    """
    if not is_sharded(param):
        return param, 0
    local = param.to_local()
    shard_dims = [i for i, placement in enumerate(param.placements) if not isinstance(placement, Replicate)]
    if not shard_dims:
        return local, 0
    placement = param.placements[shard_dims[0]]
    if len(shard_dims) > 1 or not isinstance(placement, Shard) or placement.dim != 0:
        raise NotImplementedError(
            f"MeZO updates sharded parameters laid out as FSDP2 does (Shard(0) on one mesh dimension); got "
            f"placements {param.placements}. Use fully_shard's default layout (no shard_placement_fn, no tensor parallel)."
        )
    mesh_dim = shard_dims[0]
    rows = param.shape[0]
    start, end = shard_rows(rows, param.device_mesh.size(mesh_dim), param.device_mesh.get_local_rank(mesh_dim))
    if tuple(local.shape) != (end - start, *param.shape[1:]) or not local.is_contiguous():
        raise NotImplementedError(
            f"local shard of shape {tuple(local.shape)} is not rows [{start}, {end}) of the full parameter "
            f"{tuple(param.shape)}; MeZO cannot locate its elements in the full direction."
        )
    row_numel = param.numel() // rows if rows else 0
    return local, start * row_numel
