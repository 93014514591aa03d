"""``SAdam``: the torch.optim front-end (arguments, validation, state, backend dispatch)."""
import copy
import inspect
from collections import defaultdict

import torch
from torch.optim import Optimizer

from . import _layout as L
from . import backends
from ._saved_state import MOMENTS, convert_param_state
from ._validation import (TENSOR_HYPERPARAMETERS, normalize_group, validate_grad,
                          validate_group, validate_loss_groups, validate_param)
from .distributed import any_nonzero, is_dtensor, shard_params, to_local
from .distributed import zero
from .functional import sadam
from .loss_probe import LossProbe


class SAdam(Optimizer):
    r"""Singularity-aware Adam: AdamW whose step is damped by ``exp(-damping * rho)``.

    ``rho`` (the Local Geometric Instability, in [0, 1]) is the normalized variance of random
    directional derivatives: near 0 on a smooth, consistent descent, near 1 when the gradient
    chatters across a kink or is dominated by noise. With ``damping=0`` (or ``probe="off"``) the
    update is exactly :class:`torch.optim.AdamW`.

    Args:
        params: iterable of parameters or dicts defining param groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as in :class:`torch.optim.AdamW`
            (``lr``, ``betas``, ``weight_decay`` and ``damping`` may be 0-d tensors).
        damping: lambda of the damping factor ``gamma = exp(-damping * rho)``.
        probes: number k of random sign directions (1..32).
        probe: ``"gradient"`` (directional derivatives of the gradient, fused, no extra passes),
            ``"loss"`` (finite differences of the loss through the closure) or ``"off"``.
        probe_beta: EMA factor of the probe statistics.
        scope: ``"group"`` (one rho per param group) or ``"tensor"`` (one per parameter).
        probe_lag: 1 = the update of step t uses the statistics up to t-1 (one fused pass);
            0 = probe first, then update with this step's rho.
        probe_window: redraw the directions and reset the statistics every that many steps.
        probe_delta, probe_every, probe_estimator: loss probe settings (radius, cadence,
            ``"symmetric"`` central differences or the ``"directions"`` estimator).
        probe_rng: random-number state of loss probe evaluations: ``"replay"`` (the state of the
            evaluation that produced the gradients: dropout draws the same masks) or ``"fresh"``
            (each evaluation draws anew); ``None`` = ``"replay"`` for ``"symmetric"``,
            ``"fresh"`` for ``"directions"``.
        state_dtype: dtype of the moments (float32, or bfloat16 to halve their memory).
        seed: seed of the probe directions.
        backend: ``"auto" | "triton" | "cuda" | "cpu" | "torch"``.
        capturable: accepted for AdamW compatibility; every step is device-resident already.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 damping=1.0, probes=8, probe="gradient", probe_beta=0.9, scope="group",
                 probe_lag=1, probe_window=None, probe_delta=1e-2, probe_every=1,
                 probe_estimator="symmetric", state_dtype=torch.float32, seed=0, amsgrad=False,
                 maximize=False, backend="auto", capturable=False, probe_rng=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, damping=damping,
                        probes=probes, probe=probe, probe_beta=probe_beta, scope=scope,
                        probe_lag=probe_lag, probe_window=probe_window, probe_delta=probe_delta,
                        probe_every=probe_every, probe_estimator=probe_estimator,
                        state_dtype=state_dtype, seed=seed, amsgrad=amsgrad, maximize=maximize,
                        backend=backend, capturable=capturable, probe_rng=probe_rng)
        normalize_group(defaults)
        validate_group(dict(defaults, params=[]))
        self._backends = {}
        # each group's parameters as given, by id of the group dict: DeepSpeed replaces a group's
        # params and steps the groups one at a time in a one-group list
        self._declared_params = {}
        super().__init__(params, defaults)
        self._loss_probe = LossProbe(self)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._declared_params[id(group)] = list(group["params"])
        try:
            normalize_group(group)
            validate_group(group)
            validate_loss_groups(self.param_groups)
            for i, p in enumerate(group["params"]):
                validate_param(p, f"param {i} of group {len(self.param_groups) - 1}")
                # a backend that cannot run these parameters fails here, not halfway into a step
                self._backend(group["backend"], p.device)
                if group["probe"] == "loss" and is_dtensor(p):
                    raise ValueError("probe='loss' does not support sharded (DTensor) parameters "
                                     "(each rank would probe its own loss); use "
                                     "probe='gradient'")
        except (ValueError, backends.BackendUnavailable):
            self.param_groups.pop()
            del self._declared_params[id(group)]
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        # torch's Optimizer adds a "differentiable" default that SAdam does not have: without
        # this, it would appear in every group after a load, deepcopy or pickle
        self.defaults.pop("differentiable", None)
        # a state pickled by an earlier version lacks the options added since, in its defaults
        # as in its groups: they take the constructor's defaults
        for name, value in _constructor_defaults().items():
            self.defaults.setdefault(name, value)
        self.__dict__.setdefault("_backends", {})
        self.__dict__.setdefault("_loss_probe", LossProbe(self))
        self.__dict__.setdefault("_declared_params",
                                 {id(g): list(g["params"]) for g in self.param_groups})
        for group in self.param_groups:
            group.pop("differentiable", None)
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def _backend(self, name, device):
        """The backend module for ``name`` on ``device``, resolved once (at construction, so a
        compiled step never runs the resolution). Raises BackendUnavailable saying why."""
        impl = self._backends.get((name, device))
        if impl is None:
            impl = self._backends[(name, device)] = backends.resolve(name, device)
        return impl

    # ----------------------------------------------------------------------------------- state
    def _zero_declared(self, group, declared_as=None):
        """The parameters a group (or the group ``declared_as``) was declared with, if DeepSpeed
        ZeRO replaced them by its flat partitions (see :mod:`sadam.distributed.zero`); else
        None. A compiled step is never a ZeRO one (DeepSpeed runs the client optimizer eagerly),
        and dynamo before torch 2.14 cannot trace ``id()`` of a dict."""
        if torch.compiler.is_compiling():
            return None
        declared = self._declared_params.get(id(declared_as or group), [])
        return declared if zero.is_zero_managed(group["params"], declared) else None

    def _num_scopes(self, group, declared_as=None) -> int:
        """Rows of the statistics: one, or one per parameter as declared (frozen ones too)."""
        if group["scope"] == "group":
            return 1
        declared = self._zero_declared(group, declared_as)
        return len(declared if declared is not None else group["params"])

    def _stats_anchor(self, group):
        """The tensor whose state holds the group's statistics (None for an empty group)."""
        declared = self._zero_declared(group)
        if declared is None:
            return group["params"][0] if group["params"] else None
        return zero.stats_anchor(group["params"], declared)

    def _group_stats(self, group) -> torch.Tensor:
        """The group's probe statistics, kept in the state of its first parameter (under
        DeepSpeed ZeRO, its flat partition)."""
        anchor = self._stats_anchor(group)
        k = group["probes"]
        scopes = self._num_scopes(group)
        stats = self.state[anchor].get("probe_stats")
        if stats is None or stats.shape != (scopes, L.row_width(k)):
            stats = L.new_stats(scopes, k, anchor.device)
            self.state[anchor]["probe_stats"] = stats
        return stats

    def _init_param_state(self, p, group):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=group["state_dtype"],
                                                memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["state_dtype"],
                                                   memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=group["state_dtype"],
                                                       memory_format=torch.preserve_format)
        return state

    def _check_grads(self):
        """The pre-flight pass over EVERY group before any tensor is modified: bad gradients,
        parameters or state that no longer fit, hyperparameters set to tensors of another shape,
        a backend that cannot run the group's parameters, unsupported shardings (host-side checks
        of shapes, dtypes, devices and placements: no device value is read). Returns, per group,
        the :func:`shard_params` of its parameters with a gradient and the backend that runs
        them."""
        plans = []
        for gi, group in enumerate(self.param_groups):
            with_grad = []
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    where = f"param {j} of group {gi}"
                    validate_grad(p, where)
                    validate_param(p, where)  # e.g. module.double() after construction
                    self._check_state_fits(p, where)
                    with_grad.append(p)
            self._check_tensor_hyperparameters(group, gi)
            impl = self._group_backend(group, gi, with_grad) if with_grad else None
            plans.append((shard_params(with_grad, f"param group {gi}"), impl))
        return plans

    @staticmethod
    def _check_tensor_hyperparameters(group, gi):
        values = [(name, group[name]) for name in TENSOR_HYPERPARAMETERS]
        values += [(f"betas[{i}]", b) for i, b in enumerate(group["betas"])]
        for name, value in values:
            if isinstance(value, torch.Tensor) and value.dim() != 0:
                raise ValueError(f"{name} of param group {gi} is a tensor of shape "
                                 f"{tuple(value.shape)}; a tensor hyperparameter must be 0-d")

    def _group_backend(self, group, gi, with_grad):
        """The backend for the group's parameters with a gradient, checked to run all of them:
        the kernels take one device per group, the reference any mix."""
        impl = self._backend(group["backend"], with_grad[0].device)
        if impl.name == "torch":
            return impl
        devices = {p.device for p in with_grad} | {group["params"][0].device}
        if len(devices) > 1:
            raise ValueError(f"param group {gi} has parameters on {sorted(map(str, devices))}; "
                             f"backend {group['backend']!r} runs one device per group: put each "
                             "device's parameters in their own group, or use backend='torch'")
        return impl

    def _check_state_fits(self, p, where):
        for name, value in self.state.get(p, {}).items():
            if not isinstance(value, torch.Tensor):
                continue
            moved = value.device != p.device
            resized = name in MOMENTS and value.shape != p.shape
            if moved or resized:
                raise RuntimeError(
                    f"state {name!r} of {where} is a {tuple(value.shape)} tensor on "
                    f"{value.device}, the parameter a {tuple(p.shape)} one on {p.device}: the "
                    "parameter was moved or resized after the optimizer state was created. Move "
                    "the state with optimizer.load_state_dict(optimizer.state_dict()), or build "
                    "a new optimizer")

    # ------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss. Required with
                ``probe="loss"``; it may take a keyword ``backward`` (see the README).
        """
        if self._is_state_init_step(closure):
            self._init_state()
            return None
        loss_groups = [g for g in self.param_groups if g["probe"] == "loss"]
        if loss_groups and closure is None:
            raise RuntimeError("SAdam with probe='loss' needs a closure: call "
                               "optimizer.step(closure) with a closure that returns the loss")
        rng_before = self._loss_probe.capture_rng() if loss_groups else None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():  # the local shards it takes are updated in place
            plans = self._check_grads()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        with torch.no_grad():
            if loss_groups:
                self._loss_probe.run(loss_groups, closure, loss, rng_before, found_inf)
            for group, (group_shards, impl) in zip(self.param_groups, plans):
                self._step_group(group, group_shards, impl, grad_scale, found_inf)
        return loss

    def _is_state_init_step(self, closure) -> bool:
        """The step torch.distributed.checkpoint takes to create a fresh optimizer's state
        (``_init_optim_state``: no closure, every learning rate 0, every gradient zero).

        Taking it would count a step and a probe sample that no training made, so it only
        creates the state a first step would start from (zero moments, step 0, fresh statistics),
        and it needs no closure with ``probe="loss"``. Checked only while the state is empty.
        """
        if closure is not None or self.state or torch.compiler.is_compiling():
            return False
        for group in self.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.dim() != 0:
                return False  # not this step: _check_grads names the bad lr
            if (float(lr.detach()) if isinstance(lr, torch.Tensor) else lr) != 0:
                return False
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        return bool(grads) and not any_nonzero(grads)

    def _init_state(self):
        for group in self.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            for p in with_grad:
                self._init_param_state(p, group)
            if with_grad:
                self._group_stats(group)

    def _step_group(self, group, shards, impl, grad_scale, found_inf):
        declared = self._zero_declared(group)
        if declared is not None:
            self._step_zero_group(group, declared, impl, grad_scale, found_inf)
            return
        lists = defaultdict(list)
        for j, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self._init_param_state(p, group)
            lists["params"].append(p)
            lists["grads"].append(p.grad)
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_avg_sqs"].append(state["exp_avg_sq"])
            if group["amsgrad"]:
                lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            lists["state_steps"].append(state["step"])
            lists["scope_rows"].append(0 if group["scope"] == "group" else j)
            lists["tensor_ids"].append(j)
        if not lists["params"]:
            return
        # DTensor (FSDP2) parameters are stepped on their local shards; the offsets place each
        # shard's probe signs in the full tensor and the group sums the partial probe sums.
        lists["params"], offsets, process_group = shards
        self._run_group(group, lists, offsets, process_group, impl, grad_scale, found_inf)

    def _step_zero_group(self, group, declared, impl, grad_scale, found_inf):
        """DeepSpeed's fp32 partitions stepped fragment by fragment: true tensor ids and offsets,
        probe partials summed over the data-parallel group (see sadam.distributed.zero)."""
        params = group["params"]
        if not params or any(p.grad is None for p in params):
            return
        fragments, process_group = zero.fragments(params, declared)
        states = [self._init_param_state(p, group) for p in params]
        lists = defaultdict(list)
        for f in fragments:
            state = states[f.source]
            tensors = {"params": params[f.source], "grads": params[f.source].grad,
                       "exp_avgs": state["exp_avg"], "exp_avg_sqs": state["exp_avg_sq"]}
            if group["amsgrad"]:
                tensors["max_exp_avg_sqs"] = state["max_exp_avg_sq"]
            for name, tensor in tensors.items():
                lists[name].append(tensor.view(-1).narrow(0, f.start, f.numel))
            # a count per fragment (a backend advances each one); all equal, copied back below
            lists["state_steps"].append(state["step"].clone())
            lists["scope_rows"].append(0 if group["scope"] == "group" else f.index)
            lists["tensor_ids"].append(f.index)
        if not fragments:
            return
        self._run_group(group, lists, [f.offset for f in fragments], process_group, impl,
                        grad_scale, found_inf)
        for f, step in zip(fragments, lists["state_steps"]):
            states[f.source]["step"].copy_(step)

    def _run_group(self, group, lists, offsets, process_group, impl, grad_scale, found_inf):
        params = lists["params"]
        beta1, beta2 = group["betas"]
        sadam(params, *(to_local(lists[name]) for name in
                        ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")),
              lists["state_steps"], self._group_stats(group),
              scope_rows=lists["scope_rows"], tensor_ids=lists["tensor_ids"], offsets=offsets,
              process_group=process_group, lr=group["lr"],
              beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
              damping=group["damping"], amsgrad=group["amsgrad"], maximize=group["maximize"],
              probe=group["probe"], probes=group["probes"], probe_beta=group["probe_beta"],
              probe_lag=group["probe_lag"], probe_window=group["probe_window"],
              seed=group["seed"], grad_scale=grad_scale, found_inf=found_inf, backend=impl)

    # ------------------------------------------------------------------------------- reporting
    def _applied(self, column_of):
        out = []
        for group in self.param_groups:
            k = group["probes"]
            anchor = self._stats_anchor(group)
            stats = None if anchor is None else self.state.get(anchor, {}).get("probe_stats")
            if stats is None:  # no step yet (or an empty group): the values of fresh statistics
                device = "cpu" if anchor is None else anchor.device
                stats = L.new_stats(self._num_scopes(group), k, device)
            values = stats[:, column_of(k)].clone()
            out.append(values[0] if group["scope"] == "group" else values)
        return out

    def lgi(self):
        """The rho (Local Geometric Instability) the last step used, one entry per param group:
        a 0-d tensor for ``scope="group"``, one value per parameter for ``scope="tensor"``.
        Before the first step, and for a group without parameters, it is that of fresh
        statistics: 0 (``scope="group"``), or one 0 per parameter (an empty tensor for an
        empty group with ``scope="tensor"``)."""
        return self._applied(L.rho_applied_col)

    def damping_factors(self):
        """The gamma = exp(-damping * rho) the last step applied, shaped like :meth:`lgi` (1
        before the first step and for a group without parameters)."""
        return self._applied(L.gamma_applied_col)

    # ------------------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict):
        """Load a state from :meth:`state_dict`, as torch's ``Optimizer.load_state_dict`` does
        (hooks, ``param_names``), with every value checked before anything changes: the
        hyperparameters as at construction, each tensor of the state for dtype, shape and range
        (see ``sadam/_saved_state.py``). Tensors are converted to what a step uses: ``step`` to
        a 0-d fp32 tensor (a number from an older checkpoint is accepted), moments to the
        group's ``state_dtype``, probe statistics to fp32, all on the parameter's device. The
        ``backend`` of each group stays the one this optimizer was built with: the state does
        not depend on the backend that wrote it."""
        state_dict = state_dict.copy()  # shallow, as torch: a pre-hook may replace entries
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer "
                             f"{len(self.param_groups)}")
        id_map = {}
        group_of = {}
        new_groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} of the state_dict has {len(saved['params'])} "
                                 f"parameters, the optimizer's {len(group['params'])}")
            new_group = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
            new_group.pop("differentiable", None)  # written by earlier versions; not an option
            for key, value in self.defaults.items():
                new_group.setdefault(key, value)
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in new_group:
                new_group["param_names"] = group["param_names"]  # torch keeps the names it has
            new_group["backend"] = group["backend"]  # the state is the same on every backend
            normalize_group(new_group)
            validate_group(new_group)
            new_groups.append(new_group)
            id_map.update(zip(saved["params"], group["params"]))
            scopes = self._num_scopes(new_group, declared_as=group)
            group_of.update((key, (gi, new_group, scopes)) for key in saved["params"])

        new_state = defaultdict(dict)
        for key, values in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict has state for parameter {key!r}, which no param "
                                 "group lists")
            gi, group, scopes = group_of[key]
            new_state[id_map[key]] = convert_param_state(
                id_map[key], values, group, f"parameter {key!r} (param group {gi})", scopes)

        self._declared_params = {id(new): self._declared_params.get(id(old), list(old["params"]))
                                 for old, new in zip(self.param_groups, new_groups)}
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _constructor_defaults() -> dict:
    """SAdam's options with their default values, from the constructor's signature."""
    return {name: param.default
            for name, param in inspect.signature(SAdam.__init__).parameters.items()
            if param.default is not inspect.Parameter.empty}
