"""``probe="loss"``: rho from finite differences of the loss along random directions.

Every ``probe_every`` steps, before the update, the closure is evaluated at ``theta +- h u_i``
(``"symmetric"``: sign directions over all loss groups together, one rho for them) or at
``theta_t + delta u_{i,t}`` for each tensor t (``"directions"``: per-tensor unit Gaussian
directions, one rho per param group, like the authors' code). Random-number state: ``"replay"``
evaluates every probe under the state of the loss evaluation that produced the gradients (dropout
draws the same masks); ``"fresh"`` lets every probe evaluation draw anew. Either way the state
continues afterwards as if no probe had run. Buffers of every module that runs during a probe
evaluation (batch-norm running statistics) are restored after it. Parameters are restored
bit-exactly from a copy. A probing with a non-finite loss leaves the statistics as they were.
Peak extra memory: one copy of the probed parameters, plus the directions of one probing (all k
at once: one byte per element and probe for the sign directions of ``"symmetric"``, four for the
Gaussian directions of the group ``"directions"`` probes), plus one copy of the gradients when the
closure does not take ``backward``.
"""
import inspect
import math

import torch

from . import _layout as L
from ._loss_directions import gaussian_directions, sign_directions


def _as_float(loss) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _displace(params, backup, directions, alpha):
    """``p = base + alpha * direction`` for every tensor, rounded once to p's dtype (two
    multi-tensor ops, whatever the number of tensors)."""
    torch._foreach_copy_(params, backup)
    torch._foreach_add_(params, directions, alpha=alpha)


class _ModuleBuffers:
    """While active, saves the buffers of every module whose forward runs (at its first call);
    :meth:`restore` puts them back, and so does leaving the block.

    A global forward pre-hook finds the modules, so no module has to be named: batch-norm
    running statistics stay where they were whatever the closure looks like. Buffers changed
    outside a module call (a functional batch_norm on tensors held elsewhere) are not seen.
    """

    def __enter__(self):
        self._saved = {}
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._save)
        return self

    def _save(self, module, args):
        if id(module) not in self._saved:
            self._saved[id(module)] = [(b, b.detach().clone())
                                       for b in module.buffers(recurse=False)]

    def restore(self):
        with torch.no_grad():
            for buffers in self._saved.values():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

    def __exit__(self, *exc):
        self._handle.remove()
        self.restore()
        return False


class _Evaluator:
    """Probe evaluations of the loss, as floats, leaving gradients, buffers and (in ``replay``)
    the random-number state as the first evaluation left them."""

    def __init__(self, optimizer, closure, rng_before, replay, buffers):
        self.closure = closure
        self.rng_before = rng_before if replay else None
        self.keyword = "backward" in inspect.signature(closure).parameters
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.buffers = buffers

    def __call__(self) -> float:
        if self.rng_before is not None:
            LossProbe.restore_rng(self.rng_before)
        try:
            if self.keyword:
                with torch.no_grad():
                    return _as_float(self.closure(backward=False))
            saved = [None if p.grad is None else p.grad.clone() for p in self.params]
            with torch.enable_grad():
                value = _as_float(self.closure())
            for p, g in zip(self.params, saved):
                p.grad = g
            return value
        finally:
            self.buffers.restore()


