"""CUDA backend of ``porder.reorder(..., device='cuda', backend='compiled')``: the CuPy side.

One fused kernel (``cuda/reorder.cu``, the algorithm in ``cuda/porder_core.cuh``)
takes a batch of uint8 images on the GPU to reordered images and int64
permutations in one launch per chunk, with no host round trip: one thread block
per image scores, runs the greedy chain (pairwise measures) or a stable rank
(standalone measures), and writes the reordered image. Two modes, chosen by
:func:`porder.kernels.cuda_geometry.launch_geometry` from the geometry:

* **shared** (every 32x32 case; any image whose working set fits one block's
  shared memory): the image and everything computed from it in shared memory.
  ``mi``, ``je``, ``kl`` and ``entropy`` use per-pixel equality bitmasks
  (16-bit words at patch 4, 64-bit at patch 8, 4 x 64-bit at patch 16, so up
  to 256 pixels per patch) that give every joint count as a popcount.
* **stream** (anything else: 128 p16, 224 p16/p32, 256 p8, ... any size): the
  image is read from global memory; what does not fit a shared-memory budget
  goes to the block's slice of a global scratch that :func:`launch` allocates
  per launch (bounded per image, the grid cut to ``SCRATCH_BYTES``). The
  histogram measures run in *table mode*: per-thread value counters and the
  reference's value classes, O(n + bins) per candidate and channel, any
  patch size; entropy and psnr sort their keys with a bitonic sort.
* ``l1``, ``l2``, ``ssim`` and ``psnr``: exact integer pixel sums in both.

Supported (:func:`supports`): any image size, channel count, ``bins`` and
patch size, as long as one image's scratch stays within the kernel's 32-bit
indices (2 GiB: every case up to 4096x4096 that porder.reorder's work bound
admits); the generic CuPy path remains for measures without a kernel
(controls, plugins).
:func:`reorder_batch` itself never falls back (the contract of
:mod:`porder.kernels`).

Results equal the NumPy path's: integer counts and sums are exact, float64 is
used only in the final formulas, in NumPy's order of operations, compiled with
``--fmad=false``; scores are rounded to 9 decimals as ``numpy.round`` does
before they are compared, ties go to the lowest index and NaN ranks last.

This module is the runtime side: NVRTC compilation through
``cupy.RawModule``, the device's limits, launching and :func:`reorder_batch`.
The launch geometry and its tables are pure Python in
:mod:`porder.kernels.cuda_geometry` (re-exported here: ``launch_geometry``,
``DeviceLimits``, ``Geometry``, ``MEASURE_IDS``, ``PAIRWISE``, ...).
"""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from ..measures import as_builtin, get_measure
from .cuda_geometry import (
    CHUNK_BYTES,
    HEADER,
    KERNEL_DIR,
    KERNEL_SOURCE,
    MAX_THREADS,
    MEASURE_IDS,
    PAIRWISE,
    PARAM_NAMES,
    TAB_HEADER,
    DeviceLimits,
    Geometry,
    error_message,
    kernel_table,
    launch_geometry,
    vec_flags,
)

__all__ = [
    # the runtime
    "COMPILE_OPTIONS", "IMPLEMENTS", "compile_kernels", "device_limits", "get_kernel",
    "kernel_source", "launch", "reorder_batch", "supports",
    # re-exported from cuda_geometry
    "CHUNK_BYTES", "HEADER", "KERNEL_DIR", "KERNEL_SOURCE", "MAX_THREADS", "MEASURE_IDS",
    "PAIRWISE", "PARAM_NAMES", "TAB_HEADER", "DeviceLimits", "Geometry", "error_message",
    "kernel_table", "launch_geometry", "vec_flags",
]

# NVRTC options: C++17 for `if constexpr`; no fused multiply-add, so that float
# results round exactly as the NumPy formulas do; line info for compute-sanitizer.
COMPILE_OPTIONS = ("-std=c++17", "--fmad=false", "-lineinfo")
# What this backend implements: the measures of the kernel's enum.
IMPLEMENTS = MEASURE_IDS


# ---------------------------------------------------------------------------
# Sources and compilation


@lru_cache(maxsize=1)
def kernel_source() -> str:
    """reorder.cu with porder_core.cuh inlined (NVRTC then needs no include path,
    and CuPy's compile cache, keyed by the source text, sees header changes)."""
    header = (KERNEL_DIR / HEADER).read_text()
    src = (KERNEL_DIR / KERNEL_SOURCE).read_text()
    line = f'#include "{HEADER}"'
    if line not in src:
        raise RuntimeError(f"{KERNEL_SOURCE} does not include {HEADER}")
    return src.replace(line, header, 1)


