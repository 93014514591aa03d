"""Sharded parameters: each engine's layout mapped to local pieces, global offsets and a group."""
from .fsdp import (any_nonzero, is_dtensor, reduce_directional_derivatives, shard_params,
                   to_local)

__all__ = ["any_nonzero", "is_dtensor", "reduce_directional_derivatives", "shard_params",
           "to_local"]
