"""One command that checks the GPU backends on a CUDA machine and writes what it found.

    python3 bench/gpu_check.py            # (make gpu-check) on a machine with a CUDA GPU
    python3 bench/gpu_check.py --dry-run  # anywhere: checks the plan, imports and output paths

Runs under the machine's own python3 (no virtual environment, no network): it first rebuilds
the native extension there, then runs the stages below in order, each under its own time budget
and its own try/except, so one failure never loses the rest. Everything goes to one JSON file
and a short markdown summary, ``bench/results/<GPU name>-gpu-check.{json,md}``:

1. ``tests``    the GPU tests (Triton backend, native CUDA kernels, graph capture) via pytest;
2. ``sync``     one step of each GPU backend under ``torch.cuda.set_sync_debug_mode("error")``;
3. ``oracle``   damping=0, default betas, 200 steps against ``torch.optim.AdamW`` (max relative
                error, zero-initialised biases included);
4. ``timing``   CUDA-event step times at ~500M parameters (GPT-2-Large-like and Llama-like
                shapes, fp32 and bf16) of torch's fused and foreach AdamW, torch-optimi's AdamW
                when importable, and SAdam (triton lag 1 / lag 0, cuda), with the bandwidth each
                reaches at its true bytes per parameter and the profiler time of our kernels;
5. ``capture``  forward, backward and step in one CUDA graph, gradients allocated in the capture;
6. ``huge``     one bf16 tensor of 2**31 + 5 elements: the last elements are updated and d
                matches the reference.

The stages use the public API (``SAdam``, ``sadam.functional``) and the backend contract of
``sadam/backends/step.py``; nothing here depends on how a backend's kernels are written.
"""
import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # sadam from this checkout; shared cases

from _capture_case import (max_rel_error, small_model,  # noqa: E402  (needs the path above)
                           step_twice_second_without_sync)
RESULTS = os.path.join(ROOT, "bench", "results")
TOTAL_BUDGET_S = 470  # the whole run stays under 8 minutes on one H200
GPU_BACKENDS = ("triton", "cuda")
# test_default_device.py: torch.set_default_device("cuda"), the common large-model setting
GPU_TESTS = ["tests/test_triton_backend.py", "tests/test_native_cuda.py",
             "tests/test_default_device.py"]


class StageTimeout(Exception):
    pass


class StageFailed(Exception):
    """A stage ran to its end and found a problem: its result is recorded all the same."""

    def __init__(self, result):
        super().__init__(json.dumps(result, default=str)[:2000])
        self.result = result


