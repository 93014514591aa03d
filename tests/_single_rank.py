"""A one-rank gloo process group in this process, and device meshes on it (for DTensor layouts
that need no second rank)."""
import pytest


@pytest.fixture
def single_rank_world(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def single_rank_mesh(single_rank_world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (1,))
