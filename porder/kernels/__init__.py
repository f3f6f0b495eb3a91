"""Compiled kernels behind :func:`porder.reorder`.

Two backends compute the same POR permutations:

* ``generic``: the array-generic reference path (``porder.measures`` score
  matrices + ``porder.ordering`` chain), NumPy on the CPU and CuPy on a GPU.
* ``compiled``: fused kernels that score candidates and run the chain per image
  without materialising score matrices: numba on the CPU (``kernels/cpu.py``),
  CUDA C++ through CuPy ``RawModule`` on a GPU (``kernels/cuda.py``, sources in
  ``kernels/cuda/*.cu``).

Both backends give identical permutations (scores rounded to
``porder.ordering.DECIMALS`` decimals, ties to the lowest index); the tests
check the compiled kernels against the generic path.

Contract of a kernel module: ``reorder_batch(images, measure, patch, *, bins,
reference, descending, workers)`` takes uint8 images (N, S, S, C) on its device
and a resolved :class:`porder.measures.Measure` of kind 'standalone' or
'pairwise', and returns ``(reordered (N, S, S, C) uint8, perm (N, K) int64)`` on
the same device.
"""
from __future__ import annotations

import numpy as np

BACKENDS = ("compiled", "generic")


def check_backend(backend: str) -> str:
    """Validate a backend name; ValueError listing the choices otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def compiled_reorder(x, measure, patch: int, *, bins: int, reference: int, descending: bool,
                     workers=None):
    """Reorder ``x`` (N, S, S, C) uint8 with the compiled kernel for its device.

    ``x`` is a NumPy array (numba kernels) or a CuPy array (CUDA kernels).
    Returns ``(reordered, perm)`` on the device of ``x``.
    """
    if isinstance(x, np.ndarray):
        from . import cpu as impl
    else:
        from . import cuda as impl
    return impl.reorder_batch(x, measure, patch, bins=bins, reference=reference,
                              descending=descending, workers=workers)