# --------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def time_limit(seconds):
    """Raise StageTimeout in the main thread after `seconds` (checked between Python calls)."""
    def on_alarm(signum, frame):
        raise StageTimeout(f"stage exceeded its budget of {seconds:.0f} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def device_slug():
    import torch
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


# ---------------------------------------------------------------------------------- stages
def stage_build(budget):
    """Rebuild sadam._C for this machine's torch and GPU (sm_90 only, to keep it short)."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               MAX_JOBS=str(os.cpu_count() or 4), PIP_NO_INDEX="1")
    attempts = [
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-e", "."],
        [sys.executable, "setup.py", "build_ext", "--inplace"],
    ]
    log = []
    start = time.monotonic()
    for cmd in attempts:
        left = budget - (time.monotonic() - start)
        if left < 10:
            break
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=left)
        except subprocess.TimeoutExpired:
            log.append({"cmd": " ".join(cmd[1:]), "rc": "timeout"})
            break
        log.append({"cmd": " ".join(cmd[1:]), "rc": proc.returncode,
                    "tail": (proc.stdout + proc.stderr)[-3000:]})
        if proc.returncode == 0:
            if cmd[1] == "setup.py":
                _link_triton_kernels()
            return {"built_with": " ".join(cmd[1:]), "log": log}
    raise StageFailed({"log": log})


def _link_triton_kernels():
    """An in-place build has no install to map sadam.triton_kernels to triton_kernels/."""
    link = os.path.join(ROOT, "sadam", "triton_kernels")
    if not os.path.exists(link):
        os.symlink(os.path.join("..", "triton_kernels"), link)


def stage_tests(budget):
    junit = os.path.join(tempfile.mkdtemp(), "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           f"--junitxml={junit}", *GPU_TESTS]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-4000:]
    summary = {"rc": rc, "output_tail": tail}
    if os.path.exists(junit):
        summary.update(_junit_summary(junit))
    if rc != 0:
        raise StageFailed(summary)
    return summary


def junit_cases(path):
    """(classname, name, {tag: message}) of each test case of a pytest junit file, for the tags
    "failure", "error" and "skipped" it has (none: it passed)."""
    for case in ET.parse(path).getroot().iter("testcase"):
        found = {}
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                found[tag] = node.get("message") or ""
        yield case.get("classname"), case.get("name"), found


def _junit_summary(path):
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for classname, case_name, found in junit_cases(path):
        counts["tests"] += 1
        name = f"{classname}::{case_name}"
        for tag in ("failure", "error"):
            if tag in found:
                counts["failures" if tag == "failure" else "errors"] += 1
                failed.append({"test": name, "message": found[tag][:500]})
        if "skipped" in found:
            counts["skipped"] += 1
            skipped.append({"test": name, "reason": found["skipped"][:200]})
    return {"counts": counts, "failed": failed[:50], "skipped": skipped[:50]}


def stage_sync(budget):
    """A step of each GPU backend and probe lag with the sync debug mode set to 'error'."""
    import torch
    out = {}
    for backend in GPU_BACKENDS:
        for lag in (1, 0):
            for lr_kind in ("float", "tensor"):
                key = f"{backend}-lag{lag}-lr_{lr_kind}"
                lr = 1e-3 if lr_kind == "float" else torch.tensor(1e-3, device="cuda")
                try:
                    step_twice_second_without_sync(backend, lag, lr)
                    out[key] = "ok"
                except StageTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded, the stage goes on
                    out[key] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    if any(v != "ok" for v in out.values()):
        raise StageFailed(out)
    return out


def stage_oracle(budget, steps=200):
    """damping=0 with default betas is AdamW: 200 steps against torch.optim.AdamW (fp32)."""
    import torch
    from sadam import SAdam
    configs = [("triton", 1), ("triton", 0), ("cuda", 1), ("cuda", 0)]
    out = {}
    for backend, lag in configs:
        key = f"{backend}-lag{lag}"
        try:
            ours, theirs = small_model(), small_model()
            opt = SAdam(ours.parameters(), lr=1e-3, weight_decay=1e-2, damping=0.0,
                        probe_lag=lag, backend=backend)
            ref = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=1e-2,
                                    foreach=False)
            gen = torch.Generator(device="cuda").manual_seed(0)
            for _ in range(steps):
                for p, q in zip(ours.parameters(), theirs.parameters()):
                    g = torch.randn(p.shape, device="cuda", generator=gen) * 1e-2
                    p.grad, q.grad = g.clone(), g
                opt.step()
                ref.step()
            torch.cuda.synchronize()
            errors = [max_rel_error(p.detach(), q.detach())
                      for p, q in zip(ours.parameters(), theirs.parameters())]
            biases = [max_rel_error(m.bias.detach(), n.bias.detach())
                      for m, n in zip(ours, theirs) if isinstance(m, torch.nn.Linear)]
            out[key] = {"max_rel_error": max(errors), "max_rel_error_biases": max(biases),
                        "within_1e-5": max(errors) <= 1e-5}
        except StageTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if not all(v.get("within_1e-5") for v in out.values()):
        raise StageFailed(out)
    return out


def gpt2_large_like():
    """GPT-2 Large's tensor shapes with 22 of its 36 blocks: about 500M parameters."""
    d, vocab, positions = 1280, 50257, 1024
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
             (4 * d, d), (d,)]
    return [(vocab, d), (positions, d)] + block * 22 + [(d,), (d,)]


