"""A snapshot of an optimizer and its parameters, and the check that nothing in it changed (what a
rejected call must leave behind)."""
import copy

import torch


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, params, snap):
    before, sd = snap
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert v.dtype == now["state"][k][key].dtype and torch.equal(now["state"][k][key], v)
