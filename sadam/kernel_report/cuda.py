"""The CUDA backend's records of the kernel report, read from the built extension ``sadam._C``.

The sm_90 cubin embedded in ``sadam/_C*.so`` is extracted with ``cuobjdump -xelf`` and every
kernel of ``csrc/cuda_kernels.cu`` in it is analysed by :mod:`.sass`. Kernel variants are told
apart by their demangled template arguments: ``StepFunctor<P, S, bucket, update, amsgrad>``
(parameter type, moment type, probe accumulators, update or probe pass alone, amsgrad).
"""
import glob
import os
import re
import shutil
import subprocess
import tempfile

from . import KEYS
from .sass import analyze, element_loop, find_tool, innermost

ARCH = "sm_90"
_TYPES = {"float": ("fp32", 4), "c10::BFloat16": ("bf16", 2), "c10::Half": ("fp16", 2)}
_STEP = re.compile(r"multi_tensor_kernel<5, [^<]*StepFunctor<([\w:]+), ([\w:]+), (\d+), "
                   r"(true|false), (true|false)>")


def extension_path() -> str:
    """The built ``sadam/_C*.so`` (raises FileNotFoundError when there is none)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")))
    if not found:
        raise FileNotFoundError("sadam._C is not built (make build, with nvcc for CUDA)")
    return found[0]


def extract_cubins(library: str, workdir: str):
    """Paths of the ``ARCH`` cubins embedded in `library` (one per CUDA source file)."""
    subprocess.run([find_tool("cuobjdump"), "-xelf", "all", os.path.abspath(library)],
                   cwd=workdir, check=True, capture_output=True, text=True)
    cubins = sorted(glob.glob(os.path.join(workdir, f"*{ARCH}*.cubin")))
    if not cubins:
        raise FileNotFoundError(f"{library} holds no {ARCH} code: build with "
                                "TORCH_CUDA_ARCH_LIST containing 9.0")
    return cubins


def kernel_names(cubin: str):
    """Mangled names of the kernels in `cubin`."""
    text = subprocess.run([find_tool("cuobjdump"), "-res-usage", cubin], check=True,
                          capture_output=True, text=True).stdout
    return re.findall(r"Function\s+([^\s:]+)\s*:", text)


def demangle(names):
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise FileNotFoundError("c++filt (binutils) is needed to name the CUDA kernel variants")
    out = subprocess.run([cxxfilt], input="\n".join(names), check=True, capture_output=True,
                         text=True).stdout.splitlines()
    return dict(zip(names, out))


def describe(demangled: str):
    """(kernel, param_dtype, state_dtype, probes, lag, bytes read per element, bytes per param)
    of a kernel of cuda_kernels.cu, or None for a kernel the report does not cover."""
    m = _STEP.search(demangled)
    if m:
        p_name, s_name, bucket, update, amsgrad = m.groups()
        (p, p_size), (s, s_size) = _TYPES[p_name], _TYPES[s_name]
        bucket = int(bucket)
        if update == "false":  # the probe pass of probe_lag=0: reads g only
            return "probe", p, None, bucket, 0, p_size, p_size
        moments = 3 if amsgrad == "true" else 2
        read = 2 * p_size + moments * s_size
        kernel = "update-amsgrad" if amsgrad == "true" else "update"
        return (kernel, p, s, bucket, 1 if bucket else None, read,
                read + p_size + moments * s_size)
    if "reduce_partials_kernel" in demangled:
        return "reduce", None, None, None, None, None, None
    if "finalize_kernel" in demangled:
        return "finalize", None, None, None, None, None, None
    return None


def records():
    with tempfile.TemporaryDirectory() as workdir:
        out = []
        for cubin in extract_cubins(extension_path(), workdir):
            names = kernel_names(cubin)
            for mangled, demangled in demangle(names).items():
                described = describe(demangled)
                if described is None:
                    continue
                kernel, p, s, probes, lag, read, traffic = described
                stats = analyze(cubin, mangled)
                loop = element_loop(innermost(stats.loops))
                per_element = (round(loop.per_element(read), 3)
                               if loop is not None and read else None)
                values = dict(
                    backend="cuda", kernel=kernel, param_dtype=p, state_dtype=s, probes=probes,
                    lag=lag, registers=stats.registers, spills=stats.spills,
                    shared_bytes=stats.shared_bytes,
                    barriers_in_loop=loop.barriers if loop is not None else None,
                    access_bits=loop.access_bits if loop is not None else None,
                    bytes_per_param=traffic, sass_per_element=per_element)
                out.append({key: values[key] for key in KEYS})
    order = {"update": 0, "update-amsgrad": 1, "probe": 2, "reduce": 3, "finalize": 4}
    return sorted(out, key=lambda r: (order[r["kernel"]], str(r["param_dtype"]),
                                      str(r["state_dtype"]), r["probes"] or 0))
