"""DDP and FSDP2 on two gloo ranks equal one process; DCP checkpoints reshard 2 -> 1.

One launch of tests/distributed_worker.py (two processes) runs every two-rank scenario; the tests
compare its records with single-process twins computed here. Tolerances: spec section 6.
"""
import pytest
import torch
import torch.distributed as dist

import _backends
import distributed_worker as W
from _native_cases import assert_stats_close
import spec_tolerance
import sadam

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

LAUNCH_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Launch the two ranks once (bounded time); their records, rank by rank."""
    out = tmp_path_factory.mktemp("two_ranks")
    scenarios = "kernels" if _backends.INTERPRETED else "optimizer,kernels"
    return out, W.launch(out, scenarios, timeout_s=LAUNCH_TIMEOUT_S)


def assert_params_close(actual, expected):
    for name, ref in expected.items():
        spec_tolerance.assert_params_close(actual[name], ref, name=name)


def assert_rho_close(actual, expected):
    assert len(actual) == len(expected)
    for a_step, e_step in zip(actual, expected):
        for a, e in zip(a_step, e_step):
            spec_tolerance.assert_rho_close(a, e)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
@pytest.mark.parametrize("config", list(W.CONFIGS))
def test_two_ranks_equal_one_process(two_ranks, engine, config):
    _, ranks = two_ranks
    model, opt, history = W.reference_run(config)
    expected = W.full_params(model)
    # the probe statistics moved: rho is not trivially zero on this non-smooth loss
    assert max(float(r.max()) for r in history[-1]) > 0.1
    for record in ranks:
        result = record[f"{engine}_{config}"]
        assert_params_close(result["params"], expected)
        assert_rho_close(result["lgi"], history)
        if engine == "ddp":  # replicated: each rank's own d, never summed over the ranks
            # the EMAs of d and d**2 too: rho alone cannot see d scaled by a constant
            assert_stats_close(result["stats"], W.probe_stats(opt),
                               opt.param_groups[0]["probes"])


@pytest.mark.parametrize("backend", ["triton", "cpu", pytest.param("cuda", marks=pytest.mark.skip(
    reason="the two ranks run gloo on CPU tensors; the cuda backend needs a CUDA rank each"))])
def test_fsdp_on_kernel_backend_equals_one_process_reference(two_ranks, backend):
    _, ranks = two_ranks
    if f"fsdp_backend_{backend}" not in ranks[0]:
        pytest.skip(_backends.why_skipped(backend) or f"backend {backend!r} did not run")
    model, _, history = W.reference_run("tensor_lag1")
    for record in ranks:
        result = record[f"fsdp_backend_{backend}"]
        assert_params_close(result["params"], W.full_params(model))
        assert_rho_close(result["lgi"], history)


@pytest.mark.parametrize("config", list(W.ODD_CONFIGS))
def test_fsdp_odd_shards_equal_one_process(two_ranks, config):
    """Every Linear sharded on its own, with 37, 5, 3 and 1 rows (19+18, 3+2, 2+1 and 1+0 on
    the two ranks), and a 3-class softmax head (2+1) whose bias gradient sums to 0: parameters
    and every tensor's (or the group's) rho as in one process."""
    _, ranks = two_ranks
    model, _, history = W.reference_run(config)
    assert max(float(r.max()) for r in history[-1]) > 0.1
    for rank, record in enumerate(ranks):
        result = record[f"fsdp_{config}"]
        rows_of_layers = (37, 3) if config in W.SOFTMAX_CONFIGS else W.ODD_ROWS
        for rows, layer in zip(rows_of_layers, range(0, 2 * len(rows_of_layers), 2)):
            assert result["local_shapes"][f"{layer}.bias"][0] == (rows + 1) // 2 - rank * (rows % 2)
        assert_params_close(result["params"], W.full_params(model))
        assert_rho_close(result["lgi"], history)


def test_fsdp_shards_are_uneven_and_empty(two_ranks):
    _, ranks = two_ranks
    shapes = [r["fsdp_tensor_lag1"]["local_shapes"] for r in ranks]
    assert shapes[0]["0.weight"] == (4, 6) and shapes[1]["0.weight"] == (3, 6)
    assert shapes[1]["2.weight"] == (0, 7) and shapes[1]["2.bias"] == (0,)


def test_fsdp_bf16_mixed_precision_equals_bf16_compute_in_one_process(two_ranks):
    _, ranks = two_ranks
    model, _, history = W.reference_run("tensor_lag1", bf16_compute=True)
    for record in ranks:
        assert_params_close(record["fsdp_bf16"]["params"], W.full_params(model))
        assert_rho_close(record["fsdp_bf16"]["lgi"], history)


def _load_checkpoint(model, opt, checkpoint_dir):
    """Load a two-rank FSDP2 checkpoint into an unsharded model and optimizer (2 -> 1)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    for group in state["optim"]["param_groups"]:
        group["state_dtype"] = None  # must come back from the checkpoint
    dcp.load(state, checkpoint_id=str(checkpoint_dir))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_resharded_2_to_1_resumes_like_uninterrupted_run(two_ranks):
    out, ranks = two_ranks
    model = W.build_model()
    for p in model.parameters():
        p.data.fill_(0.5)  # overwritten by the checkpoint
    opt = W.make_optimizer(model, "tensor_lag1")
    _load_checkpoint(model, opt, out / "ckpt_tensor_lag1")
    assert opt.param_groups[0]["state_dtype"] is torch.float32
    assert all(float(s["step"]) == W.SAVE_AFTER for s in opt.state.values())

    model, _, resumed = W.reference_run("tensor_lag1", steps=W.STEPS - W.SAVE_AFTER,
                                        model=model, opt=opt)
    _, _, uninterrupted = W.reference_run("tensor_lag1")
    final = ranks[0]["fsdp_tensor_lag1"]
    assert_params_close(W.full_params(model), final["params"])
    assert_rho_close(resumed, uninterrupted[W.SAVE_AFTER:])
    assert_rho_close(resumed, final["lgi"][W.SAVE_AFTER:])


