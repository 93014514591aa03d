"""Sharded probes: partial directional derivatives summed across the ranks that share a tensor.

Probe signs depend on an element's index in the full tensor, so each rank's local sum over its
shard is a partial of the full d_i; one all-reduce makes every rank hold the unsharded value.
"""
import torch
import torch.distributed as dist


def reduce_directional_derivatives(d: torch.Tensor, process_group=None) -> torch.Tensor:
    """Sum ``d`` over ``process_group`` (no-op for an unsharded group)."""
    if process_group is None or not dist.is_available() or not dist.is_initialized():
        return d
    dist.all_reduce(d, op=dist.ReduceOp.SUM, group=process_group)
    return d
