"""Where ``sadam.distributed.zero`` finds a parameter's fragment in DeepSpeed's flat partitions.

The layouts are built here from the attributes DeepSpeed sets (see the module's docstring), for
one rank of two, and the fragments are checked against where that rank's elements lie, worked
out by hand. tests/test_deepspeed_zero.py checks the whole step on the real engines; these
cover what those runs do not reach: a piece that is only padding, a last partition shorter than
the others, a parameter unfrozen after DeepSpeed built its partitions, and each layout SAdam
refuses, with its message.
"""
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from sadam.distributed import zero


def held(fragments):
    """The fragments as (index, source, start, numel, offset), and those of an empty fragment as
    (index, numel): where an empty fragment points does not matter, it steps no element."""
    return [(f.index, f.source, f.start, f.numel, f.offset) if f.numel else (f.index, 0)
            for f in fragments]


def parameters(sizes, frozen=()):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for j in frozen:
        params[j].requires_grad_(False)
    return params


# ------------------------------------------------------------------------------- stages 0-2
def stage12_layout(rank):
    """Parameters of 7, 3 (frozen), 3 and 2 elements: DeepSpeed flattens the trainable ones
    (12 elements) and gives each of two ranks 6. Rank 0 holds the first 6 elements of
    parameter 0; rank 1 its last element, then parameters 2 and 3 whole."""
    declared = parameters([7, 3, 3, 2], frozen=[1])
    flat = torch.zeros(6)
    dp_group = object()
    pieces = {0: [(0, 0, 6, 0)], 1: [(0, 0, 1, 6), (2, 1, 3, 0), (3, 4, 2, 0)]}[rank]
    for j in (0, 2, 3):
        declared[j]._hp_mapping, declared[j]._dp_group = None, dp_group
    for j, hp_start, numel, lp_start in pieces:
        declared[j]._hp_mapping = SimpleNamespace(
            hp_fragment=flat.narrow(0, hp_start, numel),
            hp_fragment_address=SimpleNamespace(start=hp_start, numel=numel),
            lp_fragment_address=SimpleNamespace(start=lp_start, numel=numel))
    return declared, flat, dp_group


@pytest.mark.parametrize("rank", [0, 1])
def test_stage12_fragments_are_where_the_rank_holds_each_parameter(rank):
    declared, flat, dp_group = stage12_layout(rank)
    fragments, group = zero.fragments([flat], declared)
    expected = {0: [(0, 0, 0, 6, 0), (2, 0), (3, 0)],
                1: [(0, 0, 0, 1, 6), (2, 0, 1, 3, 0), (3, 0, 4, 2, 0)]}[rank]
    assert held(fragments) == expected and group is dp_group


def test_stage12_a_parameter_unfrozen_after_deepspeed_built_its_partitions_is_held_by_none():
    """DeepSpeed partitions the parameters trainable when the engine is built; one unfrozen
    later carries none of its attributes and no rank holds it (AdamW under DeepSpeed does not
    step it either), while the probe partials are still summed over the data-parallel group."""
    declared, flat, dp_group = stage12_layout(1)
    late = torch.nn.Parameter(torch.zeros(4))
    fragments, group = zero.fragments([flat], declared + [late])
    assert held(fragments) == [(0, 0, 0, 1, 6), (2, 0, 1, 3, 0), (3, 0, 4, 2, 0), (4, 0)]
    assert group is dp_group


