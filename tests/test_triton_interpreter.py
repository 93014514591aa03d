"""Runs the Triton tests in Triton's interpreter on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, which in a shared pytest process
another test may already have done; a subprocess with the variable set from the start is the
only reliable way, and it leaves this process's environment untouched. Two runs: the kernel
tests of test_triton_backend.py, and the triton cases of the shared test bodies (oracles, faults,
AMP, state_dict resume, FSDP offsets, soak, loss probe), which the main process records as
skipped for this reason.
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
# The triton cases of the shared bodies, trimmed where a parametrisation multiplies
# interpreted launches without reaching new code (the functional matrix: its corners).
SHARED_BODIES = ("test_oracles.py", "test_faults.py", "test_amp.py", "test_state_dict.py",
                 "test_soak.py", "test_loss_probe.py", "test_distributed.py",
                 "test_backend_matrix.py", "test_probe_statistics.py", "test_default_device.py")
SELECTION = ("triton and not (test_functional_matches_reference and not "
             "(p32-m32 or pbf16-mbf16 or p16-m32))")

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                       reason="triton is not installed"),
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="with a GPU the tests run compiled, in-process"),
]


def _run_interpreted(args):
    env = dict(os.environ, TRITON_INTERPRET="1", SADAM_TRITON_INTERPRETER_RUN="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-rs", *args], env=env, capture_output=True, text=True, timeout=1800,
                          cwd=HERE)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-4000:]
    return done.stdout


def test_triton_backend_in_interpreter():
    _run_interpreted(["test_triton_backend.py"])


def test_shared_bodies_on_triton_in_interpreter():
    out = _run_interpreted([*SHARED_BODIES, "-k", SELECTION])
    # every triton case ran: the only skips allowed are ones that need a GPU
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all("CUDA" in line or "cuda" in line or "SADAM_SOAK" in line for line in skipped), "\n".join(skipped)