def _cupy():
    from ..backend import cupy_module as find

    cp = find()
    if cp is None:
        raise ValueError("the CUDA kernels need CuPy and a CUDA GPU; use device='cpu' or "
                         "install CuPy (`pip install 'patch-order[cuda13]'`, [cuda12] for a CUDA 12 driver)")
    return cp


_lock = threading.Lock()


@lru_cache(maxsize=None)
def _device_limits(device_id: int) -> DeviceLimits:
    runtime = _cupy().cuda.runtime
    d = DeviceLimits()

    def attr(name: str, default: int) -> int:
        try:
            return int(runtime.deviceGetAttribute(getattr(runtime, "cudaDevAttr" + name),
                                                  device_id))
        except Exception:  # an attribute this CuPy or driver does not know: the default
            return default

    return DeviceLimits(
        sm_count=attr("MultiProcessorCount", d.sm_count),
        max_smem_block=attr("MaxSharedMemoryPerBlockOptin", d.max_smem_block),
        smem_per_sm=attr("MaxSharedMemoryPerMultiprocessor", d.smem_per_sm),
        max_threads_sm=attr("MaxThreadsPerMultiProcessor", d.max_threads_sm),
        max_blocks_sm=attr("MaxBlocksPerMultiprocessor", d.max_blocks_sm),
        regs_per_sm=attr("MaxRegistersPerMultiprocessor", d.regs_per_sm),
        reserved_smem_block=attr("ReservedSharedMemoryPerBlock", d.reserved_smem_block),
    )


def device_limits() -> DeviceLimits:
    """Limits of the current CUDA device."""
    return _device_limits(_cupy().cuda.Device().id)


@lru_cache(maxsize=None)
def _kernel(name: str, device_id: int):
    """Compile (once per process and device; CuPy also caches on disk) and load."""
    cp = _cupy()
    with _lock:
        try:
            mod = cp.RawModule(code=kernel_source(), options=COMPILE_OPTIONS,
                               name_expressions=(name,))
            return mod.get_function(name)
        except cp.cuda.compiler.CompileException as e:
            raise RuntimeError(
                f"NVRTC could not compile {name} with options {' '.join(COMPILE_OPTIONS)}:\n"
                f"{e.get_message()}") from e


def get_kernel(geometry: Geometry):
    """The compiled kernel for ``geometry``, with its shared-memory limit raised."""
    cp = _cupy()
    k = _kernel(geometry.kernel, cp.cuda.Device().id)
    if geometry.smem_bytes > 48 * 1024 and k.max_dynamic_shared_size_bytes < geometry.smem_bytes:
        k.max_dynamic_shared_size_bytes = geometry.smem_bytes
    return k


@lru_cache(maxsize=256)
def _device_arrays(geometry: Geometry, device_id: int):
    """The params and table of ``geometry`` on the device (uploaded once)."""
    cp = _cupy()
    return cp.asarray(geometry.params()), cp.asarray(geometry.table())


@lru_cache(maxsize=None)
def _error_flag(device_id: int):
    return _cupy().zeros(1, dtype=np.int32)


@lru_cache(maxsize=None)
def _no_scratch(device_id: int):
    """The scratch argument of a shared-mode launch (never read or written)."""
    return _cupy().zeros(1, dtype=np.uint8)


_geometry = lru_cache(maxsize=256)(launch_geometry)


def compile_kernels(measures=tuple(MEASURE_IDS), patches=(4, 8, 16), *, image_size: int = 32,
                    channels: int = 3) -> list[dict]:
    """Compile the kernels for these cases now; one dict per kernel.

    Each dict has the name, compile seconds, registers per thread and local
    (spilled) bytes per thread, or the compiler's error text.
    """
    import time

    cp = _cupy()
    seen, rows = set(), []
    for m in measures:
        for p in patches:
            g = launch_geometry(m, image_size, channels, p, limits=device_limits())
            if not g.supported or g.kernel in seen:
                continue
            seen.add(g.kernel)
            t0 = time.perf_counter()
            row = {"kernel": g.kernel, "measure": m, "patch": p}
            try:
                k = get_kernel(g)
                row.update(seconds=round(time.perf_counter() - t0, 3), registers=k.num_regs,
                           local_bytes=k.local_size_bytes, smem_bytes=g.smem_bytes,
                           threads=g.threads, blocks_per_sm=g.blocks_per_sm)
            except Exception as e:  # report every kernel, not just the first failure
                row.update(seconds=round(time.perf_counter() - t0, 3), error=str(e))
            rows.append(row)
    cp.cuda.Device().synchronize()
    return rows