def llama_like():
    """Llama-7B's tensor shapes: its embedding and 2 decoder blocks, about 540M parameters."""
    d, ff, vocab = 4096, 11008, 32000
    block = [(d, d)] * 4 + [(ff, d), (ff, d), (d, ff), (d,), (d,)]
    return [(vocab, d)] + block * 2 + [(d,)]


SHAPES = {"gpt2-large-like": gpt2_large_like, "llama-like": llama_like}


ALL_KERNELS = ".*"  # every kernel of a SAdam step is one of ours (or its step-count add)


def _optimizers():
    """name -> (builder(params, dtype), our kernel name patterns or None, extra grad reads)."""
    import torch
    from sadam import SAdam

    def sadam_(backend, lag):
        return lambda ps, dtype: SAdam(ps, lr=1e-4, weight_decay=0.01, damping=1.0,
                                       probe_lag=lag, backend=backend)

    def adamw(**flags):
        return lambda ps, dtype: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **flags)

    table = {
        "torch-adamw-fused": (adamw(fused=True), None, 0),
        "torch-adamw-foreach": (adamw(foreach=True), None, 0),
        "sadam-triton-lag1": (sadam_("triton", 1), ALL_KERNELS, 0),
        "sadam-triton-lag0": (sadam_("triton", 0), ALL_KERNELS, 1),
        "sadam-cuda-lag1": (sadam_("cuda", 1), ALL_KERNELS, 0),
        "sadam-cuda-lag0": (sadam_("cuda", 0), ALL_KERNELS, 1),
    }
    try:
        import optimi
        table["optimi-adamw"] = (lambda ps, dtype: optimi.AdamW(ps, lr=1e-4, weight_decay=0.01),
                                 None, 0)
    except ImportError:
        pass
    return table


def true_bytes_per_param(params, opt, extra_grad_reads):
    """Bytes each step moves per parameter: p, g and every parameter-sized state tensor read,
    p and the state written, plus the extra gradient passes (probe_lag=0 reads g twice)."""
    total = numel = 0
    for p in params:
        state = [v for v in opt.state[p].values()
                 if hasattr(v, "numel") and v.numel() == p.numel() and v.dim() > 0]
        g = p.grad
        total += p.numel() * p.element_size() * 2 + g.numel() * g.element_size() * (
            1 + extra_grad_reads) + sum(2 * s.numel() * s.element_size() for s in state)
        numel += p.numel()
    return total / numel


