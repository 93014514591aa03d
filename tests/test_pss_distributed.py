"""PSS on parameters sharded over two gloo ranks (uneven Shard(0) DTensors, as FSDP2 lays them
out) against the same PSS on the unsharded tensors in this process."""
import pytest
import torch
import torch.distributed as dist

import distributed_worker as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed (gloo)")


@pytest.fixture(scope="module")
def pss_two_ranks(tmp_path_factory):
    return W.launch(tmp_path_factory.mktemp("pss_two_ranks"), "pss")


def one_process(names):
    """The oracle: the same PSS run on the full tensors of ``names`` in this process."""
    weights, grads = W.pss_tensors()
    plain = {n: torch.nn.Parameter(weights[n].clone()) for n in names}
    _, emas, report = W.pss_run(plain, grads, lambda g, p: g.clone())
    assert report is not None and report.step == 3
    assert any(not torch.equal(plain[n].detach(), weights[n]) for n in plain)  # it smoothed
    return plain, emas, report


def assert_rank_equals_one_process(result, plain, emas, report):
    """A rank's record against one process: the norm's EMA at every step, the smoothing firing
    with the same ranks k, and the full smoothed weights."""
    assert result["emas"] == pytest.approx(emas, rel=1e-6)
    assert result["fired"] and result["ks"] == [m.k for m in report.matrices]
    for name, p in plain.items():
        torch.testing.assert_close(result["full"][name], p.detach(), rtol=1e-5, atol=1e-6)


def test_pss_on_two_ranks_with_uneven_shards_equals_one_process(pss_two_ranks):
    """The gradient norm is all-reduced over the shards (the EMA equals the unsharded one on
    every rank), the smoothing fires on the same spike with the same ranks, and each rank
    writes its own rows of the smoothed matrix back (7 rows: 4 + 3; 3 rows: 2 + 1)."""
    ranks = pss_two_ranks
    plain, emas, report = one_process(W.PSS_SHAPES)
    for rank, record in enumerate(ranks):
        result = record["pss"]
        assert_rank_equals_one_process(result, plain, emas, report)
        for name, p in plain.items():
            rows = p.shape[0]
            if W.PSS_SHAPES[name][1] == "shard":
                first = (rows + 1) // 2  # torch.chunk: the first rank takes the larger half
                lo, hi = (0, first) if rank == 0 else (first, rows)
            else:
                lo, hi = 0, rows
            torch.testing.assert_close(result["local"][name], p.detach()[lo:hi], rtol=1e-5,
                                       atol=1e-6)
    assert ranks[0]["pss"]["local"]["uneven"].shape[0] == 4
    assert ranks[1]["pss"]["local"]["uneven"].shape[0] == 3


def test_pss_with_shards_on_two_one_dim_meshes_counts_each_element_once(pss_two_ranks):
    """HSDP's layout on a (2, 1) mesh: one gradient split over both ranks, one whole on each
    rank (a one-rank mesh). Each mesh's squares are all-reduced over that mesh's group only, so
    the norm (and its EMA) equals the one-process norm on every rank, where reducing over the
    whole world or over the other mesh's group counts the whole copies twice; the smoothing
    then writes the one-process result back on both meshes."""
    plain, emas, report = one_process(W.PSS_TWO_MESHES)
    for rank, record in enumerate(pss_two_ranks):
        result = record["pss_two_meshes"]
        assert_rank_equals_one_process(result, plain, emas, report)
        rows = slice(0, 4) if rank == 0 else slice(4, 7)  # 7 rows split 4 + 3 over "replicate"
        torch.testing.assert_close(result["local"]["uneven"], plain["uneven"].detach()[rows],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["local"]["one_row_each"],
                                   plain["one_row_each"].detach(), rtol=1e-5, atol=1e-6)
