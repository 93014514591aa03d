"""DTensor parameter layouts SAdam accepts and rejects, on a one-rank mesh in this process (the
two-rank tests in test_distributed.py run the same rules across ranks)."""
import pytest
import torch

from _single_rank import single_rank_mesh, single_rank_nccl_world, single_rank_world  # noqa: F401
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


def _rejected_group(params, message):
    """A step of SAdam over ``params`` (each given a gradient like it) raises ``message`` in
    full, and nothing changes."""
    for p in params:
        p.grad = torch.ones_like(p).detach()
    opt = SAdam(params, backend="torch")
    snap = snapshot(opt, params)
    with pytest.raises(ValueError) as error:
        opt.step()
    assert str(error.value) == message
    assert_unchanged(opt, params, snap)


def test_a_group_mixing_dtensor_and_plain_parameters_is_named_before_any_change(
        single_rank_mesh):
    from torch.distributed.tensor import Shard
    _rejected_group(
        [_dtensor(single_rank_mesh, [Shard(0)], torch.randn(4, 3)),
         torch.nn.Parameter(torch.randn(4, 3))],
        "param group 0 mixes DTensor and plain tensor parameters; put them in separate param "
        "groups (their probe partials are reduced differently)")


def test_a_group_on_two_device_meshes_is_named_before_any_change(single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    flat, square = init_device_mesh("cpu", (1,)), init_device_mesh("cpu", (1, 1))
    _rejected_group(
        [_dtensor(flat, [Shard(0)], torch.randn(4, 3)),
         _dtensor(square, [Shard(0), Shard(1)], torch.randn(4, 3))],
        "param group 0 holds DTensors on different device meshes; put them in separate param "
        "groups")


@pytest.mark.parametrize("layouts", [
    pytest.param(([0], [1]), id="second split over the other mesh dimension"),
    pytest.param(([0], [0], [1]), id="third split over the other mesh dimension"),
    pytest.param(([], [0]), id="replicated, then split"),
])
def test_a_group_split_over_different_mesh_dimensions_is_named_before_any_change(
        single_rank_world, layouts):
    """Each entry lists the mesh dimensions that split one parameter (Shard(0)) of a 1 x 1
    mesh; the other dimension replicates it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    mesh = init_device_mesh("cpu", (1, 1))
    params = [_dtensor(mesh, [Shard(0) if d in dims else Replicate() for d in range(2)],
                       torch.randn(4, 3)) for dims in layouts]
    _rejected_group(params, "param group 0 holds DTensors split over different mesh dimensions; "
                            "put them in separate param groups")


@pytest.mark.parametrize("sharded", [True, False], ids=["Shard(0)", "Replicate()"])
def test_several_dtensors_split_alike_step_like_plain_tensors(single_rank_mesh, sharded):
    """Three parameters of one group, all sharded (or all replicated) over the same mesh
    dimension, are accepted and step as the same plain tensors do."""
    from torch.distributed.tensor import Replicate, Shard
    placements = [Shard(0) if sharded else Replicate()]
    values = [torch.randn(6, 2), torch.randn(3), torch.randn(4, 5)]
    grads = [torch.randn_like(v) for v in values]
    dtensors = [_dtensor(single_rank_mesh, placements, v) for v in values]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    for p, q, g in zip(dtensors, plain, grads):
        p.grad = _dtensor(single_rank_mesh, placements, g).detach()
        q.grad = g.clone()
    for params in (dtensors, plain):
        opt = SAdam(params, backend="torch", scope="tensor", probe_lag=0)
        for _ in range(2):
            opt.step()
    for p, q in zip(dtensors, plain):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=0)


def test_shard_params_names_a_param_group_by_default(single_rank_mesh):
    from torch.distributed.tensor import Shard
    from sadam.distributed import shard_params
    params = [_dtensor(single_rank_mesh, [Shard(0)], torch.randn(4, 3)),
              torch.nn.Parameter(torch.randn(4, 3))]
    with pytest.raises(ValueError) as error:
        shard_params(params)
    assert str(error.value).startswith("param group mixes DTensor and plain tensor parameters;")


def test_a_gradient_placed_unlike_its_parameter_is_named_before_any_change(single_rank_mesh):
    """A sharded parameter with a replicated gradient: its local shard is not the piece of the
    gradient that belongs to the local piece of the parameter, so the step refuses it."""
    from torch.distributed.tensor import Replicate, Shard
    p = _dtensor(single_rank_mesh, [Shard(0)], torch.randn(4, 3))
    p.grad = _dtensor(single_rank_mesh, [Replicate()], torch.randn(4, 3)).detach()
    opt = SAdam([p], backend="torch")
    snap = snapshot(opt, [p])
    with pytest.raises(ValueError) as error:
        opt.step()
    assert str(error.value) == ("the gradient of parameter 0 of param group 0 has placements "
                                "(Replicate(),), the parameter (Shard(dim=0),)")
    assert_unchanged(opt, [p], snap)


LOSS_PROBE_REFUSED = ("probe='loss' does not support sharded (DTensor) parameters (each rank would "
                      "probe its own loss); use probe='gradient'")


def test_the_loss_probe_refuses_a_dtensor_parameter_at_construction_and_in_a_new_group(
        single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    mesh = init_device_mesh("cpu", (1,))
    sharded = _dtensor(mesh, [Shard(0)], torch.randn(4, 3))
    with pytest.raises(ValueError) as error:
        SAdam([sharded], probe="loss", backend="torch")
    assert str(error.value) == LOSS_PROBE_REFUSED
    plain = torch.nn.Parameter(torch.randn(3))
    opt = SAdam([plain], probe="loss", backend="torch")
    with pytest.raises(ValueError) as error:
        opt.add_param_group({"params": [sharded]})
    assert str(error.value) == LOSS_PROBE_REFUSED
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [plain]
    opt.add_param_group({"params": [sharded], "probe": "gradient"})  # the gradient probe takes it
    assert opt.param_groups[1]["params"] == [sharded]