def _median_step_ms(opt, rounds=15):
    import torch
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def _kernel_times(opt, pattern, steps=3):
    """Profiler time per step of each GPU kernel whose name matches `pattern` (ours)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        total_us = getattr(evt, "device_time_total", None)
        if total_us is None:
            total_us = getattr(evt, "cuda_time_total", 0)
        if total_us and re.search(pattern, evt.key, re.IGNORECASE):
            out[evt.key[:120]] = {"ms_per_step": total_us / 1e3 / steps,
                                  "calls_per_step": evt.count / steps}
    return out


def stage_timing(budget):
    import torch
    deadline = time.monotonic() + budget
    results, skipped = [], []
    builders = _optimizers()
    for model, shapes in SHAPES.items():
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            gen = torch.Generator(device="cuda").manual_seed(0)
            params = []
            for shape in shapes():
                p = torch.empty(shape, device="cuda", dtype=dtype).normal_(0, 0.02, generator=gen)
                p.requires_grad_(True)
                p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
                params.append(p)
            n = sum(p.numel() for p in params)
            fused_ms = None
            for name, (build, pattern, extra_reads) in builders.items():
                if time.monotonic() > deadline - 5:
                    skipped.append(f"{model}/{dtype_name}/{name}")
                    continue
                row = {"model": model, "dtype": dtype_name, "optimizer": name, "params": n}
                opt = None
                try:
                    opt = build(params, dtype)
                    median, times = _median_step_ms(opt)
                    bpp = true_bytes_per_param(params, opt, extra_reads)
                    row.update(median_ms=median, min_ms=min(times), bytes_per_param=bpp,
                               gbps=bpp * n / (median / 1e3) / 1e9)
                    if name == "torch-adamw-fused":
                        fused_ms = median
                    if fused_ms:
                        row["ratio_vs_torch_fused"] = median / fused_ms
                    if pattern:
                        row["kernels"] = _kernel_times(opt, pattern)
                except StageTimeout:
                    raise
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                results.append(row)
                del opt
                torch.cuda.empty_cache()
            del params
            torch.cuda.empty_cache()
    return {"rows": results, "skipped_for_time": skipped,
            "note": "median of 15 CUDA-event timed steps after 3 warm-up steps; fp32 and bf16 "
                    "parameters, each optimizer's default moment dtype"}


def stage_capture(budget):
    """Forward, backward and step in one CUDA graph, gradients allocated inside the capture:
    replays against the same steps taken eagerly (tests/_capture_case.py)."""
    from _capture_case import capture_against_eager
    out = {}
    for backend in GPU_BACKENDS:
        for lag in (1, 0):
            key = f"{backend}-lag{lag}"
            try:
                result = capture_against_eager(backend, probe_lag=lag)
                result["ok"] = (result["max_rel_error"] <= 1e-5 and result["steps_agree"]
                                and abs(result["lgi"] - result["lgi_eager"]) <= 1e-4)
                out[key] = result
            except StageTimeout:
                raise
            except Exception as exc:  # noqa: BLE001
                out[key] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    if not all(v["ok"] for v in out.values()):
        raise StageFailed(out)
    return out


def stage_huge(budget, numel=2**31 + 5, window=4096):
    """A bf16 tensor past 2**31 elements. The gradient is zero except its first and last
    `window` elements, so the reference can compute d from those two pieces alone (placed by
    their offsets in the full tensor) and the last elements' update from the tail piece."""
    import torch
    from sadam import _layout as L
    from sadam.backends import reference, resolve
    from sadam.backends.step import GroupStep
    out = {}
    for backend in GPU_BACKENDS:
        try:
            impl = resolve(backend, torch.device("cuda"))
            gen = torch.Generator(device="cuda").manual_seed(7)
            p = torch.empty(numel, dtype=torch.bfloat16, device="cuda").normal_(generator=gen)
            g = torch.zeros_like(p)
            g[:window].normal_(generator=gen)
            g[-window:].normal_(generator=gen)
            m = torch.zeros(numel, device="cuda")
            v = torch.zeros(numel, device="cuda")
            tail = slice(numel - window, numel)

            def step_of(params, grads, ms, vs, offsets, ids, stats):
                return GroupStep(params=params, grads=grads, exp_avgs=ms, exp_avg_sqs=vs,
                                 max_exp_avg_sqs=[], steps=[torch.zeros((), device="cuda")
                                                            for _ in params],
                                 stats=stats, scope_rows=[0] * len(params), tensor_ids=ids,
                                 offsets=offsets, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                 weight_decay=1e-2, damping=1.0, amsgrad=False, maximize=False,
                                 probes=8, probe_beta=0.9, window=0, seed=0)

            pieces = [slice(0, window), tail]
            ref_step = step_of([p[s].clone() for s in pieces], [g[s].clone() for s in pieces],
                               [m[s].clone() for s in pieces], [v[s].clone() for s in pieces],
                               [0, numel - window], [0, 0], L.new_stats(1, 8, "cuda"))
            d_ref = reference.update(ref_step, damped=True, emit_probe=True)
            before_tail = p[tail].clone()
            big = step_of([p], [g], [m], [v], [0], [0], L.new_stats(1, 8, "cuda"))
            d = impl.update(big, damped=True, emit_probe=True)
            torch.cuda.synchronize()
            abs_sum = float(g[:window].double().abs().sum() + g[-window:].double().abs().sum())
            d_err = float((d.double() - d_ref.double()).abs().max())
            updated = p[tail].float()
            expected = ref_step.params[1].float()
            ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(
                expected.abs().clamp_min(torch.finfo(torch.bfloat16).tiny))))
            out[backend] = {
                "numel": numel,
                "last_elements_changed": bool((updated != before_tail.float()).any()),
                "last_elements_within_1_ulp": bool(((updated - expected).abs()
                                                    <= ulp * 1.0001).all()),
                "d_max_abs_error": d_err, "d_tolerance": 1e-5 * abs_sum,
                "ok": None}
            out[backend]["ok"] = (out[backend]["last_elements_changed"]
                                  and out[backend]["last_elements_within_1_ulp"]
                                  and d_err <= 1e-5 * abs_sum)
            del p, g, m, v, big
            torch.cuda.empty_cache()
        except StageTimeout:
            raise
        except Exception as exc:  # noqa: BLE001
            out[backend] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            torch.cuda.empty_cache()
    if not all(v["ok"] for v in out.values()):
        raise StageFailed(out)
    return out


