"""Build script: the pure-Python package plus the optional native extension `sadam._C`.

Build switches (read from the environment, never at import of `sadam`):
  SADAM_SKIP_CUDA_BUILD=1   build only the CPU kernels even when nvcc is present
  SADAM_SKIP_NATIVE_BUILD=1 build no native extension at all (pure Python + Triton)
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os
import platform
import shutil
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The flags torch compiles its own vectorized CPU kernels with, per capability. The CPU kernel
# (csrc/cpu/kernel.cpp) is compiled once per capability; the driver picks one at run time.
CPU_KERNEL = os.path.join("csrc", "cpu", "kernel.cpp")
CPU_FLAGS = {
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
               "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cpu_capabilities():
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return ["default", "avx2", "avx512"] if x86 else ["default"]


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """The toolkit folder: $CUDA_HOME, /usr/local/cuda, else the real folder of nvcc (a `nvcc`
    on PATH may be a wrapper script outside the toolkit)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _nvidia_wheel_includes(torch):
    """Headers of the `nvidia-*` pip wheels installed beside torch (cusparse, cublas, ...)."""
    sites = {os.path.dirname(os.path.dirname(torch.__file__)), sysconfig.get_paths()["purelib"]}
    return sorted(set(sum((glob.glob(os.path.join(s, "nvidia", "*", "include")) for s in sites),
                          [])))


def native_extensions():
    if _flag("SADAM_SKIP_NATIVE_BUILD"):
        return [], {}
    cuda_home = None if _flag("SADAM_SKIP_CUDA_BUILD") else _cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read when cpp_extension is imported
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # No FMA contraction: the kernel then rounds like the reference (separate mul and add).
    # cpp_extension adds the -std torch needs. OpenMP: at::parallel_for is header code that only
    # runs in parallel where the including file is compiled with it (torch uses OpenMP too).
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    cxx = ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"] + openmp
    sources = [os.path.join("csrc", *s.split("/"))
               for s in ("module.cpp", "cpu_kernels.cpp", "cpu/dispatch.cpp")]
    macros = [(f"SADAM_CPU_{c.upper()}", None) for c in _cpu_capabilities()]
    depends = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)) + [CPU_KERNEL]
    if cuda_home and torch.version.cuda:
        ext = CUDAExtension(
            "sadam._C", sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            include_dirs=[os.path.join(ROOT, "csrc")] + _nvidia_wheel_includes(torch),
            define_macros=macros + [("SADAM_WITH_CUDA", None)], depends=depends,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=openmp)
    else:
        ext = CppExtension("sadam._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           define_macros=macros, depends=depends,
                           extra_compile_args={"cxx": cxx}, extra_link_args=openmp)

    class BuildWithCpuCapabilities(BuildExtension):
        """Adds the CPU kernel compiled once per capability with torch's flags for it. The objects
        link after the baseline ones, so inline code they share resolves to the baseline copy."""

        def build_extension(self, ext):
            for cap in _cpu_capabilities():
                cxx_cap = ext.extra_compile_args["cxx"] + CPU_FLAGS[cap]
                args = dict(ext.extra_compile_args, cxx=cxx_cap)
                ext.extra_objects += self.compiler.compile(
                    [CPU_KERNEL], output_dir=os.path.join(self.build_temp, cap),
                    macros=ext.define_macros, include_dirs=ext.include_dirs, extra_postargs=args,
                    depends=ext.depends)
            super().build_extension(ext)

    return [ext], {"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["sadam", "sadam.*"]) + ["sadam.triton_kernels"],
    package_dir={"sadam.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
