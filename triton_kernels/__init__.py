"""Triton kernels of S-Adam, installed as ``sadam.triton_kernels``."""