# (name, function, budget in seconds); the budgets sum to TOTAL_BUDGET_S at most
PLAN = [
    ("build", stage_build, 130),
    ("tests", stage_tests, 150),
    ("sync", stage_sync, 20),
    ("oracle", stage_oracle, 40),
    ("timing", stage_timing, 80),
    ("capture", stage_capture, 20),
    ("huge", stage_huge, 30),
]
IN_PROCESS = {"sync", "oracle", "timing", "capture", "huge"}


# ------------------------------------------------------------------------------- reporting
def environment():
    info = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch
        info.update(torch=torch.__version__, cuda=torch.version.cuda,
                    gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(sms=props.multi_processor_count,
                        memory_gib=round(props.total_memory / 2**30, 1))
    except Exception as exc:  # noqa: BLE001
        info["torch"] = f"not importable: {exc}"
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    return info


def markdown(report):
    lines = [f"# GPU check: {report['environment'].get('gpu')}", "",
             f"`python3 bench/gpu_check.py`, {report['started']}, torch "
             f"{report['environment'].get('torch')}, triton {report['environment'].get('triton')}"
             f", {report['seconds']:.0f} s in all.", "",
             "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, stage in report["stages"].items():
        note = stage.get("error", "")[:160].replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', 0):.1f} | {note} |")
    timing = report["stages"].get("timing", {}).get("result", {}).get("rows", [])
    if timing:
        lines += ["", "| model | dtype | optimizer | ms/step | x torch fused | B/param | GB/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in timing:
            if "median_ms" not in r:
                lines.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | error | | | |")
                continue
            lines.append(f"| {r['model']} | {r['dtype']} | {r['optimizer']} | "
                         f"{r['median_ms']:.3f} | {r.get('ratio_vs_torch_fused', float('nan')):.2f}"
                         f" | {r['bytes_per_param']:.0f} | {r['gbps']:.0f} |")
    return "\n".join(lines) + "\n"


def output_paths(slug):
    base = os.path.join(RESULTS, f"{slug}-gpu-check")
    return base + ".json", base + ".md"


def run(stages=None, copy_to=None):
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to check the plan", file=sys.stderr)
        return 2
    started = time.time()
    deadline = time.monotonic() + TOTAL_BUDGET_S
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
              "environment": environment(), "stages": {}}
    json_path, md_path = output_paths(device_slug())
    os.makedirs(RESULTS, exist_ok=True)
    for name, fn, budget in PLAN:
        if stages and name not in stages:
            continue
        left = min(budget, deadline - time.monotonic())
        entry = {"budget_s": budget}
        t0 = time.monotonic()
        if left < 3:
            entry.update(status="skipped", error="no time left in the overall budget")
        else:
            print(f"gpu_check: {name} (budget {left:.0f} s)", flush=True)
            try:
                if name in IN_PROCESS:
                    _sadam_fresh()
                    with time_limit(left):
                        entry["result"] = fn(left)
                else:
                    entry["result"] = fn(left)
                entry["status"] = "ok"
            except StageTimeout as exc:
                entry.update(status="timeout", error=str(exc))
            except StageFailed as exc:
                entry.update(status="failed", result=exc.result, error=str(exc)[:300])
            except Exception as exc:  # noqa: BLE001 - every stage reports, none aborts the run
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:6000],
                             traceback=traceback.format_exc()[-3000:])
        entry["seconds"] = time.monotonic() - t0
        report["stages"][name] = entry
        print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)
        report["seconds"] = time.time() - started
        _write(report, json_path, md_path, copy_to)  # after every stage: a crash keeps the rest
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["stages"].values()) else 1


