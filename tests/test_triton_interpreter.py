"""Runs test_triton_backend.py in Triton's interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, which in a shared pytest process
another test may already have done; a subprocess with the variable set from the start is the
only reliable way, and it leaves this process's environment untouched.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.join(os.path.dirname(__file__), "test_triton_backend.py")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the tests run compiled, in-process")
def test_triton_backend_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", SADAM_TRITON_INTERPRETER_RUN="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TESTS],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-4000:]
