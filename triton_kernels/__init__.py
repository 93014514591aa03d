"""Triton kernels of S-Adam, installed as ``sadam.triton_kernels``.

* ``update``   -- the multi-tensor pass: moments, weight decay, damping, parameter write and, in the
                  same pass, the per-chunk partial sums of the probe directional derivatives
                  (with the update switched off it is the ``probe_lag=0`` probe pass).
* ``probe``    -- the fixed-order reduction of those partials into ``d`` (num_scopes, k).
* ``finalize`` -- the probe statistics, rho and the applied gamma, in place, one program per row.
* ``_tables``  -- host side: the per-launch tables of pointers, sizes and chunk owners.
* ``_hash``, ``_convert`` -- the probe hash and dtype conversions shared by the kernels.

Kernels are decorated when this package is first imported; with ``TRITON_INTERPRET=1`` set at that
moment they run in Triton's interpreter on CPU tensors.
"""
