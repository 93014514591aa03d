"""The CUDA records of the kernel report, read from the sm_90 code of the built extension."""
import pytest



@pytest.fixture(scope="module")
def cuda_records():
    """(KEYS, records) of the built extension, read once for this module (minutes on a loaded
    two-core machine: ~70 kernel variants)."""
    from sadam import _ops
    if "cuda" not in _ops.kernels():
        pytest.skip("sadam._C was built without CUDA kernels (no nvcc at build time)")
    try:
        from sadam.kernel_report import KEYS, cuda
        return KEYS, cuda.records()
    except FileNotFoundError as exc:
        pytest.skip(f"cannot read the CUDA build: {exc}")


def test_every_variant_is_reported_with_the_report_keys(cuda_records):
    keys, records = cuda_records
    assert all(tuple(r) == keys for r in records)
    kinds = {(r["kernel"], r["param_dtype"], r["state_dtype"], r["probes"]) for r in records}
    for p in ("fp32", "bf16", "fp16"):
        for s in ("fp32", "bf16"):
            for probes in (0, 8, 16, 32):
                assert ("update", p, s, probes) in kinds, (p, s, probes)
        for probes in (8, 16, 32):
            assert ("probe", p, None, probes) in kinds
    assert {"reduce", "finalize"} <= {r["kernel"] for r in records}


def test_element_loops_are_vectorized_without_spills_or_barriers(cuda_records):
    _, records = cuda_records
    for r in records:
        # Known: amsgrad with 16-bit params and fp32 moments (five streams, eight 16-byte words
        # per trip) keeps an 8-byte local frame at 80 registers; every other variant has none.
        allowed = 8 if r["kernel"] == "update-amsgrad" and r["state_dtype"] == "fp32" else 0
        assert r["spills"] <= allowed, r
        if r["kernel"] in ("update", "update-amsgrad", "probe"):
            assert r["access_bits"] == 128, r  # 16-byte loads and stores on the aligned path
            assert r["barriers_in_loop"] == 0, r


def test_update_traffic_is_the_adamw_floor(cuda_records):
    _, records = cuda_records
    update = {(r["param_dtype"], r["state_dtype"], r["probes"]): r for r in records
              if r["kernel"] == "update"}
    assert update[("fp32", "fp32", 8)]["bytes_per_param"] == 28
    assert update[("bf16", "fp32", 8)]["bytes_per_param"] == 22
    assert update[("bf16", "bf16", 0)]["bytes_per_param"] == 14


def test_registers_allow_the_intended_occupancy(cuda_records):
    """256-thread blocks: 4 resident per SM (64 registers) up to 8 probes without amsgrad, 3 (80)
    with amsgrad or 16 probes, 2 (128) for 32 probes: the launch bounds hold, and the probe-off
    kernel is not sized by the probe count."""
    _, records = cuda_records
    for r in records:
        if r["kernel"] not in ("update", "update-amsgrad"):
            continue
        small = r["probes"] <= 8
        limit = 64 if small and r["kernel"] == "update" else 80 if r["probes"] <= 16 else 128
        assert r["registers"] <= limit, r
