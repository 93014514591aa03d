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


def test_pss_on_two_ranks_with_uneven_shards_equals_one_process(pss_two_ranks):
    """The gradient norm is all-reduced over the shards (the EMA equals the unsharded one on
    every rank), the smoothing fires on the same spike with the same ranks, and each rank
    writes its own rows of the smoothed matrix back (7 rows: 4 + 3; 3 rows: 2 + 1)."""
    ranks = pss_two_ranks
    weights, grads = W.pss_tensors()
    plain = {n: torch.nn.Parameter(w.clone()) for n, w in weights.items()}
    _, emas, report = W.pss_run(plain, grads, lambda g, p: g.clone())
    assert report is not None and report.step == 3
    assert any(not torch.equal(plain[n].detach(), weights[n]) for n in plain)  # it smoothed
    for rank, record in enumerate(ranks):
        result = record["pss"]
        assert result["emas"] == pytest.approx(emas, rel=1e-6)
        assert result["fired"] and result["ks"] == [m.k for m in report.matrices]
        for name, p in plain.items():
            torch.testing.assert_close(result["full"][name], p.detach(), rtol=1e-5, atol=1e-6)
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
