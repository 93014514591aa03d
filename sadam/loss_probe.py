"""``probe="loss"``: rho from finite differences of the loss along random sign directions.

Every ``probe_every`` steps, before the update, the closure is evaluated at ``theta +- h u_i``
(``"symmetric"``) or ``theta + delta u_i`` (``"directions"``), with the random-number state of the
loss evaluation that produced the gradients replayed, so dropout draws the same masks. Parameters
are restored bit-exactly from a copy afterwards; the random-number state continues as if no probe
had run. Peak extra memory: one copy of the probed parameters (plus one of the gradients when the
closure does not take ``backward``).
"""
import inspect
import math

import torch

from . import _layout as L
from ._hash import probe_bits, signs_from_bits


def _as_float(loss) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


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

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, closure, rng_before):
        """One probe evaluation of the loss, as a float, leaving every gradient as it was."""
        self.restore_rng(rng_before)
        if "backward" in inspect.signature(closure).parameters:
            with torch.no_grad():
                return _as_float(closure(backward=False))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        with torch.enable_grad():
            value = _as_float(closure())
        for p, g in zip(params, saved):
            p.grad = g
        return value

    @staticmethod
    def _signs(p, j, probe_index, epoch, seed):
        bits = probe_bits(p.numel(), tensor_id=j, epoch=epoch, seed=seed, device=p.device)
        return signs_from_bits(bits >> probe_index, 1).reshape(p.shape)

    def _at_displacement(self, probed, backup, scales, i, sign, epoch, seed, closure, rng_before):
        for (j, p), b, scale in zip(probed, backup, scales):
            p.copy_(b.float() + (sign * scale) * self._signs(p, j, i, epoch, seed))
        return self._evaluate(closure, rng_before)

    # ------------------------------------------------------------------------------ estimators
    def _symmetric(self, probed, backup, f0, g, epoch, closure, rng_before):
        n = sum(p.numel() for _, p in probed)
        norm = math.sqrt(sum(float(b.float().pow(2).sum()) for b in backup))
        h = g["probe_delta"] * max(norm, 1.0)
        scales = [h / math.sqrt(n)] * len(probed)
        var_sum = mean_sq_sum = 0.0
        for i in range(g["probes"]):
            fp = self._at_displacement(probed, backup, scales, i, +1, epoch, g["seed"], closure,
                                       rng_before)
            fm = self._at_displacement(probed, backup, scales, i, -1, epoch, g["seed"], closure,
                                       rng_before)
            dp, dm = (fp - f0) / h, (fm - f0) / h
            var_sum += ((dp + dm) / 2) ** 2
            mean_sq_sum += ((dp - dm) / 2) ** 2
        return var_sum / (var_sum + mean_sq_sum + 1e-30)

    def _directions(self, probed, backup, f0, g, epoch, closure, rng_before):
        delta = g["probe_delta"]
        scales = [delta / math.sqrt(p.numel()) for _, p in probed]
        values = []
        for i in range(g["probes"]):
            f = self._at_displacement(probed, backup, scales, i, +1, epoch, g["seed"], closure,
                                      rng_before)
            values.append((f - f0) / delta)
        k = len(values)
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
            rho = self._probe(groups, closure, loss, rng_before, int(stats[0][0, L.count_col(k)]))
            for s in stats:
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

    def _probe(self, groups, closure, loss, rng_before, epoch):
        if loss is None:
            raise RuntimeError("probe='loss' needs the closure to return the loss")
        f0 = _as_float(loss)
        probed = [(j, p) for group in groups for j, p in enumerate(group["params"])
                  if p.grad is not None]
        if not probed:
            return 0.0
        rng_after = self.capture_rng()
        backup = [p.detach().clone() for _, p in probed]
        estimator = self._symmetric if groups[0]["probe_estimator"] == "symmetric" else \
            self._directions
        try:
            return estimator(probed, backup, f0, groups[0], epoch, closure, rng_before)
        finally:
            for (_, p), b in zip(probed, backup):
                p.copy_(b)
            self.restore_rng(rng_after)


class preserve_buffers:
    """Context manager that restores every buffer of ``module`` on exit.

    Use it around probe evaluations in a closure so that batch-norm running statistics do not
    move when the loss probe evaluates the model::

        def closure(backward=True):
            if not backward:
                with sadam.preserve_buffers(model):
                    return loss_fn(model(x), y)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
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