@pytest.mark.parametrize("probe", ["gradient", "loss"])
def test_state_init_step_of_dcp_changes_nothing(probe):
    """get_optimizer_state_dict on a fresh optimizer steps it with zero grads and lr 0 to create
    the state: that must not count a step or a probe sample, nor need a closure."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model = W.build_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sadam.SAdam(model.parameters(), lr=1e-2, probe=probe, backend="torch")
    state = get_optimizer_state_dict(model, opt)
    assert opt.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for s in state["state"].values():
        assert float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
    fresh_model = W.build_model()
    fresh = sadam.SAdam(fresh_model.parameters(), lr=1e-2, probe=probe, backend="torch")
    x, y = W.batch()
    for m, o in ((model, opt), (fresh_model, fresh)):
        def closure(m=m, o=o):
            o.zero_grad()
            loss = W.loss_of(m, x, y)
            loss.backward()
            return loss
        for _ in range(3):
            o.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))
    assert torch.equal(opt.lgi()[0], fresh.lgi()[0])


def test_lr_zero_first_step_with_real_gradients_still_steps():
    """A warm-up from lr=0 takes a real first step (moments and count move), as AdamW does."""
    model = W.build_model()
    ref_model = W.build_model()
    opt = sadam.SAdam(model.parameters(), lr=0.0, damping=0.0, backend="torch")
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.0)
    x, y = W.batch()
    for m, o in ((model, opt), (ref_model, ref)):
        W.loss_of(m, x, y).backward()
        o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(opt.state[p]["exp_avg"], ref.state[q]["exp_avg"])
        assert float(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("mesh", ["world", "hsdp", "alone"])
def test_lr_zero_first_step_with_one_rank_nonzero_takes_the_real_step_on_every_rank(two_ranks,
                                                                                      mesh):
    """Only rank 0's rows have a nonzero gradient at an lr-0 first step: the ranks of a mesh
    agree on it and all take the real step (count 1, moments moved) that one process takes. On
    the 1-rank sub-meshes of "alone" no rank shares a mesh: rank 1's zero shard only creates
    its state (count 0), as a one-process optimizer of that shard alone does."""
    _, ranks = two_ranks
    full = torch.ones(4, 3, requires_grad=True)
    full.grad = W.LR_ZERO_GRAD.clone()
    one_process = sadam.SAdam([full], lr=0.0, backend="torch")
    one_process.step()
    expected_exp_avg = one_process.state[full]["exp_avg"].chunk(W.WORLD)
    assert expected_exp_avg[0].any() and not expected_exp_avg[1].any()
    for rank, record in enumerate(ranks):
        result = record["lr_zero_first_step"][mesh]
        real_step = mesh != "alone" or rank == 0
        assert result["step"] == (1.0 if real_step else 0.0)
        torch.testing.assert_close(result["exp_avg"], expected_exp_avg[rank], rtol=0, atol=0)
        assert torch.equal(result["param"], torch.ones(2, 3))


def test_dtensor_sharded_on_dim_1_is_rejected_before_any_change(two_ranks):
    _, ranks = two_ranks
    for record in ranks:
        result = record["shard_dim_1"]
        assert result["error"] is not None and "Shard(0)" in result["error"]
        assert result["unchanged"] and result["state"] == 0



def test_a_replicated_dtensor_on_two_ranks_steps_like_one_process(two_ranks):
    """Each rank holds the whole replicated tensor: its statistics and its step are those of
    one process over the plain tensor, bit for bit (its partials are not summed over ranks)."""
    _, ranks = two_ranks
    p = torch.nn.Parameter(torch.ones(4, 3))
    opt = sadam.SAdam([p], lr=1e-2, damping=2.0, scope="tensor", probe_lag=0, backend="torch")
    for step in range(W.REPLICATED_STEPS):
        p.grad = W.replicated_grad(step)
        opt.step()
    for record in ranks:
        result = record["replicated_dtensor"]
        assert torch.equal(result["stats"], opt.state[p]["probe_stats"])
        assert torch.equal(result["param"], p.detach())
