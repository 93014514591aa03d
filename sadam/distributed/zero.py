"""DeepSpeed ZeRO: SAdam steps DeepSpeed's flat fp32 partitions one parameter fragment at a time.

DeepSpeed's ZeRO optimizers (stages 1 and 2, the bf16 optimizer it uses at stage 0, and stage 3)
replace each param group's ``params`` by one flat fp32 partition per rank and call the client
optimizer's ``step()`` on it. Stepped as one tensor, the probe hash would see partition indices
with tensor id 0, and each rank's rho would come from its own slice. Instead SAdam cuts the
partition back into the pieces of the model's parameters it holds ("fragments"), and steps each
with its parameter's index in the group as it was declared (frozen parameters included) and the
flat index of its first element in the full parameter, then all-reduces the probe partials over
the data-parallel group, as for FSDP2 shards.

Where the fragments lie:

* stages 0 (bf16), 1 and 2: DeepSpeed records on each model parameter ``_hp_mapping`` (None when
  the parameter does not overlap this rank's partition): ``hp_fragment_address`` is the place in
  the flat partition, ``lp_fragment_address`` the place in the full, flattened parameter; every
  trainable parameter carries the data-parallel group as ``_dp_group``.
* stage 0 with bf16 (DeepSpeed's unfused low-precision optimizer): ``params`` are fp32 copies of
  the group's trainable parameters, whole and in order; only the frozen ones are left out.
* stage 3: the flat partition of a sub-group is its parameters' partitions (``ds_tensor``, each
  ``ds_tensor.ds_numel`` elements, padding included) end to end; the partition of rank r starts
  at flat index ``r * ds_tensor.ds_numel`` of the full parameter.

A rank steps an empty fragment for every trainable parameter it holds no piece of, so each rank
updates every statistics row from the all-reduced partials and joins the collective even when it
holds nothing of the group.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist


@dataclass
class Fragment:
    index: int  # the parameter's index in its declared param group: the hash's tensor id j
    source: int  # which of the group's current ``params`` holds it
    start: int  # first element in that (flattened) tensor
    numel: int
    offset: int  # flat index of the first element in the full parameter


def _empty(j):
    return Fragment(j, 0, 0, 0, 0)


def is_zero_managed(params, declared) -> bool:
    """Whether DeepSpeed replaced a group's declared parameters by its flat partitions."""
    if not declared:
        return False
    if len(params) == len(declared) and all(p is q for p, q in zip(params, declared)):
        return False
    return (any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in declared)
            or _are_copies(params, declared))


def _trainable(declared):
    return [j for j, p in enumerate(declared) if p.requires_grad and p.numel() > 0]


def _are_copies(params, declared) -> bool:
    """Whether ``params`` are whole copies of the trainable declared parameters, in order (none
    for a group whose parameters are all frozen: DeepSpeed empties it)."""
    trainable = _trainable(declared)
    return len(params) == len(trainable) and all(
        p is not declared[j] and p.shape == declared[j].shape for p, j in zip(params, trainable))


def _copy_fragments(params, declared):
    return [Fragment(j, s, 0, p.numel(), 0)
            for s, (p, j) in enumerate(zip(params, _trainable(declared)))], None


def _stage3(declared):
    for p in declared:
        z3 = getattr(p, "_z3_optimizer", None)
        if z3 is not None:
            return z3
    return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _stage12_fragments(params, declared):
    fragments, group = [], None
    for j in _trainable(declared):  # frozen: not in DeepSpeed's partitions, as unsharded
        p = declared[j]
        group = getattr(p, "_dp_group", group)
        mapping = getattr(p, "_hp_mapping", None)
        source = None if mapping is None else next(
            (s for s, flat in enumerate(params) if _same_storage(mapping.hp_fragment, flat)), None)
        if source is None:
            fragments.append(_empty(j))
            continue
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        fragments.append(Fragment(j, source, int(hp.start), int(hp.numel), int(lp.start)))
    return fragments, group


def _stage3_sub_group(z3, flat) -> int:
    for s, candidate in enumerate(z3.fp32_partitioned_groups_flat):
        if candidate is flat or _same_storage(candidate, flat):
            return s
    raise RuntimeError("SAdam was given a flat partition that DeepSpeed's ZeRO-3 optimizer does "
                       "not hold")


def _stage3_fragments(z3, params, declared):
    if len(params) != 1:
        raise RuntimeError(f"SAdam expects DeepSpeed's ZeRO-3 optimizer to step one flat "
                           f"partition per param group at a time, got {len(params)}")
    sub_group = _stage3_sub_group(z3, params[0])
    group_id = z3.sub_group_to_group_id[sub_group]
    siblings = [s for s, g in z3.sub_group_to_group_id.items() if g == group_id]
    if len(siblings) > 1:
        raise ValueError(
            f"ZeRO-3 split param group {group_id} into {len(siblings)} sub-groups "
            "(zero_optimization.sub_group_size); SAdam needs each group's probe partials in one "
            "step: raise sub_group_size above the group's parameter count")
    index = {id(p): j for j, p in enumerate(declared)}
    rank = dist.get_rank(group=z3.dp_process_group)
    fragments, start = [], 0
    for p in z3.fp16_groups[sub_group]:
        if id(p) not in index:
            raise RuntimeError("a parameter of DeepSpeed's ZeRO-3 partition is not one of the "
                               "param group's declared parameters")
        size = int(p.ds_tensor.ds_numel)
        offset = rank * size
        numel = max(0, min(size, int(p.ds_numel) - offset))
        fragments.append(Fragment(index[id(p)], 0, start, numel, offset if numel else 0))
        start += size
    held = {f.index for f in fragments}
    fragments += [_empty(j) for j in _trainable(declared) if j not in held]
    return sorted(fragments, key=lambda f: f.index), z3.dp_process_group


def fragments(params, declared) -> "tuple[List[Fragment], Optional[object]]":
    """The fragments of a group's current ``params`` (DeepSpeed's fp32 partitions or copies of
    the parameters ``declared``), one per trainable parameter (empty where this rank holds none
    of it), and the process group that sums the probe partials (None: nothing to sum)."""
    z3 = _stage3(declared)
    if z3 is not None:
        return _stage3_fragments(z3, params, declared)
    if any(hasattr(p, "_hp_mapping") for p in declared):
        return _stage12_fragments(params, declared)
    return _copy_fragments(params, declared)


def stats_anchor(params, declared) -> Optional[torch.Tensor]:
    """The flat partition whose optimizer state holds the group's probe statistics. ZeRO-3 sets
    a group's ``params`` only while it steps it, so the anchor is found through DeepSpeed."""
    if params:
        return params[0]
    z3 = _stage3(declared)
    if z3 is None:
        return None
    wanted = {id(p) for p in declared}
    for s, members in enumerate(z3.fp16_groups):
        if any(id(p) in wanted for p in members):
            return z3.fp32_partitioned_groups_flat[s]
    return None
