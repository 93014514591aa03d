"""S-Adam against a float64 oracle written here from the spec's formulas (sections 1-3), not from
the package: the update with damping and weight decay, amsgrad, both probe lags, the probe
statistics with their bias correction from the first sample on, and rho / gamma as reported.

Nothing here calls sadam's math: the probe signs come from the spec's hash written in Python
integers, the statistics and the update from the formulas, all in float64. Every backend runs the
same trajectory (a recorded skip where one cannot run).
"""

import pytest
import torch

import _backends
import sadam
from sadam import _layout as L

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------ the oracle
def spec_signs(numel, probes, tensor_id, epoch, seed, offset=0):
    """Spec section 2: s_i(e) = +1 if bit i of the element's hash is set, else -1; ``offset`` is
    the global index of the first element (a shard of a larger tensor)."""
    key = (seed ^ ((0x9E3779B9 * (epoch + 1)) & M32) ^ ((0x85EBCA6B * (tensor_id + 1)) & M32)) & M32
    rows = []
    for e in range(offset, offset + numel):
        x = (e & M32) ^ key
        x = (x ^ (((e >> 32) * 0xC2B2AE35) & M32)) & M32
        x ^= x >> 16
        x = (x * 0x85EBCA6B) & M32
        x ^= x >> 13
        x = (x * 0xC2B2AE35) & M32
        x ^= x >> 16
        rows.append([1.0 if (x >> i) & 1 else -1.0 for i in range(probes)])
    return torch.tensor(rows, dtype=torch.float64).T.reshape(probes, numel)


class Oracle:
    """One param group stepped in float64 by the spec's formulas."""

    def __init__(self, params, *, lr, betas, eps, weight_decay, damping, probes, probe_beta,
                 scope, probe_lag, amsgrad, maximize, seed, offsets=None):
        self.p = [p.detach().double().clone() for p in params]
        self.m = [torch.zeros_like(p) for p in self.p]
        self.v = [torch.zeros_like(p) for p in self.p]
        self.vmax = [torch.zeros_like(p) for p in self.p]
        self.t = 0
        self.hp = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay,
                       damping=damping, k=probes, beta=probe_beta, lag=probe_lag,
                       amsgrad=amsgrad, maximize=maximize, seed=seed)
        self.rows = [0] * len(params) if scope == "group" else list(range(len(params)))
        n_rows = max(self.rows) + 1
        self.a = torch.zeros(n_rows, probes, dtype=torch.float64)
        self.b = torch.zeros(n_rows, probes, dtype=torch.float64)
        self.count = 0
        self.rho = torch.zeros(n_rows, dtype=torch.float64)
        self.rho_applied = torch.zeros(n_rows, dtype=torch.float64)
        offsets = offsets or [0] * len(self.p)
        self.signs = [spec_signs(p.numel(), probes, j, 0, seed, offsets[j])
                      for j, p in enumerate(self.p)]

    def _statistics(self, grads):
        h = self.hp
        d = torch.zeros_like(self.a)
        for j, g in enumerate(grads):
            d[self.rows[j]] += self.signs[j] @ g.reshape(-1)
        self.count += 1
        self.a = h["beta"] * self.a + (1 - h["beta"]) * d
        self.b = h["beta"] * self.b + (1 - h["beta"]) * d * d
        corr = 1 - h["beta"] ** self.count
        A, B = self.a / corr, self.b / corr
        ratio = torch.where(B > 0, (B - A * A).clamp_min(0) / B.clamp_min(1e-300),
                            torch.zeros_like(B))
        if self.count >= 2:  # one sample has no variance: the previous rho is kept
            self.rho = ratio.mean(1)

    def step(self, grads, grad_scale=1.0):
        h = self.hp
        grads = [(-g if h["maximize"] else g).double() / grad_scale for g in grads]
        self.t += 1
        if h["lag"] == 0:
            self._statistics(grads)
        self.rho_applied = self.rho.clone()
        gamma = torch.exp(-h["damping"] * self.rho)
        for j, g in enumerate(grads):
            self.m[j] = h["b1"] * self.m[j] + (1 - h["b1"]) * g
            self.v[j] = h["b2"] * self.v[j] + (1 - h["b2"]) * g * g
            self.vmax[j] = torch.maximum(self.vmax[j], self.v[j])
            v = self.vmax[j] if h["amsgrad"] else self.v[j]
            m_hat = self.m[j] / (1 - h["b1"] ** self.t)
            v_hat = v / (1 - h["b2"] ** self.t)
            self.p[j] = self.p[j] * (1 - h["lr"] * h["wd"])  # weight decay is not damped
            self.p[j] = self.p[j] - h["lr"] * gamma[self.rows[j]] * m_hat / (v_hat.sqrt() + h["eps"])
        if h["lag"] == 1:
            self._statistics(grads)

    def gamma_applied(self):
        return torch.exp(-self.hp["damping"] * self.rho_applied)


