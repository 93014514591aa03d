"""torch.compile: the optimizer step traces as one graph, and a scheduler's Tensor lr does not
make it recompile. Dynamo's frame counter is the oracle (a graph break adds a frame, a recompile
adds a frame); the compiled run must equal the eager one."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import sadam

STEPS = 6


def _setup(compiled_model: bool):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = sadam.SAdam(model.parameters(), lr=torch.tensor(0.02), damping=1.0,
                      weight_decay=torch.tensor(0.01), backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.8 ** step)
    forward = torch.compile(model, backend="eager") if compiled_model else model
    return model, opt, sched, forward


def _train(model, opt, sched, forward, step_fn):
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.linspace(-1, 1, 16)
    lrs = []
    for _ in range(STEPS):
        # grads keep their storage: a compiled step guards on the gradient tensors
        opt.zero_grad(set_to_none=False)
        (forward(x).squeeze(1) - y).abs().mean().backward()
        step_fn()
        sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    return lrs


# The scheduler wraps the instance's step to count calls; the compiled function calls the class's
# step directly, so the scheduler believes step() was never called.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_compiled_step_has_no_graph_break_and_no_recompile_when_lr_changes():
    torch._dynamo.reset()
    counter = CompileCounter()
    model, opt, sched, forward = _setup(compiled_model=True)
    step_fn = torch.compile(lambda: sadam.SAdam.step(opt), fullgraph=True, backend=counter)
    lrs = _train(model, opt, sched, forward, step_fn)
    assert len(set(lrs)) == STEPS  # the lr really changed every step
    # one graph for the first step (it creates the state), one for every later step
    assert counter.frame_count == 2
    assert counter.op_count > 0

    eager_model, eager_opt, eager_sched, eager_forward = _setup(compiled_model=False)
    _train(eager_model, eager_opt, eager_sched, eager_forward, eager_opt.step)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.lgi()[0], eager_opt.lgi()[0], rtol=0, atol=1e-6)
    assert float(opt.lgi()[0]) > 0  # the probe really ran inside the graph


def test_compiled_step_with_scheduler_wrapper_compiles_the_optimizer_frame_once():
    """The torch recipe: compile a function calling opt.step() and sched.step(). The scheduler's
    wrapper is skipped by dynamo; the optimizer's own frame is compiled, once for the first step
    and once for the rest, whatever lr the scheduler sets."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model, opt, sched, forward = _setup(compiled_model=False)

    @torch.compile(backend=counter)
    def step_and_schedule():
        opt.step()
        sched.step()

    x, y = torch.randn(16, 4), torch.randn(16)
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=False)
        (forward(x).squeeze(1) - y).abs().mean().backward()
        step_and_schedule()
    frames_after_warmup = counter.frame_count
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        (forward(x).squeeze(1) - y).abs().mean().backward()
        step_and_schedule()
    assert counter.frame_count == frames_after_warmup
    assert opt.state[next(model.parameters())]["step"] == STEPS + 3

