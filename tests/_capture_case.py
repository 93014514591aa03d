"""A whole training step (forward, backward, optimizer step) captured in one CUDA graph.

The gradients are set to None before the capture, so backward allocates them inside it (from the
graph's private pool): a backend that kept a pointer to memory freed after the capture, or that
copied a host buffer inside it, diverges from the same steps taken eagerly. Shared by the GPU
tests and ``bench/gpu_check.py``.
"""
import torch


def small_model(seed=0):
    """An MLP with zero-initialised biases, as models start."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 16)).cuda()
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.bias)
    return model


def max_rel_error(actual, expected):
    """max |a - e| / max(|e|, 1e-3 * max|e|): relative error, zeros included."""
    a, e = actual.double(), expected.double()
    if e.numel() == 0:
        return 0.0
    scale = e.abs().clamp_min(float(e.abs().max()) * 1e-3).clamp_min(1e-12)
    return float(((a - e).abs() / scale).max())


def capture_against_eager(backend, warmup=3, replays=5, **options):
    """Replays of a captured step against eager steps from the same inputs. Returns the largest
    relative parameter error, whether the step counts agree, and both optimizers' lgi()."""
    from sadam import SAdam
    model, twin = small_model(1), small_model(1)
    opt = SAdam(model.parameters(), lr=1e-2, backend=backend, capturable=True, **options)
    twin_opt = SAdam(twin.parameters(), lr=1e-2, backend=backend, **options)
    gen = torch.Generator(device="cuda").manual_seed(3)
    inputs = [torch.randn(64, 128, device="cuda", generator=gen) for _ in range(warmup + replays)]
    static_x = torch.zeros(64, 128, device="cuda")

    def train_step(m, o, x):
        o.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: state creation and compilation, eagerly
        for x in inputs[:warmup]:
            static_x.copy_(x)
            train_step(model, opt, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for x in inputs[:warmup]:
        train_step(twin, twin_opt, x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt, static_x)
    torch.cuda.empty_cache()  # what the capture freed must not be read by the replays
    for x in inputs[warmup:]:
        static_x.copy_(x)
        graph.replay()
        train_step(twin, twin_opt, x)
    torch.cuda.synchronize()
    error = max(max_rel_error(p.detach(), q.detach())
                for p, q in zip(model.parameters(), twin.parameters()))
    steps_agree = all(torch.equal(opt.state[p]["step"], twin_opt.state[q]["step"])
                      for p, q in zip(model.parameters(), twin.parameters()))
    return {"max_rel_error": error, "steps_agree": steps_agree,
            "lgi": float(opt.lgi()[0]), "lgi_eager": float(twin_opt.lgi()[0])}


def step_twice_second_without_sync(backend, lag, lr):
    """One step that creates the state, then one under sync debug mode "error": a step that reads
    a device value back to the host raises there."""
    from sadam import SAdam
    model = small_model()
    opt = SAdam(model.parameters(), lr=lr, backend=backend, probe_lag=lag)
    model(torch.randn(32, 128, device="cuda")).square().mean().backward()
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
