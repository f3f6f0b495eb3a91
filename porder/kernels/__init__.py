"""Compiled kernels behind :func:`porder.reorder`.

Two paths compute the same POR permutations:

* ``generic``: the array-generic reference path (``porder.measures`` score
  matrices + ``porder.ordering`` chain), NumPy on the CPU and CuPy on a GPU.
  It runs every measure, plugins included.
* ``compiled``: fused kernels that score candidates and run the chain per image
  without materialising score matrices: numba on the CPU (``kernels/cpu.py``),
  CUDA C++ through CuPy ``RawModule`` on a GPU (``kernels/cuda.py``; its launch
  geometry in ``kernels/cuda_geometry.py``, sources in ``kernels/cuda/*.cu``).

Both give identical permutations (scores rounded to
``porder.ordering.DECIMALS`` decimals, ties to the lowest index); the tests
check the compiled kernels against the generic path.

The contract of a compiled backend module (``cpu`` and ``cuda`` alike)
----------------------------------------------------------------------
``supports(measure, *, size, channels, patch, bins) -> bool``
    Whether its kernels compute this case. Which measures a backend implements
    is its own list (``IMPLEMENTS``: porder's built-in formulas, found with
    :func:`porder.measures.as_builtin`); what they need to know about a measure
    (kind, binned) comes from its registry entry. The CUDA backend also checks
    that one image fits the GPU's shared memory.
``reorder_batch(images, measure, patch, *, bins, reference, descending, workers)``
    Called only for a case ``supports`` accepts, with inputs that
    :func:`porder.reorder` has validated (:func:`porder.reorder.resolve_options`):
    uint8 images (N, S, S, C) on the backend's device, a resolved
    :class:`porder.measures.Measure`, a patch side dividing S, ``bins`` in
    1..256, ``0 <= reference < K``, ``descending`` a bool, ``workers`` None or
    at least 1. Returns ``(reordered (N, S, S, C) uint8, perm (N, K) int64)``
    on the same device. It never falls back itself: a case it does not
    support is a ValueError.

:func:`porder.reorder` alone decides between the two paths, the same way on
both devices: the compiled kernels where the backend supports the case, the
generic path otherwise.
"""
from __future__ import annotations

import numpy as np

BACKENDS = ("compiled", "generic")


def check_backend(backend: str) -> str:
    """Validate a backend name; ValueError listing the choices otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def backend_module(x):
    """The compiled backend for the device of ``x``: ``cpu`` for NumPy, ``cuda`` for CuPy."""
    if isinstance(x, np.ndarray):
        from . import cpu as impl
    else:
        from . import cuda as impl
    return impl


def supports(x, measure, *, patch: int, bins: int) -> bool:
    """Whether the compiled backend for ``x`` (N, S, S, C) implements this case."""
    return backend_module(x).supports(measure, size=int(x.shape[1]), channels=int(x.shape[3]),
                                      patch=patch, bins=bins)


def compiled_reorder(x, measure, patch: int, *, bins: int, reference: int, descending: bool,
                     workers=None):
    """Reorder ``x`` (N, S, S, C) uint8 with the compiled kernel for its device.

    ``x`` is a NumPy array (numba kernels) or a CuPy array (CUDA kernels), and
    :func:`supports` holds. Returns ``(reordered, perm)`` on the device of ``x``.
    """
    return backend_module(x).reorder_batch(x, measure, patch, bins=bins, reference=reference,
                                           descending=descending, workers=workers)
