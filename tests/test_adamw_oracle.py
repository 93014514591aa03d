"""With damping=0 (or probe="off") SAdam is AdamW: torch.optim.AdamW is the oracle."""
import pytest
import torch

from sadam import SAdam

STEPS = 200
RTOL = 1e-5  # spec section 6 tolerance for params, m, v


def _models(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.ReLU(), torch.nn.Linear(17, 3))
    twin.load_state_dict(net.state_dict())
    return net, twin


def _train(net, opt, steps=STEPS, scheduler=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 13, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _max_rel(x, ref):
    """Max error relative to the reference tensor's magnitude (spec section 6)."""
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _assert_close(a, b, rtol=RTOL):
    for p, q in zip(a.parameters(), b.parameters()):
        assert _max_rel(p.detach(), q.detach()) <= rtol


CONFIGS = [
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=1e-2, weight_decay=0.1),
    dict(lr=3e-3, weight_decay=0.05, amsgrad=True),
    dict(lr=3e-3, weight_decay=0.01, maximize=True),
    dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("mode", [dict(damping=0.0), dict(probe="off", damping=1.0),
                                  dict(damping=0.0, probe_lag=0, scope="tensor")],
                         ids=["damping0", "probe-off", "damping0-lag0-tensor"])
def test_equals_adamw(cfg, mode):
    net, twin = _models()
    _train(net, torch.optim.AdamW(net.parameters(), **cfg))
    _train(twin, SAdam(twin.parameters(), backend="torch", **cfg, **mode))
    _assert_close(twin, net)


def test_moments_equal_adamw_state_on_a_fixed_gradient_sequence():
    """Hand-set gradients (no feedback through the model) isolate the update arithmetic."""
    torch.manual_seed(0)
    shapes = [(31, 7), (5,), (1,), (64, 3)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    ref = torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, weight_decay=0.1)
    opt = SAdam(ours, lr=1e-2, amsgrad=True, weight_decay=0.1, damping=0.0, backend="torch")
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p) * 3 + 0.5
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        assert _max_rel(p.detach(), q.detach()) <= RTOL
        a, b = ref.state[q], opt.state[p]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert _max_rel(b[key], a[key]) <= RTOL
        assert b["step"].dtype == torch.float32 and b["step"].dim() == 0
        assert b["step"].item() == STEPS


def test_two_param_groups_with_different_hyperparameters():
    net, twin = _models()

    def groups(model, **extra):
        w = [p for n, p in model.named_parameters() if n.endswith("weight")]
        b = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [dict(params=w, lr=1e-2, weight_decay=0.1, **extra),
                dict(params=b, lr=3e-3, weight_decay=0.0, betas=(0.5, 0.9), **extra)]

    _train(net, torch.optim.AdamW(groups(net)))
    _train(twin, SAdam(groups(twin, damping=0.0), backend="torch"))
    _assert_close(twin, net)


def test_tensor_lr_with_scheduler():
    net, twin = _models()
    ref = torch.optim.AdamW(net.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1)
    opt = SAdam(twin.parameters(), lr=torch.tensor(1e-2), weight_decay=0.1, damping=0.0,
                backend="torch")
    _train(net, ref, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=STEPS))
    _train(twin, opt, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    torch.testing.assert_close(opt.param_groups[0]["lr"], ref.param_groups[0]["lr"])
    _assert_close(twin, net)


def test_bf16_params_round_like_the_fp32_result():
    """bf16 parameters get the fp32 update rounded to nearest even (one rounding per step)."""
    torch.manual_seed(0)
    p32 = torch.randn(257)
    p16 = torch.nn.Parameter(p32.to(torch.bfloat16))
    mirror = torch.nn.Parameter(p16.detach().float())
    opt = SAdam([p16], lr=1e-2, damping=0.0, backend="torch")
    ref = torch.optim.AdamW([mirror], lr=1e-2)
    for _ in range(5):
        g = torch.randn(257)
        p16.grad, mirror.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        opt.step()
        ref.step()
        torch.testing.assert_close(p16.detach(), mirror.detach().to(torch.bfloat16), rtol=0,
                                   atol=0)
        mirror.data.copy_(p16.float())  # the next AdamW step starts from the rounded value
    assert opt.state[p16]["exp_avg"].dtype == torch.float32


def test_step_returns_none_without_a_closure_and_the_closures_loss_with_one():
    net, twin = _models()
    ref = torch.optim.AdamW(net.parameters(), lr=1e-2)
    opt = SAdam(twin.parameters(), lr=1e-2, damping=0.0, backend="torch")
    x = torch.randn(4, 13)
    for model in (net, twin):
        model(x).sum().backward()
    assert ref.step() is None
    assert opt.step() is None
    for o, model in ((ref, net), (opt, twin)):
        def closure(o=o, model=model):
            o.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss
        loss = o.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.requires_grad
    _assert_close(twin, net)


def test_a_first_step_at_lr_0_from_zero_gradients_with_a_closure_is_a_step_like_adamws():
    """Distributed checkpoint's state-creating step (lr 0, zero gradients) takes no closure; with
    one it is training: the closure runs once, its loss comes back and the step counts."""
    net, twin = _models()
    ref = torch.optim.AdamW(net.parameters(), lr=0.0)
    opt = SAdam(twin.parameters(), lr=0.0, backend="torch")
    x = torch.randn(4, 13)
    losses, calls = [], []
    for o, model in ((ref, net), (opt, twin)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

        def closure(o=o, model=model):
            calls.append(o)
            o.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss
        losses.append(o.step(closure))
    assert calls == [ref, opt]
    assert torch.equal(losses[1], losses[0])
    for p, q in zip(twin.parameters(), net.parameters()):
        a, b = ref.state[q], opt.state[p]
        assert b["step"].item() == a["step"].item() == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert _max_rel(b[key], a[key]) <= RTOL


def test_the_arguments_adamw_also_takes_default_to_adamws_values():
    """A drop-in swap keeps every AdamW argument it did not pass at AdamW's default."""
    ours = SAdam([torch.nn.Parameter(torch.zeros(2))], backend="torch").defaults
    theirs = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]).defaults
    shared = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable")
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
