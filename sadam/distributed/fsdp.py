"""Sharded probes: partial directional derivatives summed across the ranks that share a tensor.

Probe signs depend on an element's index in the full tensor, so each rank's local sum over its
shard is a partial of the full d_i; one all-reduce makes every rank hold the unsharded value.

Parameters sharded as DTensors (FSDP2's ``fully_shard``) are stepped on their local shards:
:func:`shard_params` gives those shards, the flat index of each shard's first element in the full
tensor, and the process group over which the shards of one tensor are spread. Only a split of
dim 0 keeps a shard's elements contiguous in the full tensor's flat order, so that is the one
sharding supported (``Shard(0)`` on one mesh dimension, ``Replicate`` on the others, as FSDP2 and
HSDP lay parameters out).
"""
import functools
import math

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # a torch build without distributed support
    DTensor = None


def reduce_directional_derivatives(d: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum ``d`` over ``process_group`` (no-op for an unsharded group)."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return d
    dist.all_reduce(d, op=dist.ReduceOp.SUM, group=process_group)
    return d


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def to_local(tensors):
    """The local shards of DTensors; plain tensors as they are."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def _shard_mesh_dim(p, where):
    """The mesh dimension that splits ``p`` (None if it is replicated); rejects other layouts."""
    shard_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            shard_dims.append(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"SAdam supports DTensor parameters sharded on dim 0 (Shard(0)) or "
                             f"replicated; {where} has placements {tuple(p.placements)}")
    if len(shard_dims) > 1:
        raise ValueError(f"SAdam supports DTensor parameters split over one mesh dimension; "
                         f"{where} has placements {tuple(p.placements)}")
    return shard_dims[0] if shard_dims else None


@functools.lru_cache(maxsize=4096)
def _flat_offset(shape, mesh, placements) -> int:
    """Flat index in the full tensor of this rank's first element (start row * row size).
    Cached: DTensor's own computation costs tens of microseconds per parameter and step."""
    if not shape:
        return 0
    _, global_offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return int(global_offset[0]) * math.prod(shape[1:])


def shard_params(params, where="param group"):
    """``(local tensors, global flat offsets, process group)`` of a parameter list.

    Plain tensors give themselves, offsets 0 and no group. DTensors give their local shards, the
    flat index of each shard's first element in the full tensor (start row * row size), and the
    group of the mesh dimension that splits them, over which the probe partials are summed.
    Every parameter of the list must then be a DTensor sharded over that same group.
    """
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return list(params), [0] * len(params), None
    if not all(sharded):
        raise ValueError(f"{where} mixes DTensor and plain tensor parameters; put them in "
                         "separate param groups (their probe partials are reduced differently)")
    offsets = []
    mesh = params[0].device_mesh
    shard_dim = None
    for j, p in enumerate(params):
        name = f"parameter {j} of {where}"
        if p.device_mesh != mesh:
            raise ValueError(f"{where} holds DTensors on different device meshes; put them in "
                             "separate param groups")
        dim = _shard_mesh_dim(p, name)
        if j > 0 and dim != shard_dim:
            raise ValueError(f"{where} holds DTensors split over different mesh dimensions; put "
                             "them in separate param groups")
        shard_dim = dim
        if p.grad is not None and is_dtensor(p.grad) and p.grad.placements != p.placements:
            raise ValueError(f"the gradient of {name} has placements {tuple(p.grad.placements)}, "
                             f"the parameter {tuple(p.placements)}")
        offsets.append(_flat_offset(tuple(p.shape), mesh, tuple(p.placements)))
    group = None if shard_dim is None else mesh.get_group(shard_dim)
    return to_local(params), offsets, group


def any_nonzero(tensors) -> bool:
    """Whether any element of ``tensors`` is nonzero, agreed by every rank of the DTensors'
    meshes (so that all ranks take the same branch around a collective)."""
    local = to_local(tensors)
    flag = torch.tensor(float(any(bool(t.any()) for t in local if t.numel())), device="cpu")
    meshes = {t.device_mesh for t in tensors if is_dtensor(t)}
    for mesh in meshes:
        flag = flag.to(mesh.device_type)
        for mesh_dim in range(mesh.ndim):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    return bool(flag)
