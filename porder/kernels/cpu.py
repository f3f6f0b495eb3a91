"""Compiled CPU backend of :func:`porder.reorder`: numba kernels, one image at a time.

Every measure is covered. A pairwise measure scores the remaining candidates
of a step against the current reference, all at once in vector lanes, and
runs the greedy chain inside one compiled loop per image (no (N, K, K) score
matrix); a standalone measure sorts its patch scores in the same loop, and the
reordered image is gathered there too. ``mi`` and ``je`` count co-located
pixel pairs with per-pixel equality bitmasks and a popcount (16-bit masks up
to 4x4 patches, 64-bit up to 8x8; pixels whose bin is unique within the
reference patch count 1 and are skipped), ``kl`` reads candidate-last bin
counts; for these three a product of counts orders the candidates, and only
the few candidates near the best get an exact score (details in
``_cpu_kernels``). Permutations are identical to the generic NumPy path:
scores rounded to ``porder.ordering.DECIMALS`` decimals, ties to the lowest
index, NaN last.

Images are split into chunks that ``workers`` threads (default: all cores; the
caller's thread and a kept pool) take one after another; the compiled loop
releases the GIL.

The kernels compile on first use and are cached on disk (numba
``cache=True``): next to this file when the package folder is writable,
otherwise in ``$XDG_CACHE_HOME/porder/numba`` (``~/.cache/porder/numba``)
unless ``NUMBA_CACHE_DIR`` is set. The first call on a machine compiles for
about 40 seconds (2-core development machine); later processes load the cache
in about half a second. One compiled signature serves every measure, patch
size, bin count and channel count.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _cache_dir() -> str | None:
    """The folder numba should cache in, or None to leave numba's default.

    numba's default is ``__pycache__`` next to the kernels; when that cannot
    be written (a read-only site-packages), a per-user folder instead.
    ``NUMBA_CACHE_DIR``, when set, always wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    here = Path(__file__).resolve().parent
    pycache = here / "__pycache__"
    if os.access(pycache if pycache.is_dir() else here, os.W_OK):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "porder", "numba")


_CACHE_DIR = _cache_dir()
if _CACHE_DIR is not None:
    os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR
    if "numba" in sys.modules:  # imported before us: numba read its config already
        import numba.core.config

        numba.core.config.CACHE_DIR = _CACHE_DIR

from ..measures import DATA_RANGE, PSNR_NOISE_FLOOR, SSIM_C1, SSIM_C2  # noqa: E402
from ..ordering import DECIMALS  # noqa: E402
from . import _cpu_kernels as _k  # noqa: E402  (after the cache folder is chosen)

CODES = {"mi": _k.MI, "je": _k.JE, "kl": _k.KL, "l1": _k.L1, "l2": _k.L2, "ssim": _k.SSIM,
         "entropy": _k.ENTROPY, "psnr": _k.PSNR}
# The measures' constants, passed to the kernels (not read there: see _cpu_kernels).
_CONSTANTS = _k.Constants(ssim_c1=SSIM_C1, ssim_c2=SSIM_C2, psnr_peak2=DATA_RANGE**2,
                          psnr_floor=PSNR_NOISE_FLOOR, round_scale=10.0**DECIMALS)
# Measures that quantise intensities into bins; the others read raw values.
_BINNED = ("mi", "je", "kl", "entropy")
# Images per task: enough to hide the ~2 us Python cost of a kernel call (an
# image takes 10-40 us), few enough to balance the threads at a batch's end.
MAX_CHUNK = 32


