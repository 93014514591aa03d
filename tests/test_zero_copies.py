"""A param group whose ``params`` DeepSpeed replaced by whole fp32 copies, built by hand here.

DeepSpeed's stage-0 bf16 optimizer hands SAdam fp32 copies of a group's trainable parameters,
in order, in place of the parameters it was declared with (frozen ones left out). That layout
needs no DeepSpeed to build, so these tests run it in the test process: stepping the copies
must equal stepping the declared parameters themselves (the same tensor ids, frozen ones
included, and the same statistics rows), and GradScaler's ``grad_scale`` and ``found_inf``
must act on it as on any group. tests/test_deepspeed_zero.py runs the real engines.
"""
import pytest
import torch

from _unchanged import assert_unchanged, snapshot
from sadam import SAdam

STEPS = 4


def declared_params():
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(2, 2))]
    params[1].requires_grad_(False)  # frozen, between two trainable ones
    return params


def gradients(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(5, 3, generator=g), None, torch.randn(2, 2, generator=g)]


def with_copies(opt):
    """Replace the group's params by fp32 copies of its trainable ones, as DeepSpeed does."""
    group = opt.param_groups[0]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in group["params"] if p.requires_grad]
    group["params"] = copies
    return copies


def make(params, **kw):
    return SAdam(params, lr=1e-2, weight_decay=1e-2, damping=2.0, seed=5, backend="torch", **kw)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scope", ["tensor", "group"])
@pytest.mark.parametrize("lag", [0, 1])
def test_copies_step_like_the_declared_parameters(scope, lag, amsgrad):
    declared, twin = declared_params(), declared_params()
    plain = make(declared, scope=scope, probe_lag=lag, amsgrad=amsgrad)
    zero = make(twin, scope=scope, probe_lag=lag, amsgrad=amsgrad)
    copies = with_copies(zero)
    for step in range(STEPS):
        for p, q, g in zip(declared, [copies[0], None, copies[1]], gradients(step)):
            p.grad = None if g is None else g.clone()
            if q is not None:
                q.grad = g.clone()
        plain.step()
        zero.step()
        for a, b in zip(plain.lgi(), zero.lgi()):
            assert torch.equal(a, b)
    assert torch.equal(copies[0], declared[0]) and torch.equal(copies[1], declared[2])
    assert torch.equal(twin[1], declared[1])  # the frozen parameter is never touched
    if amsgrad:
        for c, p in zip(copies, (declared[0], declared[2])):
            assert torch.equal(zero.state[c]["max_exp_avg_sq"], plain.state[p]["max_exp_avg_sq"])
    rows = zero.lgi()[0]
    assert rows.shape == ((3,) if scope == "tensor" else ())
    if scope == "tensor":
        assert float(rows[1]) == 0.0 and float(rows[0]) > 0 and float(rows[2]) > 0


def _stepped_copies():
    """An SAdam over copies after two steps, the third step's gradients set."""
    opt = make(declared_params(), scope="tensor")
    copies = with_copies(opt)
    for step in range(3):
        for q, g in zip(copies, [g for g in gradients(step) if g is not None]):
            q.grad = g.clone()
        if step < 2:
            opt.step()
    return opt, copies


def test_grad_scale_unscales_the_copies_gradients():
    expected, expected_copies = _stepped_copies()
    expected.step()
    opt, copies = _stepped_copies()
    for q in copies:
        q.grad = q.grad * 8.0
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(0.0)
    opt.step()
    for a, b in zip(copies, expected_copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for a, b in zip(opt.lgi(), expected.lgi()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_found_inf_skips_the_copies_step_and_changes_nothing():
    opt, copies = _stepped_copies()
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    snap = snapshot(opt, copies)
    opt.step()
    assert_unchanged(opt, copies, snap)


def test_copies_of_a_lone_parameter_after_a_frozen_one_keep_its_declared_index():
    """One trainable parameter, declared second: its copy is still tensor 1, statistics row 1."""
    def params():
        torch.manual_seed(4)
        frozen, w = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 2))
        frozen.requires_grad_(False)
        return [frozen, w]
    declared, twin = params(), params()
    plain, zero = make(declared, scope="tensor"), make(twin, scope="tensor")
    (copy,) = with_copies(zero)
    for step in range(STEPS):
        declared[1].grad = gradients(step)[0][:4, :2].clone()
        copy.grad = declared[1].grad.clone()
        plain.step()
        zero.step()
    assert torch.equal(copy, declared[1])
    assert torch.equal(zero.lgi()[0], plain.lgi()[0]) and zero.lgi()[0].shape == (2,)


@pytest.mark.parametrize("edit", ["declared tensors without the frozen one", "one new tensor",
                                  "three new tensors"])
def test_a_group_edited_by_hand_steps_as_a_fresh_group_of_its_tensors(edit):
    """Not every group whose params differ from the declared ones is DeepSpeed's: tensors put
    in by hand, the declared ones among them or fewer or more than the trainable ones, step as
    a group declared with them would."""
    declared = declared_params()
    opt = make(declared, scope="tensor")
    if edit == "declared tensors without the frozen one":
        params = [declared[0], declared[2]]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    else:
        shapes = [(5, 3)] if edit == "one new tensor" else [(5, 3), (2, 2), (6,)]
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt.param_groups[0]["params"] = params
    fresh = make(twins, scope="tensor")
    for step in range(STEPS):
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
    assert torch.equal(opt.lgi()[0], fresh.lgi()[0]) and opt.lgi()[0].shape == (len(params),)