# ---------------------------------------------------------------------------
# Launching


def _ptr(a) -> int:
    """Device address of a CuPy array's first element."""
    return a.data.ptr


def launch(x, geometry: Geometry, out, perm, *, check: bool = False) -> None:
    """Run the fused kernel on ``x`` (N, S, S, C) uint8 into ``out`` and ``perm``.

    ``out`` (N, S, S, C) uint8 and ``perm`` (N, K) int64 are C-contiguous CuPy
    arrays. With ``check`` the device is synchronised and the kernel's error
    flag read (a RuntimeError explains a mismatch); otherwise nothing waits.
    """
    cp = _cupy()
    if not geometry.supported:
        raise ValueError(f"the fused kernel cannot run this case: {geometry.reason}")
    dev = cp.cuda.Device().id
    kern = get_kernel(geometry)
    params, table = _device_arrays(geometry, dev)
    err = _error_flag(dev)  # set only by a launch that does not match its params
    if check:
        err.fill(0)
    for lo, hi in geometry.chunks(x.shape[0]):
        xs = x[lo:hi]
        if not xs.flags.c_contiguous:
            xs = cp.ascontiguousarray(xs)
        os_, ps = out[lo:hi], perm[lo:hi]
        grid = geometry.grid(hi - lo, kern.num_regs)
        # stream mode: each block's slice of global scratch (CuPy's pool reuses it)
        scratch = (cp.empty(geometry.scratch_bytes(grid), dtype=cp.uint8)
                   if geometry.gmem_bytes else _no_scratch(dev))
        kern((grid,), (geometry.threads,),
             (xs, np.int64(hi - lo), np.int32(vec_flags(_ptr(xs), _ptr(os_), geometry)),
              os_, ps, params, table, err, scratch),
             shared_mem=geometry.smem_bytes)
    if check:
        code = int(err[0])
        if code:
            raise RuntimeError(f"{geometry.kernel} refused the launch: {error_message(code)}")


def supports(measure, *, size: int, channels: int, patch: int, bins: int) -> bool:
    """Whether the fused kernel computes this case on the current GPU: a built-in formula
    it implements (then any size and patch, in shared or stream mode; only an image
    beyond the kernel's 32-bit indices is refused)."""
    b = as_builtin(get_measure(measure))
    if b is None or b.name not in IMPLEMENTS:
        return False
    return _geometry(b.name, int(size), int(channels), int(patch), bins=int(bins),
                     limits=device_limits()).supported


def reorder_batch(images, measure, patch: int, *, bins: int, reference: int, descending: bool,
                  workers=None, check: bool = False):
    """Reorder a batch on the GPU: the kernel contract of :mod:`porder.kernels`.

    The inputs are validated by :func:`porder.reorder`, and :func:`supports`
    holds.

    Parameters
    ----------
    images : cupy uint8 array (N, S, S, C)
    measure : porder.measures.Measure or str
        A measure the kernels implement (``IMPLEMENTS``).
    patch : int
        Patch side; divides S.
    bins, reference, descending
        As for :func:`porder.reorder` (``descending`` already resolved).
    workers : ignored
        (CPU threads; the GPU needs none.)
    check : bool
        Synchronise and verify the kernel's error flag (for tests and debugging).

    Returns
    -------
    reordered : cupy uint8 array (N, S, S, C)
    perm : cupy int64 array (N, K)

    Raises
    ------
    ValueError
        No CuPy or GPU, images not on the GPU, or a case the fused kernel does
        not take (a measure without a kernel, or ``launch_geometry(...).reason``).
    """
    cp = _cupy()
    if not isinstance(images, cp.ndarray):
        raise ValueError(f"images must be a CuPy array on the GPU, got {type(images).__name__}")
    entry = get_measure(measure)
    b = as_builtin(entry)
    if b is None or b.name not in IMPLEMENTS:
        raise ValueError(f"measure {entry.name!r} has no CUDA kernel; the CUDA kernels "
                         f"implement {', '.join(IMPLEMENTS)}")
    n, s, _, c = images.shape
    g = _geometry(b.name, s, c, int(patch), bins=int(bins), reference=int(reference),
                  descending=descending, limits=device_limits())
    if not g.supported:
        raise ValueError(f"the CUDA kernels do not take this case: {g.reason}")
    out = cp.empty(images.shape, dtype=cp.uint8)
    perm = cp.empty((n, g.patches), dtype=cp.int64)
    if n:
        launch(images, g, out, perm, check=check)
    return out, perm