def _tables(name: str, n: int, bins: int):
    """Lookup tables of the counts 0..n a patch of n pixels can produce.

    qtab (256,) uint8: value -> bin; ltab: log2(c); clogc: c * log2(c) as
    porder.measures tabulates it; plp, lt: P log2 P and log2 P of a bin with
    count c after KL's smoothing, P = (c + 1/bins) / (n + 1).
    """
    v = np.arange(256)
    qtab = (v * bins // 256 if name in _BINNED else v).astype(np.uint8)
    c = np.arange(n + 1, dtype=np.float64)
    ltab = np.zeros(n + 1)
    ltab[1:] = np.log2(c[1:])
    clogc = c * ltab
    prob = (c + 1.0 / bins) / (n + 1.0)
    lt = np.log2(prob)
    return qtab, ltab, clogc, prob * lt, lt


def _arguments(name: str, p: int, bins: int, reference: int, descending: bool) -> tuple:
    """The arguments of ``reorder_range`` between the image range and the scratch."""
    n = p * p
    qtab, ltab, clogc, plp, lt = _tables(name, n, bins)
    return (CODES[name], p, bins, int(reference), bool(descending), qtab, ltab, clogc,
            math.log2(n), plp, lt, _CONSTANTS)


def _scratch(code: int, n: int, bins: int, c: int, k: int) -> tuple:
    """One thread's zeroed scratch for ``reorder_range`` (the kernels leave it zeroed):
    hist, tab, and joint (dense mi/je) and cnt_t (kl in lanes) where the measure needs them."""
    dense = code in (_k.MI, _k.JE) and n > 64
    lanes = code == _k.KL and n <= 64
    return (np.zeros(256, dtype=np.int32), np.zeros(1024, dtype=np.uint64),
            np.zeros(bins * bins if dense else 1, dtype=np.int32),
            np.zeros(c * bins * (-(-k // _k.LANES) * _k.LANES) if lanes else 1, dtype=np.uint8))


def load() -> None:
    """Load the kernels from numba's disk cache, or compile them on a machine's first use,
    without running them.

    Only compiles (with the GIL held, apart from LLVM's own work), so it is safe on
    a background thread that outlives its caller: running a kernel there would
    allocate with the GIL released, which races ``tracemalloc.stop()`` in another
    thread on CPython 3.11 (python/cpython#128679, a segfault).
    """
    from numba import typeof

    x = np.zeros((1, 1, 1, 1), dtype=np.uint8)
    # reorder_batch's call on one 1x1 image: its argument types, one signature for all
    args = (x, 0, 1, *_arguments("mi", 1, 1, 0, False), *_scratch(_k.MI, 1, 1, 1, 1),
            np.empty_like(x), np.empty((1, 1), dtype=np.int64))
    _k.reorder_range.compile(tuple(typeof(a) for a in args))


def _cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunks(n_img: int, workers: int) -> list[tuple[int, int]]:
    """(lo, hi) image ranges: about 8 per worker, at most MAX_CHUNK images each."""
    size = max(1, min(MAX_CHUNK, -(-n_img // (8 * workers))))
    return [(lo, min(lo + size, n_img)) for lo in range(0, n_img, size)]


def reorder_batch(images, measure, patch: int, *, bins: int, reference: int, descending: bool,
                  workers=None):
    """POR-reorder a batch of images with the numba kernels.

    Parameters
    ----------
    images : uint8 ndarray (N, S, S, C)
    measure : porder.measures.Measure
        Kind 'standalone' or 'pairwise'.
    patch : int
        Patch side p, a divisor of S.
    bins : int
        Histogram bins (1..256) of the histogram measures; ignored by the others.
    reference : int
        Patch the chain starts from (pairwise measures), 0 <= reference < K.
    descending : bool
        True when a higher score is more similar (pairwise) or sorts first.
    workers : int, optional
        Threads (default: all cores).

    Returns
    -------
    reordered : uint8 ndarray (N, S, S, C)
    perm : int64 ndarray (N, K), output patch j is input patch ``perm[:, j]``

    Raises
    ------
    ValueError
        A measure without a kernel (the controls), a bad shape, dtype, patch,
        bins, reference or workers.
    """
    name = getattr(measure, "name", measure)
    if name not in CODES:
        raise ValueError(f"measure {name!r} has no compiled kernel; choose one of "
                         f"{', '.join(CODES)}")
    x = np.ascontiguousarray(images)
    if not x.flags.writeable:  # numba types read-only arrays apart: one compile for all
        x = x.copy()
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] < 1:
        raise ValueError(f"images must be uint8 (N, S, S, C), got {x.dtype} {tuple(x.shape)}")
    n_img, s, _, c = x.shape
    if not isinstance(patch, (int, np.integer)) or patch < 1 or s % patch:
        raise ValueError(f"patch size {patch!r} does not divide the image size {s}")
    if not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 256:
        raise ValueError(f"bins must be an integer from 1 to 256, got {bins!r}")
    if workers is None:
        workers = _cores()
    if not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    p, g, bins = int(patch), s // int(patch), int(bins)
    k, n = g * g, p * p
    if not 0 <= reference < k:
        raise ValueError(f"reference patch {reference} is out of range 0..{k - 1}")
    out = np.empty_like(x)
    perm = np.empty((n_img, k), dtype=np.int64)
    if n_img == 0:
        return out, perm
    args = _arguments(name, p, bins, reference, descending)
    chunks = _chunks(n_img, int(workers))
    todo = iter(chunks)
    lock = threading.Lock()

    def work():
        scratch = _scratch(CODES[name], n, bins, c, k)  # this thread's
        while True:
            with lock:
                lo_hi = next(todo, None)
            if lo_hi is None:
                return
            _k.reorder_range(x, lo_hi[0], lo_hi[1], *args, *scratch, out, perm)

    nthreads = min(int(workers), len(chunks))
    helpers = [_pool(nthreads - 1).submit(work) for _ in range(nthreads - 1)]
    work()  # the calling thread works too
    for f in helpers:
        f.result()
    return out, perm


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _pool(size: int) -> ThreadPoolExecutor | None:
    """A process-wide pool of at least ``size`` threads (kept: starting one costs ~0.4 ms).

    Recreated after a fork (the child has none of the parent's threads).
    """
    global _POOL, _POOL_SIZE, _POOL_PID
    if size < 1:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < size or _POOL_PID != os.getpid():
            if _POOL is not None and _POOL_PID == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(size, thread_name_prefix="porder-cpu")
            _POOL_SIZE, _POOL_PID = size, os.getpid()
        return _POOL
