"""torch.compile traces a whole S-Adam step through the native ops (schemas + fake kernels)."""
import pytest
import torch
import torch._dynamo.testing

from sadam.backends import native
from sadam.functional import sadam as functional_sadam

from _native_cases import clone, copy_grads, make_group, new_grads, require


@pytest.fixture(autouse=True)
def cpu_kernels():
    require("cpu")


def step_fn(group, lr, lag):
    # the backend is passed as the resolved module, so no import machinery runs in the graph
    functional_sadam(group["params"], group["grads"], group["exp_avgs"], group["exp_avg_sqs"],
                     group["max_exp_avg_sqs"], group["steps"], group["stats"],
                     scope_rows=group["scope_rows"], tensor_ids=group["tensor_ids"], lr=lr,
                     damping=2.0, probes=group["probes"], probe_lag=lag, probe_window=3,
                     backend=native)


@pytest.mark.parametrize("lag", [0, 1])
def test_fullgraph_compile_equals_eager_without_lr_recompiles(lag):
    torch._dynamo.reset()
    eager = make_group([(33,), (8, 5)], scope="tensor")
    compiled = clone(eager)
    counter = torch._dynamo.testing.CompileCounter()
    step = torch.compile(step_fn, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(0)
    lr = torch.tensor(1e-2)
    for i in range(5):
        new_grads(eager, gen)
        copy_grads(compiled, eager)
        lr.fill_(1e-2 / (i + 1))  # a scheduler: a Tensor lr changes without recompiling
        step_fn(eager, lr, lag)
        step(compiled, lr, lag)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for a, e in zip(compiled[name], eager[name]):
            assert torch.equal(a, e), name
    assert torch.equal(compiled["stats"], eager["stats"])
    assert counter.frame_count == 1


def test_inductor_compiles_the_step():
    """The default backend (inductor) functionalizes the in-place ops and still updates."""
    torch._dynamo.reset()
    eager = make_group([(17,)])
    compiled = clone(eager)
    new_grads(eager, torch.Generator().manual_seed(1))
    copy_grads(compiled, eager)
    step_fn(eager, 1e-2, 1)
    torch.compile(step_fn, fullgraph=True)(compiled, 1e-2, 1)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for a, e in zip(compiled[name], eager[name]):
            assert torch.equal(a, e), name
    assert torch.equal(compiled["stats"], eager["stats"])