def _sadam_fresh():
    """The build stage may have replaced sadam._C: import sadam only after it."""
    import importlib
    importlib.invalidate_caches()


def _write(report, json_path, md_path, copy_to=None):
    for folder in filter(None, (os.path.dirname(json_path), copy_to)):
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, os.path.basename(json_path)[:-len(".json")])
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(markdown(report))


def dry_run():
    """Check, without a GPU, everything a real run needs before its first stage."""
    problems = []
    total = sum(budget for _, _, budget in PLAN)
    if total > TOTAL_BUDGET_S:
        problems.append(f"stage budgets sum to {total} s > {TOTAL_BUDGET_S} s")
    names = [name for name, _, _ in PLAN]
    if len(set(names)) != len(names):
        problems.append(f"duplicate stage names in {names}")
    for name, fn, budget in PLAN:
        if not callable(fn) or fn.__name__ != f"stage_{name}":
            problems.append(f"stage {name!r} has no function stage_{name}")
        if budget <= 0:
            problems.append(f"stage {name!r} has no time budget")
    for module in ("torch", "sadam", "sadam.functional", "sadam.backends",
                   "sadam.backends.reference", "sadam.backends.step", "sadam._layout"):
        try:
            __import__(module)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"cannot import {module}: {exc}")
    for test in GPU_TESTS:
        if not os.path.exists(os.path.join(ROOT, test)):
            problems.append(f"missing test file {test}")
    for attr in ("gpt2_large_like", "llama_like"):
        n = sum(_numel(s) for s in globals()[attr]())
        if not 4e8 <= n <= 6e8:
            problems.append(f"{attr} has {n} parameters, not about 500M")
    try:
        from sadam import SAdam  # noqa: F401
        import torch
        builders = _optimizers()
        for required in ("torch-adamw-fused", "torch-adamw-foreach", "sadam-triton-lag1",
                         "sadam-triton-lag0", "sadam-cuda-lag1", "sadam-cuda-lag0"):
            if required not in builders:
                problems.append(f"timing stage lacks {required}")
        params = [torch.nn.Parameter(torch.zeros(3))]
        builders["torch-adamw-fused"][0](params, torch.float32)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"optimizer table: {type(exc).__name__}: {exc}")
    for path in output_paths("dry-run"):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write("")
            os.remove(path)
        except OSError as exc:
            problems.append(f"cannot write {path}: {exc}")
    print("gpu_check plan (stage, budget s):")
    for name, _, budget in PLAN:
        print(f"  {name:8s} {budget:4d}")
    print(f"  total    {total:4d} (limit {TOTAL_BUDGET_S})")
    print(f"results: {os.path.relpath(output_paths('<GPU name>')[0], ROOT)} and .md")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print("dry run: ok" if not problems else f"dry run: {len(problems)} problem(s)")
    return 0 if not problems else 1


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check the plan, imports and output paths without a GPU")
    parser.add_argument("--stages", nargs="*", metavar="STAGE",
                        help="run only these stages (default: all, in order)")
    parser.add_argument("--copy-to", metavar="DIR",
                        help="also write the JSON and markdown files into DIR")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run()
    return run(args.stages, args.copy_to)


if __name__ == "__main__":
    sys.exit(main())