# ------------------------------------------------------------------------------ comparison
SHAPES = [(3, 4), (5,), (2, 3)]
HYPER = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.2, damping=3.0, probes=6,
             probe_beta=0.7, seed=11)


def _gradients(step, shapes):
    """A drift plus noise (rho moves off 0 and 1), one sign-flipping coordinate (a kink)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for s in shapes:
        g = 0.4 + torch.randn(s, generator=gen)
        g.view(-1)[0] = (-1.0) ** step * 2.0
        out.append(g)
    return out


def _initial():
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _rel(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _assert_state(opt, params, oracle, step):
    """Params, moments, step, rho / gamma (reported and internal) against the oracle."""
    amsgrad = opt.param_groups[0]["amsgrad"]
    for j, p in enumerate(params):
        st = opt.state[p]
        assert _rel(p, oracle.p[j]) < 2e-6, (step, j, "param")
        assert _rel(st["exp_avg"], oracle.m[j]) < 2e-6, (step, j, "exp_avg")
        assert _rel(st["exp_avg_sq"], oracle.v[j]) < 2e-6, (step, j, "exp_avg_sq")
        if amsgrad:
            assert _rel(st["max_exp_avg_sq"], oracle.vmax[j]) < 2e-6, (step, j, "max_exp_avg_sq")
        assert float(st["step"]) == step
    k = opt.param_groups[0]["probes"]
    stats = opt.state[params[0]]["probe_stats"].double().cpu()
    assert float((stats[:, L.rho_col(k)] - oracle.rho).abs().max()) < 1e-5, (step, "rho")
    lgi = opt.lgi()[0].double().cpu().reshape(-1)
    gamma = opt.damping_factors()[0].double().cpu().reshape(-1)
    assert float((lgi - oracle.rho_applied).abs().max()) < 1e-5, (step, "lgi")
    assert float((gamma - oracle.gamma_applied()).abs().max()) < 1e-5, (step, "gamma")
    assert torch.equal(stats[:, L.count_col(k)], torch.full_like(stats[:, 0], oracle.count))


CONFIGS = {
    "lag1-group": dict(probe_lag=1, scope="group"),
    "lag0-group": dict(probe_lag=0, scope="group"),
    "lag1-tensor-amsgrad": dict(probe_lag=1, scope="tensor", amsgrad=True),
    "lag0-tensor-maximize": dict(probe_lag=0, scope="tensor", maximize=True),
    "lag1-no-weight-decay": dict(probe_lag=1, scope="group", weight_decay=0.0),
    "lag0-amsgrad-no-weight-decay": dict(probe_lag=0, scope="group", amsgrad=True,
                                         weight_decay=0.0),
}


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("config", list(CONFIGS))
def test_steps_match_the_float64_oracle(backend, config):
    """Eight steps: params, moments, rho after every step and the gamma each step applied."""
    _run_against_the_oracle(backend, _backends.device_of(backend), config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_reference_on_cuda_tensors_matches_the_float64_oracle(config):
    """The torch backend is the ground truth on every device: on CUDA tensors too."""
    _run_against_the_oracle("torch", torch.device("cuda"), config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mixed", [("cpu", "cuda"), ("cuda", "cpu")], ids=["stats-on-cpu",
                                                                         "stats-on-cuda"])
def test_the_reference_steps_one_group_on_the_cpu_and_a_gpu_like_one_on_the_cpu(mixed):
    """The torch backend takes a param group on two devices (AdamW does): each tensor's
    directional derivatives join the group's sums on the statistics' device (the first
    parameter's), and each update reads its rho from there."""
    import spec_tolerance
    gen = torch.Generator().manual_seed(4)
    values = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    grads = [[torch.randn(v.shape, generator=gen) for v in values] for _ in range(3)]
    results = []
    for devices in (("cpu", "cpu"), mixed):
        params = [torch.nn.Parameter(v.to(d)) for v, d in zip(values, devices)]
        opt = sadam.SAdam(params, lr=1e-2, damping=2.0, scope="group", backend="torch")
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.to(p.device)
            opt.step()
        results.append(([p.detach().cpu() for p in params], opt.lgi()[0].cpu()))
    (cpu_params, cpu_rho), (mixed_params, mixed_rho) = results
    assert float(cpu_rho.max()) > 0  # the statistics moved
    for actual, expected in zip(mixed_params, cpu_params):
        spec_tolerance.assert_params_close(actual, expected)
    spec_tolerance.assert_rho_close(mixed_rho, cpu_rho)


@pytest.mark.parametrize("lag", [0, 1])
@pytest.mark.parametrize("scope", ["group", "tensor"])
def test_the_reference_makes_every_tensor_on_the_parameters_device(lag, scope):
    """Steps on meta-device parameters: any tensor the reference made on another device (one
    that is not a 0-d scalar) meets the meta tensors and fails, as it would on a GPU; the state
    stays on the parameters' device."""
    params = [torch.nn.Parameter(torch.empty(5, 3, device="meta")),
              torch.nn.Parameter(torch.empty(7, device="meta"))]
    opt = sadam.SAdam(params, backend="torch", probe_lag=lag, scope=scope, amsgrad=True,
                      probe_window=2, weight_decay=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    devices = {v.device.type for p in params for v in opt.state[p].values()
               if isinstance(v, torch.Tensor)}
    assert devices == {"meta"} and {r.device.type for r in opt.lgi()} == {"meta"}


def _run_against_the_oracle(backend, device, config):
    hyper = dict(HYPER, amsgrad=False, maximize=False)
    hyper.update(CONFIGS[config])
    params = [torch.nn.Parameter(p.to(device)) for p in _initial()]
    opt = sadam.SAdam(params, backend=backend, **hyper)
    oracle = Oracle(_initial(), **hyper)
    for step in range(1, 9):
        grads = _gradients(step, SHAPES)
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        opt.step()
        oracle.step(grads)
        _assert_state(opt, params, oracle, step)
    # the run exercised what it claims to: damping really acted and the statistics really moved
    assert float(oracle.rho.min()) > 0.05 and float(oracle.gamma_applied().max()) < 0.9


@pytest.mark.parametrize("backend", _backends.params())
@pytest.mark.parametrize("probe_lag", [0, 1])
def test_rho_bias_correction_from_the_first_samples(backend, probe_lag):
    """Counts 1, 2, 3: rho stays 0 with one sample, then the bias-corrected estimate.

    With two samples d1, d2 of one probe the corrected moments are A = (beta d1 + d2) / (1 + beta)
    and B = (beta d1^2 + d2^2) / (1 + beta), so rho = 1 - A^2 / B per probe: written out here for
    one element and one probe, where d_i = s * g_i."""
    device = _backends.device_of(backend)
    beta = 0.6
    p = torch.nn.Parameter(torch.zeros(1, device=device))
    opt = sadam.SAdam([p], lr=1e-3, probes=1, probe_beta=beta, probe_lag=probe_lag,
                      damping=1.0, backend=backend)
    g = [1.0, -3.0, 2.0]
    expected = []
    A = (beta * g[0] + g[1]) / (1 + beta)
    B = (beta * g[0] ** 2 + g[1] ** 2) / (1 + beta)
    expected.append(1 - A * A / B)
    w = [beta ** 2, beta, 1.0]  # three samples: weights beta^(c - i), normalized by their sum
    A = sum(wi * gi for wi, gi in zip(w, g)) / sum(w)
    B = sum(wi * gi * gi for wi, gi in zip(w, g)) / sum(w)
    expected.append(1 - A * A / B)
    rhos = []
    for gi in g:
        p.grad = torch.full((1,), gi, device=device)
        opt.step()
        rhos.append(float(opt.state[p]["probe_stats"][0, L.rho_col(1)]))
    assert rhos[0] == 0.0
    assert rhos[1] == pytest.approx(expected[0], abs=1e-6)
    assert rhos[2] == pytest.approx(expected[1], abs=1e-6)
    applied = float(opt.lgi()[0])
    assert applied == pytest.approx(rhos[2] if probe_lag == 0 else rhos[1], abs=1e-6)


@pytest.mark.parametrize("backend", _backends.params())
def test_grad_scale_is_divided_out_before_everything(backend):
    """A GradScaler-style scale on the gradients gives the unscaled trajectory (functional API)."""
    device = _backends.device_of(backend)
    hyper = dict(HYPER, amsgrad=True, maximize=False, probe_lag=1, scope="group")
    offsets = [0, 5, 2 ** 33]  # shards of larger tensors: their signs start further in
    oracle = Oracle(_initial(), offsets=offsets, **hyper)
    params = [p.to(device) for p in _initial()]
    moments = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps = [torch.zeros((), device=device) for _ in params]
    stats = L.new_stats(1, hyper["probes"], device)
    scale = torch.tensor(512.0, device=device)
    for step in range(1, 5):
        grads = _gradients(step, SHAPES)
        sadam.functional.sadam(
            params, [g.to(device) * 512.0 for g in grads], *moments, steps, stats,
            scope_rows=[0, 0, 0], tensor_ids=[0, 1, 2], offsets=offsets, lr=hyper["lr"],
            beta1=0.8, beta2=0.95,
            eps=1e-8, weight_decay=0.2, damping=3.0, amsgrad=True, probes=6, probe_beta=0.7,
            probe_lag=1, seed=11, grad_scale=scale, backend=backend)
        oracle.step(grads)
    for p, q in zip(params, oracle.p):
        assert _rel(p, q) < 2e-6
    assert float((stats[:, L.rho_col(6)].double().cpu() - oracle.rho).abs().max()) < 1e-5


SPEC_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, damping=1.0,
                     probes=8, probe_beta=0.9, scope="group", probe_lag=1, amsgrad=False,
                     maximize=False, seed=0)


@pytest.mark.parametrize("entry", ["optimizer", "functional"])
def test_defaults_are_the_specs(entry):
    """SAdam(params) and sadam.functional.sadam with every hyperparameter left out (the backend
    too: "auto") step as the interface of the specification says (section 5)."""
    oracle = Oracle(_initial(), **SPEC_DEFAULTS)
    params = [torch.nn.Parameter(p) for p in _initial()]
    if entry == "optimizer":
        opt = sadam.SAdam(params, backend="torch")
    else:
        moments = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        moments[2] = []  # amsgrad is off by default: no max_exp_avg_sq
        steps = [torch.zeros(()) for _ in params]
        stats = L.new_stats(1, SPEC_DEFAULTS["probes"], "cpu")
    for step in range(1, 6):
        grads = _gradients(step, SHAPES)
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            if entry == "optimizer":
                opt.step()
            else:
                sadam.functional.sadam(params, grads, *moments, steps, stats,
                                       scope_rows=[0] * len(params),
                                       tensor_ids=list(range(len(params))))
        oracle.step(grads)
        for p, q in zip(params, oracle.p):
            assert _rel(p, q) < 2e-6, step
    if entry == "optimizer":
        stats = opt.state[params[0]]["probe_stats"]
    k = SPEC_DEFAULTS["probes"]
    assert float((stats[:, L.rho_col(k)].double() - oracle.rho).abs().max()) < 1e-5
    assert float((stats[:, L.gamma_applied_col(k)].double()
                  - oracle.gamma_applied()).abs().max()) < 1e-5
    assert float(oracle.rho.min()) > 0.05  # the damping was really exercised


def test_functional_on_a_single_tensor():
    """A group of one tensor through sadam.functional with a backend named by string."""
    hyper = dict(HYPER, amsgrad=False, maximize=False, probe_lag=0, scope="group")
    initial = _initial()[:1]
    oracle = Oracle(initial, **hyper)
    p = initial[0].clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    steps, stats = [torch.zeros(())], L.new_stats(1, hyper["probes"], "cpu")
    for step in range(1, 4):
        g = _gradients(step, SHAPES[:1])
        sadam.functional.sadam([p], g, [m], [v], [], steps, stats, scope_rows=[0],
                               tensor_ids=[0], lr=0.05, beta1=0.8, beta2=0.95, weight_decay=0.2,
                               damping=3.0, probes=6, probe_beta=0.7, probe_lag=0, seed=11,
                               backend="torch")
        oracle.step(g)
        assert _rel(p, oracle.p[0]) < 2e-6
    assert float((stats[0, L.rho_col(6)].double() - oracle.rho[0]).abs()) < 1e-5
