"""The kernel report: what every GPU kernel variant compiles to on sm_90, read without a GPU.

``python -m sadam.kernel_report [--json PATH]`` prints one line per variant and writes the records
as a JSON list. Each backend module here (``triton``, ``cuda``) exposes ``records()``, a list of
dicts with exactly the keys of :data:`KEYS`:

* ``backend`` ("triton" / "cuda"), ``kernel`` ("update", "probe", ...), ``param_dtype``,
  ``state_dtype`` ("fp32" / "bf16" / "fp16" / None), ``probes`` (k; 0 = probe="off"), ``lag``;
* ``registers`` per thread, ``spills`` (local-memory bytes per thread), ``shared_bytes``;
* ``barriers_in_loop``, ``access_bits`` (widest global access), ``sass_per_element``
  (warp-level SASS instructions per element) of the steady-state element loop;
* ``bytes_per_param``: the global traffic of the kernel per parameter.

:mod:`.sass` is the backend-neutral SASS reader both use.
"""
KEYS = ("backend", "kernel", "param_dtype", "state_dtype", "probes", "lag", "registers", "spills",
        "shared_bytes", "barriers_in_loop", "access_bits", "bytes_per_param", "sass_per_element")
BACKENDS = ("triton", "cuda")
