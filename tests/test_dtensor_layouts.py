"""DTensor parameter layouts SAdam accepts and rejects, on a one-rank mesh in this process (the
two-rank tests in test_distributed.py run the same rules across ranks)."""
import pytest
import torch

from _single_rank import single_rank_nccl_world, single_rank_world  # noqa: F401 (fixtures)
from _unchanged import assert_unchanged, snapshot
from sadam import SAdam


def _dtensor(mesh, placements, value):
    from torch.distributed.tensor import distribute_tensor
    return torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements))


def test_a_parameter_split_over_two_mesh_dimensions_is_rejected_before_any_change(
        single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    p = _dtensor(mesh, [Shard(0), Shard(0)], torch.randn(4, 3))
    p.grad = _dtensor(mesh, [Shard(0), Shard(0)], torch.randn(4, 3)).detach()
    opt = SAdam([p], backend="torch")
    snap = snapshot(opt, [p])
    with pytest.raises(ValueError) as error:
        opt.step()
    assert str(error.value) == (
        "SAdam supports DTensor parameters split over one mesh dimension; parameter 0 of param "
        "group 0 has placements (Shard(dim=0), Shard(dim=0))")
    assert_unchanged(opt, [p], snap)


def test_a_replicated_dtensor_steps_like_a_plain_tensor(single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    mesh = init_device_mesh("cpu", (1,))
    value, grad = torch.randn(5, 2), torch.randn(5, 2)
    p = _dtensor(mesh, [Replicate()], value)
    q = torch.nn.Parameter(value.clone())
    p.grad = _dtensor(mesh, [Replicate()], grad).detach()
    q.grad = grad.clone()
    for opt in (SAdam([p], backend="torch", probe_lag=0), SAdam([q], backend="torch", probe_lag=0)):
        opt.step()
    torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("nonzero", [False, True])
def test_lr_zero_first_step_on_an_nccl_mesh(single_rank_nccl_world, nonzero):
    """Whether an lr-0 first step is DCP's state creation is agreed over the mesh with a flag
    on the mesh's device: NCCL rejects a CPU tensor. A zero gradient only creates the state
    (count 0), a nonzero one takes the real step (count 1)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cuda", (1,))
    p = _dtensor(mesh, [Shard(0)], torch.ones(4, 3, device="cuda"))
    grad = torch.ones(4, 3, device="cuda") if nonzero else torch.zeros(4, 3, device="cuda")
    p.grad = _dtensor(mesh, [Shard(0)], grad).detach()
    opt = SAdam([p], lr=0.0, backend="torch")
    opt.step()
    assert float(opt.state[p]["step"]) == (1.0 if nonzero else 0.0)
    assert torch.equal(p.full_tensor(), torch.ones(4, 3, device="cuda"))