# ------------------------------------------------------------------------------------ stage 3
class Stage3:
    """What SAdam reads of DeepSpeed's ZeRO-3 optimizer: each sub-group's parameters and flat
    fp32 partition, the param group of each sub-group, and the data-parallel group."""

    def __init__(self, declared, world, members=None, group_ids=None):
        members = [p for p in declared if p.requires_grad] if members is None else members
        self.dp_process_group = object()
        self.fp16_groups = [members]
        for p in members:
            size = -(-p.numel() // world)  # every rank's partition is as long, padding included
            p.ds_id, p.ds_numel = id(p), p.numel()
            p.ds_tensor = torch.zeros(size)
            p.ds_tensor.ds_numel = size
        for p in declared:
            p._z3_optimizer = self
        self.fp32_partitioned_groups_flat = [
            torch.zeros(sum(int(p.ds_tensor.ds_numel) for p in members))]
        self.sub_group_to_group_id = {0: 0} if group_ids is None else group_ids


@pytest.fixture
def rank_in_dp_group(monkeypatch):
    """This process as rank ``r`` of the data-parallel group, and as rank 5 of a larger world: a partition's place follows the rank in the group that partitions it."""
    def use(z3, r):
        def get_rank(group=None):
            return r if group is z3.dp_process_group else 5
        monkeypatch.setattr(dist, "get_rank", get_rank)
    return use


def stage3_layout(rank_in_dp_group, rank=1):
    """Parameters of 10, 3 (frozen), 3 and 1 elements over two ranks, held by DeepSpeed in the
    order 3, 2, 0: partitions of 1, 2 and 5 elements. Rank 1 holds nothing but padding of
    parameter 3, the last element of parameter 2 (then one of padding), and the second half of
    parameter 0."""
    declared = parameters([10, 3, 3, 1], frozen=[1])
    z3 = Stage3(declared, world=2, members=[declared[3], declared[2], declared[0]])
    rank_in_dp_group(z3, rank)
    return declared, z3


@pytest.mark.parametrize("rank", [0, 1])
def test_stage3_fragments_are_where_the_rank_holds_each_parameter(rank_in_dp_group, rank):
    declared, z3 = stage3_layout(rank_in_dp_group, rank)
    fragments, group = zero.fragments(z3.fp32_partitioned_groups_flat, declared)
    expected = {0: [(0, 0, 3, 5, 0), (2, 0, 1, 2, 0), (3, 0, 0, 1, 0)],
                1: [(0, 0, 3, 5, 5), (2, 0, 1, 1, 2), (3, 0)]}[rank]
    assert held(fragments) == expected and group is z3.dp_process_group


def test_stage3_a_view_of_the_flat_partition_is_found(rank_in_dp_group):
    """DeepSpeed may hand the step a view of its flat partition rather than the tensor it
    keeps: the same storage is the same partition."""
    declared, z3 = stage3_layout(rank_in_dp_group)
    fragments, _ = zero.fragments([z3.fp32_partitioned_groups_flat[0][:]], declared)
    assert held(fragments) == [(0, 0, 3, 5, 5), (2, 0, 1, 1, 2), (3, 0)]


def test_stage3_the_sub_group_of_the_flat_partition_among_several_groups(rank_in_dp_group):
    """Three param groups, one sub-group each: stepping the second finds its own parameters."""
    groups = [parameters([4]), parameters([6, 2]), parameters([3])]
    z3 = Stage3(groups[1], world=2, group_ids={0: 0, 1: 1, 2: 2})
    z3.fp16_groups = [groups[0], groups[1], groups[2]]
    z3.fp32_partitioned_groups_flat = [torch.zeros(2), torch.zeros(4), torch.zeros(2)]
    for p in groups[0] + groups[2]:
        p.ds_numel, p.ds_tensor = p.numel(), torch.zeros(2)
        p.ds_tensor.ds_numel = 2
    rank_in_dp_group(z3, 1)
    fragments, _ = zero.fragments([z3.fp32_partitioned_groups_flat[1]], groups[1])
    assert held(fragments) == [(0, 0, 0, 3, 3), (1, 0, 3, 1, 1)]


def test_stage3_a_parameter_unfrozen_after_deepspeed_built_its_partitions_is_held_by_none(
        rank_in_dp_group):
    declared, z3 = stage3_layout(rank_in_dp_group)
    late = torch.nn.Parameter(torch.zeros(4))
    late._z3_optimizer = z3
    fragments, _ = zero.fragments(z3.fp32_partitioned_groups_flat, declared + [late])
    assert held(fragments) == [(0, 0, 3, 5, 5), (2, 0, 1, 1, 2), (3, 0), (4, 0)]


def refused(error, message):
    return pytest.raises(error, match="^" + re.escape(message) + "$")


def test_stage3_refuses_two_flat_partitions_in_one_group(rank_in_dp_group):
    declared, z3 = stage3_layout(rank_in_dp_group)
    flat = z3.fp32_partitioned_groups_flat[0]
    with refused(RuntimeError, "SAdam expects DeepSpeed's ZeRO-3 optimizer to step one flat "
                               "partition per param group at a time, got 2"):
        zero.fragments([flat, flat], declared)


def test_stage3_refuses_a_flat_partition_deepspeed_does_not_hold(rank_in_dp_group):
    declared, _ = stage3_layout(rank_in_dp_group)
    with refused(RuntimeError, "SAdam was given a flat partition that DeepSpeed's ZeRO-3 "
                               "optimizer does not hold"):
        zero.fragments([torch.zeros(8)], declared)


def test_stage3_refuses_a_param_group_split_into_sub_groups(rank_in_dp_group):
    declared, z3 = stage3_layout(rank_in_dp_group)
    z3.sub_group_to_group_id = {0: 0, 1: 0}
    with refused(ValueError, "ZeRO-3 split param group 0 into 2 sub-groups "
                             "(zero_optimization.sub_group_size); SAdam needs each group's probe "
                             "partials in one step: raise sub_group_size above the group's "
                             "parameter count"):
        zero.fragments(z3.fp32_partitioned_groups_flat, declared)


def test_stage3_refuses_a_partitioned_parameter_the_group_was_not_declared_with(
        rank_in_dp_group):
    declared, z3 = stage3_layout(rank_in_dp_group)
    with refused(RuntimeError, "a parameter of DeepSpeed's ZeRO-3 partition is not one of the "
                               "param group's declared parameters"):
        zero.fragments(z3.fp32_partitioned_groups_flat, declared[1:])