def test_a_frozen_group_emptied_by_deepspeed_keeps_a_row_per_declared_parameter():
    """DeepSpeed copies no parameter of a group whose parameters are all frozen: the group's
    statistics still have one row per declared parameter, as without DeepSpeed."""
    def params():
        frozen = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
        for p in frozen:
            p.requires_grad_(False)
        return frozen
    trained = torch.nn.Parameter(torch.randn(4))
    plain = make([{"params": params()}, {"params": [trained]}], scope="tensor")
    zero = make([{"params": params()}, {"params": [torch.nn.Parameter(trained.detach().clone())]}],
                scope="tensor")
    zero.param_groups[0]["params"] = []
    for opt in (plain, zero):
        opt.param_groups[1]["params"][0].grad = torch.ones(4)
        opt.step()
    for a, b in zip(plain.lgi(), zero.lgi()):
        assert a.shape == b.shape and torch.equal(a, b)
    assert zero.lgi()[0].shape == (2,)


def _two_steps_on_copies(opt):
    copies = with_copies(opt)
    for step in range(2):
        for q, g in zip(copies, [g for g in gradients(step) if g is not None]):
            q.grad = g.clone()
        opt.step()
    return copies


def test_a_state_dict_of_copies_loads_back_onto_copies():
    """DeepSpeed's checkpoint resume: the statistics saved with a row per declared parameter
    fit the group of copies they are loaded into, and the run goes on as if uninterrupted."""
    saved = make(declared_params(), scope="tensor")
    _two_steps_on_copies(saved)
    uninterrupted = make(declared_params(), scope="tensor")
    copies = _two_steps_on_copies(uninterrupted)
    resumed = make(declared_params(), scope="tensor")
    resumed_copies = with_copies(resumed)
    for q, c in zip(resumed_copies, copies):
        with torch.no_grad():
            q.copy_(c)
    resumed.load_state_dict(saved.state_dict())
    for opt, params in ((uninterrupted, copies), (resumed, resumed_copies)):
        for q, g in zip(params, [g for g in gradients(2) if g is not None]):
            q.grad = g.clone()
        opt.step()
    for a, b in zip(resumed_copies, copies):
        assert torch.equal(a, b)
    assert torch.equal(resumed.lgi()[0], uninterrupted.lgi()[0])


def test_a_group_appended_by_hand_keeps_its_declared_parameters_over_a_load():
    """A param group put into ``param_groups`` directly (not through add_param_group) counts
    its parameters at the first load_state_dict as the declared ones, so DeepSpeed's copies of
    them later step with their declared indices."""
    def build():
        opt = make([torch.nn.Parameter(torch.zeros(2))], scope="tensor")
        declared = declared_params()
        opt.param_groups.append(dict(opt.defaults, params=declared))
        opt.load_state_dict(opt.state_dict())
        return opt, declared
    zero, _ = build()
    plain, declared = build()
    del zero.param_groups[0], plain.param_groups[0]  # only the appended group steps
    copies = with_copies(zero)
    for step in range(STEPS):
        for p, q, g in zip(declared, [copies[0], None, copies[1]], gradients(step)):
            p.grad = None if g is None else g.clone()
            if q is not None:
                q.grad = g.clone()
        plain.step()
        zero.step()
    assert torch.equal(copies[0], declared[0]) and torch.equal(copies[1], declared[2])
    assert torch.equal(zero.lgi()[0], plain.lgi()[0]) and zero.lgi()[0].shape == (3,)


def test_a_step_before_the_copies_have_gradients_changes_nothing():
    """As for any parameter without a gradient: no state, no statistics, no change."""
    opt = make(declared_params(), scope="tensor")
    copies = with_copies(opt)
    before = [c.detach().clone() for c in copies]
    opt.step()
    assert all(torch.equal(c, b) for c, b in zip(copies, before))
    assert not opt.state and torch.equal(opt.lgi()[0], torch.zeros(3))


def test_a_trainable_parameter_without_elements_is_not_among_the_copies():
    """DeepSpeed copies only parameters with elements (``is_optimized_parameter``): a
    zero-element trainable parameter is left out like a frozen one, and the copies after it
    keep their declared indices."""
    def params():
        torch.manual_seed(6)
        return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.zeros(0)),
                torch.nn.Parameter(torch.randn(2, 2))]
    declared, twin = params(), params()
    plain, zero = make(declared, scope="tensor"), make(twin, scope="tensor")
    group = zero.param_groups[0]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in group["params"] if p.numel()]
    group["params"] = copies
    for step in range(STEPS):
        grads = gradients(step)
        declared[0].grad, declared[1].grad = grads[0].clone(), torch.zeros(0)
        declared[2].grad = grads[2].clone()
        copies[0].grad, copies[1].grad = grads[0].clone(), grads[2].clone()
        plain.step()
        zero.step()
    assert torch.equal(copies[0], declared[0]) and torch.equal(copies[1], declared[2])
    assert torch.equal(zero.lgi()[0], plain.lgi()[0]) and zero.lgi()[0].shape == (3,)


def test_a_group_appended_by_hand_steps_like_a_declared_group():
    """A param group put into ``param_groups`` directly, never loaded: torch's optimizers step
    it like any other, and so does SAdam (it is no DeepSpeed group)."""
    opt = make([torch.nn.Parameter(torch.zeros(2))], scope="tensor")
    appended, twins = declared_params(), declared_params()
    opt.param_groups.append(dict(opt.defaults, params=appended))
    declared = make(twins, scope="tensor")
    for step in range(STEPS):
        for p, q, g in zip(appended, twins, gradients(step)):
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        opt.step()
        declared.step()
    for p, q in zip(appended, twins):
        assert torch.equal(p, q)
    assert torch.equal(opt.lgi()[1], declared.lgi()[0])
