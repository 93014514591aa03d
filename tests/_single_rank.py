"""A one-rank process group in this process (gloo, or NCCL on a GPU), and device meshes on it
(for DTensor layouts that need no second rank)."""
import contextlib

import pytest


@contextlib.contextmanager
def _one_rank_world(dist, backend, tmp_path):
    dist.init_process_group(backend, store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def single_rank_world(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with _one_rank_world(dist, "gloo", tmp_path):
        yield


@pytest.fixture
def single_rank_mesh(single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (1,))


@pytest.fixture
def single_rank_nccl_world(tmp_path):
    """NCCL takes CUDA tensors only."""
    import torch
    dist = pytest.importorskip("torch.distributed")
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs a CUDA device and torch.distributed with NCCL")
    with _one_rank_world(dist, "nccl", tmp_path):
        yield
