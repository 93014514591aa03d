"""Build script: the pure-Python package plus the optional native extension `sadam._C`.

Build switches (read from the environment, never at import of `sadam`):
  SADAM_SKIP_CUDA_BUILD=1   build only the CPU kernels even when nvcc is present
  SADAM_SKIP_NATIVE_BUILD=1 build no native extension at all (pure Python + Triton)
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0")
  MAX_JOBS                  parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def native_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _flag("SADAM_SKIP_NATIVE_BUILD") or not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("sadam._C", sources, extra_compile_args={"cxx": ["-O3"]})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["sadam", "sadam.*"]) + ["sadam.triton_kernels"],
    package_dir={"sadam.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
