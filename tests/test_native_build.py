"""The built extension loads and reports its kernels; a missing build fails only when used."""
import subprocess
import sys

import pytest
import torch

from sadam import _ops
from sadam.backends import BackendUnavailable, native, resolve


def test_extension_loads_and_reports_kernels():
    ext = _ops.load()
    if ext is None:
        pytest.skip(f"sadam._C is not built: {_ops.load_error()}")
    kernels = _ops.kernels()
    assert "cpu" in kernels
    assert ext.cpu_capability() in ("AVX2", "AVX512", "DEFAULT")
    # the dispatcher has the kernels the module says it has
    for op in ("native_update", "native_directional", "native_finalize"):
        for key in ("CPU", "CUDA"):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"sadam::{op}", key)
            assert has == (key.lower() in kernels), (op, key)


def test_cuda_kernels_compiled_where_nvcc_is_present():
    if _ops.load() is None:
        pytest.skip("sadam._C is not built")
    from torch.utils.cpp_extension import CUDA_HOME
    if not (torch.version.cuda and CUDA_HOME):
        pytest.skip("no CUDA toolkit or CPU-only torch: the CUDA kernels are not built here")
    import os
    if os.environ.get("SADAM_SKIP_CUDA_BUILD"):
        pytest.skip("SADAM_SKIP_CUDA_BUILD is set")
    assert "cuda" in _ops.kernels()


def test_auto_picks_the_cpu_kernel_for_cpu_params():
    if not native.available(torch.device("cpu"))[0]:
        pytest.skip("sadam._C is not built")
    assert resolve("auto", "cpu") is native
    assert resolve("cpu", "cpu") is native


def test_cuda_backend_without_a_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match="backend='cuda' is not available"):
        resolve("cuda", "cuda")


def test_missing_extension_raises_only_when_used():
    """With sadam._C hidden, `import sadam` works and backend='cpu' explains how to build."""
    code = (
        "import sys, importlib.abc\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'sadam._C': raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch, sadam\n"
        "from sadam.backends import resolve, BackendUnavailable\n"
        "assert resolve('auto', 'cpu').name == 'torch'\n"
        "try:\n"
        "    resolve('cpu', 'cpu')\n"
        "except BackendUnavailable as exc:\n"
        "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "not built" in out.stdout and "pip install" in out.stdout
