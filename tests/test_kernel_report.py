"""The sm_90 kernel report: its SASS reader on known code, and the report itself against the
targets the Triton kernels are built to (compiled without a GPU, in a subprocess without
TRITON_INTERPRET; Triton's compile cache makes repeated runs fast)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sadam.kernel_report import KEYS
from sadam.kernel_report.sass import Instruction, _parse_resources, _parse_sass, element_loop, \
    loops_of

SASS = """
        Function : toy_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R4, R4, R5 ;
        /*0030*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0070*/                   STG.E.U16 desc[UR4][R2.64], R4 ;
        /*0080*/                   LDG.E R5, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E R6, desc[UR4][R2.64] ;
        /*00a0*/                   LDG.E R7, desc[UR4][R2.64] ;
        /*00b0*/               @P1 BRA 0x50 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0 ;
"""


def test_sass_reader_finds_loops_widths_and_barriers():
    instructions = _parse_sass(SASS)["toy_kernel"]
    loops = loops_of(instructions)
    assert [(lp.start, lp.end) for lp in loops] == [(0x10, 0x40), (0x50, 0xb0), (0xd0, 0xd0)]
    vector, scalar = loops[0], loops[1]
    assert (vector.count, vector.barriers, vector.access_bits) == (4, 0, 128)
    assert (vector.load_bytes_per_thread, vector.store_bytes_per_thread) == (16, 16)
    assert (scalar.barriers, scalar.access_bits, scalar.load_bytes_per_thread) == (1, 32, 16)
    # same bytes loaded per trip: the vectorized loop is the steady state
    assert element_loop(loops) is vector
    # 4 instructions for 32 lanes x 16 bytes / 8 bytes read per element = 64 elements
    assert vector.per_element(8) == 4 / 64
    assert Instruction(0, "", "LDG.E.64.CONSTANT", "").global_bits == 64


def test_resource_usage_parsing():
    text = ("Resource usage:\n Function toy_kernel:\n"
            "  REG:96 STACK:8 SHARED:2048 LOCAL:0 CONSTANT[0]:624 TEXTURE:0\n")
    assert _parse_resources(text)["toy_kernel"]["REG"] == 96
    assert _parse_resources(text)["toy_kernel"]["STACK"] == 8


def test_bench_and_report_count_the_same_bytes():
    """Two independent counts of the traffic per parameter agree (bench ratios rely on it)."""
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        from bench_triton import bytes_per_param
    finally:
        sys.path.pop(0)
    from sadam.kernel_report.triton import SIZES, update_bytes
    assert bytes_per_param("sadam-triton-lag1", torch.float32) == update_bytes(0, 0)[0] == 28
    assert bytes_per_param("sadam-triton-lag1", torch.bfloat16) == update_bytes(2, 0)[0] == 22
    assert bytes_per_param("sadam-triton-lag0", torch.float32) == update_bytes(0, 0)[0] + SIZES[0]
    assert bytes_per_param("torch-adamw-fused", torch.bfloat16) == update_bytes(2, 2)[0] == 14


def _nvidia_backend():
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.backends import backends
    return "nvidia" in backends


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _nvidia_backend():
        pytest.skip("triton with its NVIDIA backend is not installed")
    path = tmp_path_factory.mktemp("report") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "sadam.kernel_report", "--backend", "triton",
                           "--json", str(path)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(path.read_text())


def _one(records, **match):
    found = [r for r in records if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_report_records_have_exactly_the_keys(report):
    assert report and all(tuple(r) == KEYS for r in report)


def test_triton_lag1_update_at_the_limit(report):
    fp32 = _one(report, backend="triton", kernel="update", param_dtype="fp32",
                state_dtype="fp32", probes=8, lag=1)
    assert fp32["sass_per_element"] <= 2.5
    assert fp32["barriers_in_loop"] == 0 and fp32["access_bits"] == 128
    assert fp32["bytes_per_param"] == 28
    bf16 = _one(report, backend="triton", kernel="update", param_dtype="bf16",
                state_dtype="fp32", probes=8, lag=1)
    assert bf16["bytes_per_param"] == 22 and bf16["barriers_in_loop"] == 0


def test_triton_probe_pass_and_spills(report):
    probe = _one(report, backend="triton", kernel="probe", param_dtype="fp32", probes=8)
    assert probe["sass_per_element"] <= 1.5 and probe["barriers_in_loop"] == 0
    triton = [r for r in report if r["backend"] == "triton"]
    assert {r["probes"] for r in triton if r["kernel"] == "update"} >= {0, 1, 2, 4, 8, 16, 32}
    assert all(r["spills"] == 0 for r in triton), [r for r in triton if r["spills"]]
    assert all(r["barriers_in_loop"] == 0 for r in triton)
