"""The Triton kernels compile for an sm_90 GPU, checked without one.

The interpreter runs code the GPU compiler rejects, so every kernel variant is lowered to a cubin
by ``_triton_sm90_compile.py`` in a subprocess without TRITON_INTERPRET (a variable set by another
test must not turn this into an interpreter run).
"""
import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "_triton_sm90_compile.py")


def _nvidia_backend():
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.backends import backends
    return "nvidia" in backends


@pytest.mark.skipif(not _nvidia_backend(), reason="triton with its NVIDIA backend is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout and done.stdout.count("ok ") >= 8, done.stdout