class LossProbe:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    @staticmethod
    def capture_rng():
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def restore_rng(state):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    # ------------------------------------------------------------------------------ estimators
    @staticmethod
    def _symmetric(probed, backup, f0, g, probing, evaluate):
        """Central differences along sign directions over all probed tensors; ``None`` when a
        probe loss is not finite."""
        k = g["probes"]
        n = sum(p.numel() for _, _, p in probed)
        norm = math.sqrt(sum(float(b.float().pow(2).sum()) for b in backup))
        h = g["probe_delta"] * max(norm, 1.0)
        scale = h / math.sqrt(n)
        params = [p for _, _, p in probed]
        signs = [sign_directions(p, k, seed=g["seed"], group_index=gi, tensor_index=j,
                                 probing=probing).view(k, *p.shape) for gi, j, p in probed]
        var_sum = mean_sq_sum = 0.0
        for i in range(k):
            side = []
            for sign in (+1.0, -1.0):
                _displace(params, backup, [s[i] for s in signs], sign * scale)
                side.append((evaluate() - f0) / h)
            dp, dm = side
            if not (math.isfinite(dp) and math.isfinite(dm)):
                return None
            var_sum += ((dp + dm) / 2) ** 2
            mean_sq_sum += ((dp - dm) / 2) ** 2
        return var_sum / (var_sum + mean_sq_sum + 1e-30)

    @staticmethod
    def _directions(probed, backup, f0, g, probing, evaluate):
        """The authors' estimator over one param group: each tensor moved by ``delta`` along its
        own unit Gaussian direction, one-sided differences, unbiased variance over mean square,
        clipped to [0, 10]; ``None`` when a probe loss is not finite."""
        k, delta = g["probes"], g["probe_delta"]
        params = [p for _, _, p in probed]
        directions = [gaussian_directions(p, k, seed=g["seed"], group_index=gi, tensor_index=j,
                                          probing=probing).view(k, *p.shape)
                      for gi, j, p in probed]
        values = []
        for i in range(k):
            _displace(params, backup, [d[i] for d in directions], delta)
            values.append((evaluate() - f0) / delta)
            if not math.isfinite(values[-1]):
                return None
        mean = sum(values) / k
        variance = sum((x - mean) ** 2 for x in values) / (k - 1)
        mean_square = sum(x * x for x in values) / k
        return min(max(variance / (mean_square + 1e-6), 0.0), 10.0)

    # ------------------------------------------------------------------------------------- run
    def run(self, groups, closure, loss, rng_before, found_inf):
        """Probe if due, then record the rho the coming update applies in every loss group."""
        if found_inf is not None and float(found_inf) > 0:
            return  # a skipped step changes nothing, the probe statistics included
        opt = self.optimizer
        g = groups[0]
        k = g["probes"]
        stats = [opt._group_stats(group) for group in groups]
        steps_taken = int(stats[0][0, L.epoch_col(k)])
        if steps_taken % g["probe_every"] == 0:
            rhos = self._probe(groups, closure, loss, rng_before, steps_taken // g["probe_every"])
            for s, rho in zip(stats, rhos):
                if rho is None:
                    continue  # a non-finite probe loss: the statistics stay as they were
                s[0, L.count_col(k)] += 1
                if g["probe_estimator"] == "symmetric":  # EMA over probings, bias-corrected
                    s[0, 0] = g["probe_beta"] * s[0, 0] + (1 - g["probe_beta"]) * rho
                    s[0, L.rho_col(k)] = s[0, 0] / (1 - g["probe_beta"] ** s[0, L.count_col(k)])
                else:
                    s[0, L.rho_col(k)] = rho
        for group, s in zip(groups, stats):
            s[0, L.epoch_col(k)] += 1
            s[0, L.rho_applied_col(k)] = s[0, L.rho_col(k)]
            damping = torch.as_tensor(group["damping"], dtype=torch.float32, device=s.device)
            s[0, L.gamma_applied_col(k)] = torch.exp(-damping * s[0, L.rho_col(k)])

    def _probe(self, groups, closure, loss, rng_before, probing):
        """One rho (or ``None``: not finite) per loss group."""
        if loss is None:
            raise RuntimeError("probe='loss' needs the closure to return the loss")
        f0 = _as_float(loss)
        g = groups[0]
        if not math.isfinite(f0):
            return [None] * len(groups)
        index = {id(group): gi for gi, group in enumerate(self.optimizer.param_groups)}
        probed = [[(index[id(group)], j, p) for j, p in enumerate(group["params"])
                   if p.grad is not None and p.numel() > 0] for group in groups]
        rng = g["probe_rng"] or ("replay" if g["probe_estimator"] == "symmetric" else "fresh")
        rng_after = self.capture_rng()
        everything = [t for tensors in probed for t in tensors]
        backup = {id(p): p.detach().clone() for _, _, p in everything}
        try:
            with _ModuleBuffers() as buffers:
                evaluate = _Evaluator(self.optimizer, closure, rng_before, rng == "replay",
                                      buffers)
                if g["probe_estimator"] == "symmetric":
                    return [self._symmetric(everything, [backup[id(p)] for _, _, p in everything],
                                            f0, g, probing, evaluate) if everything else 0.0
                            ] * len(groups)
                rhos = []
                for tensors in probed:  # one rho per group, each probed alone
                    rhos.append(self._directions(tensors, [backup[id(p)] for _, _, p in tensors],
                                                 f0, g, probing, evaluate) if tensors else 0.0)
                    for _, _, p in tensors:
                        p.copy_(backup[id(p)])
                return rhos
        finally:
            for _, _, p in everything:
                p.copy_(backup[id(p)])
            self.restore_rng(rng_after)


class preserve_buffers:
    """Context manager that restores every buffer of ``module`` on exit.

    The loss probe already restores the buffers of every module that runs during a probe
    evaluation; this helper is for other evaluations that must not move batch-norm running
    statistics (a validation pass in train mode, for example)::

        with sadam.preserve_buffers(model):
            loss = loss_fn(model(x), y)
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self._saved = [(b, b.detach().clone()) for b in self.module.buffers()]
        return self.module

    def __exit__(self, *exc):
        with torch.no_grad():
            for buffer, saved in self._saved:
                buffer.copy_(saved)
        return False
