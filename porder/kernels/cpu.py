"""Compiled CPU backend of :func:`porder.reorder`: numba kernels, one image per task.

Every measure is covered. A pairwise measure scores the remaining candidates
against the current reference and runs the greedy chain inside one compiled
loop per image (no (N, K, K) score matrix); a standalone measure sorts its
patch scores in the same loop. ``mi`` and ``je`` count co-located pixel pairs
with per-pixel equality bitmasks and a popcount up to 8x8 patches (pixels whose
bin is unique within the reference patch count 1 and are skipped), and with a
dense joint-count table above; ``kl`` intersects per-patch bitsets of the bins
present. Permutations are identical to the generic NumPy path (scores rounded
to ``porder.ordering.DECIMALS`` decimals, ties to the lowest index, NaN last).

The kernels are compiled on first use and cached on disk (numba
``cache=True``): next to this file when the package folder is writable,
otherwise in ``$XDG_CACHE_HOME/porder/numba`` (``~/.cache/porder/numba``)
unless ``NUMBA_CACHE_DIR`` is set. The first call on a machine compiles for
about a minute (see README, "Backends"); later processes load the cache in well
under a second.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _cache_dir() -> str | None:
    """The folder numba should cache in, or None to let it use the package folder."""
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
    if "numba" in sys.modules:  # imported before us: numba reads its config at import
        import numba.core.config

        numba.core.config.CACHE_DIR = _CACHE_DIR

import numba  # noqa: E402

from . import _cpu_kernels as _k  # noqa: E402

CODES = {"mi": _k.MI, "je": _k.JE, "kl": _k.KL, "l1": _k.L1, "l2": _k.L2, "ssim": _k.SSIM,
         "entropy": _k.ENTROPY, "psnr": _k.PSNR}
# Measures that quantise intensities into bins; the others read raw values.
_BINNED = ("mi", "je", "kl", "entropy")
# numba's default threading layer (workqueue) aborts on concurrent launches from
# several Python threads; one launch at a time is also what keeps the cores busy.
_LOCK = threading.Lock()


@contextmanager
def _threads(workers):
    """numba threads for this call (default all), one image per scheduled task."""
    prev_n = numba.get_num_threads()
    want = numba.config.NUMBA_NUM_THREADS if workers is None else int(workers)
    if want < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    numba.set_num_threads(min(want, numba.config.NUMBA_NUM_THREADS))
    prev_chunk = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(prev_chunk)
        numba.set_num_threads(prev_n)


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
        Threads (default: all cores numba sees).

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
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] < 1:
        raise ValueError(f"images must be uint8 (N, S, S, C), got {x.dtype} {tuple(x.shape)}")
    n_img, s, _, c = x.shape
    if not isinstance(patch, (int, np.integer)) or patch < 1 or s % patch:
        raise ValueError(f"patch size {patch!r} does not divide the image size {s}")
    if not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 256:
        raise ValueError(f"bins must be an integer from 1 to 256, got {bins!r}")
    p, g = int(patch), s // int(patch)
    k, n = g * g, p * p
    if not 0 <= reference < k:
        raise ValueError(f"reference patch {reference} is out of range 0..{k - 1}")
    out = np.empty_like(x)
    perm = np.empty((n_img, k), dtype=np.int64)
    if n_img == 0:
        return out, perm
    qtab, ltab, clogc, plp, lt = _tables(name, n, int(bins))
    code, desc, log2n = CODES[name], bool(descending), math.log2(n)
    # per-thread scratch (zero; the kernels leave it zero), indexed by thread id
    slots = numba.config.NUMBA_NUM_THREADS
    hist = np.zeros((slots, 256), dtype=np.int32)
    tab = np.zeros((slots, 1024), dtype=np.uint64)
    dense = code in (_k.MI, _k.JE) and n > 256
    joint = np.zeros((slots, bins * bins if dense else 1), dtype=np.int32)
    lanes = code == _k.KL and n <= 64
    cnt_t = np.zeros((slots, c * bins * ((k + 31) // 32 * 32) if lanes else 1), dtype=np.uint8)
    with _LOCK, _threads(workers):
        _k.reorder_images(x, code, p, int(bins), int(reference), desc, qtab, ltab, clogc, log2n,
                          plp, lt, hist, tab, joint, cnt_t, out, perm)
    return out, perm
