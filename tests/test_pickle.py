"""Copies of an optimizer, as torch's optimizers support them: ``copy.deepcopy`` and pickle give
an SAdam that steps exactly like the original, and a pickled state of an earlier version (a param
group without an option added since) gets the option's default."""
import copy
import pickle

import pytest
import torch

from sadam import SAdam

MODES = {"gradient": dict(probe="gradient", scope="tensor"),
         "loss": dict(probe="loss", probes=3)}
COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _train(model, opt, steps, start):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x, y = torch.randn(12, 6, generator=gen), torch.randn(12, 2, generator=gen)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def _assert_same_run(model, opt, other_model, other_opt):
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
    for a, b in zip(opt.lgi(), other_opt.lgi()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("mode", list(MODES))
def test_a_copy_of_a_used_optimizer_steps_exactly_like_the_original(mode, how):
    """Copied together with its model (so that the copy holds the copied model's parameters),
    an optimizer part-way through training continues bit-identically: moments, step counts,
    probe statistics and, with ``probe="loss"``, the loss probe all work in the copy."""
    model = _model()
    opt = SAdam(model.parameters(), lr=1e-2, backend="torch", **MODES[mode])
    _train(model, opt, 3, 0)
    copied_model, copied = COPIES[how]((model, opt))
    assert all(p is q for p, q in zip(copied.param_groups[0]["params"],
                                      copied_model.parameters()))
    _train(model, opt, 3, 3)
    _train(copied_model, copied, 3, 3)
    _assert_same_run(model, opt, copied_model, copied)


def test_a_pickled_state_without_newer_group_options_gets_their_defaults():
    """A param group pickled by an earlier version lacks the options added since (here the loss
    probe's): unpickling fills them in from the optimizer's defaults, as torch's optimizers'
    ``__setstate__`` does, leaves out the ``differentiable`` flag torch adds (not an SAdam
    option), and the optimizer then steps exactly as the one that was pickled."""
    model = _model()
    opt = SAdam(model.parameters(), lr=1e-2, backend="torch", **MODES["loss"])
    _train(model, opt, 2, 0)
    old_model, old_opt = copy.deepcopy((model, opt))
    state = old_opt.__getstate__()
    newer = ("probe_delta", "probe_every", "probe_estimator", "probe_rng")
    for key in newer:
        del state["param_groups"][0][key]
    state["defaults"]["differentiable"] = False
    restored = SAdam.__new__(SAdam)
    restored.__setstate__(state)
    expected = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    assert {k: v for k, v in restored.param_groups[0].items() if k != "params"} == expected
    assert "differentiable" not in restored.defaults
    _train(model, opt, 3, 2)
    _train(old_model, restored, 3, 2)
    _assert_same_run(model, opt, old_model, restored)


def test_a_copy_keeps_the_parameters_its_groups_were_declared_with():
    """DeepSpeed's bf16 optimizer at ZeRO stage 0 replaces a group's ``params`` by fp32 copies of
    its trainable parameters (frozen ones left out), and SAdam steps each copy with the index it
    was declared with (its tensor id in the probe hash, its statistics row). A copied optimizer
    knows the parameters its groups were declared with too: after the same replacement it steps
    exactly like the original."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3), requires_grad=False),
              torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = SAdam(params, lr=1e-2, scope="tensor", backend="torch")
    optimizers = [opt] + [copy_of(opt) for copy_of in COPIES.values()]
    for o in optimizers:
        group = o.param_groups[0]
        group["params"] = [p.detach().clone().requires_grad_() for p in group["params"][1:]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in params[1:]]
        for o in optimizers:
            for p, g in zip(o.param_groups[0]["params"], grads):
                p.grad = g.clone()
            o.step()
    assert opt.lgi()[0].shape == (3,)  # one statistics row per declared parameter
    for other in optimizers[1:]:
        for p, q in zip(opt.param_groups[0]["params"], other.param_groups[0]["params"]):
            assert torch.equal(p, q)
        assert torch.equal(opt.lgi()[0], other.lgi()[0])


def test_an_older_pickle_gets_the_constructors_defaults_and_loses_differentiable():
    """An earlier version's pickle lacks the newer options in its defaults too, and may carry
    ``differentiable`` in its groups: the options take the constructor's defaults (those of a
    fresh SAdam) and the flag is dropped."""
    model = _model()
    opt = SAdam(model.parameters(), lr=1e-2, backend="torch", **MODES["loss"])
    state = copy.deepcopy(opt).__getstate__()
    newer = ("probe_delta", "probe_every", "probe_estimator", "probe_rng")
    for key in newer:
        del state["param_groups"][0][key]
        del state["defaults"][key]
    state["param_groups"][0]["differentiable"] = False
    restored = SAdam.__new__(SAdam)
    restored.__setstate__(state)
    fresh = SAdam(model.parameters(), lr=1e-2, backend="torch", **MODES["loss"])
    for key in newer:
        assert restored.defaults[key] == fresh.defaults[key]
        assert restored.param_groups[0][key] == fresh.param_groups[0][key]
    assert set(restored.param_groups[0]) == set(fresh.param_groups[0])
