"""Compiled CPU backend of :func:`porder.reorder`: numba kernels, one image at a time.

Every built-in measure is covered (``IMPLEMENTS``; plugin measures and the
controls take the generic path, as :func:`porder.reorder` decides). A pairwise
measure scores the remaining candidates of a step against the current
reference, all at once in vector lanes, and runs the greedy chain inside one
compiled loop per image (no (N, K, K) score matrix); a standalone measure sorts
its patch scores in the same loop, and the reordered image is gathered there
too. ``mi`` and ``je`` count co-located pixel pairs with per-pixel equality
bitmasks and a popcount (16-bit masks up to 4x4 patches, 64-bit up to 8x8;
pixels whose bin is unique within the reference patch count 1 and are
skipped); above 64 pixels (native resolution: 224x224 at 16x16 patches) by
the reference's value classes, compared for 32 candidates at once in byte
lanes (classes of over 128 pixels by counters per lane; exact scores of
every candidate at 4 patches or fewer). ``kl`` reads candidate-last bin
counts; for these three a product of
counts orders the candidates, and only the few candidates near the best get an
exact score (details in ``_cpu_kernels``). Permutations are identical to the
generic NumPy path: scores rounded to ``porder.ordering.DECIMALS`` decimals,
ties to the lowest index, NaN last.

Images are split into chunks that ``workers`` threads (default: all cores; the
caller's thread and a kept pool) take one after another; the compiled loop
releases the GIL.

The kernels compile on first use and are cached on disk (numba
``cache=True``): in ``__pycache__`` next to ``_cpu_kernels.py`` when the package
folder is writable, otherwise in ``$XDG_CACHE_HOME/porder/numba``
(``~/.cache/porder/numba``); ``NUMBA_CACHE_DIR``, when set, wins. The folder is
chosen by a numba cache locator that answers for porder's kernel file only
(:class:`KernelCacheLocator`, added to numba's list of locators on import): the
environment and numba's configuration are left as they are, so other numba
users in the process and its children cache where they did. The first call on
a machine compiles for about 40 seconds (2-core development machine); later
processes load the cache in about half a second. One compiled signature
serves every measure, patch size, bin count and channel count.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba.core import caching
from numba.core import config as numba_config

from ..measures import DATA_RANGE, PSNR_NOISE_FLOOR, SSIM_C1, SSIM_C2, as_builtin, get_measure
from ..ordering import DECIMALS

_KERNELS_FILE = Path(__file__).resolve().with_name("_cpu_kernels.py")


def _cache_dir(here: Path | None = None) -> str | None:
    """The folder numba should cache porder's kernels in, or None to leave numba's choice.

    ``here`` is the folder of the kernels (default: this package). numba's
    choice is ``__pycache__`` next to the kernels; when that cannot be written
    (a read-only site-packages), a per-user folder instead.
    ``NUMBA_CACHE_DIR``, when set, always wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR") or numba_config.CACHE_DIR:
        return None
    here = Path(here) if here is not None else _KERNELS_FILE.parent
    pycache = here / "__pycache__"
    if os.access(pycache if pycache.is_dir() else here, os.W_OK):
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "porder", "numba")


class KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba cache locator for ``_cpu_kernels.py`` when :func:`_cache_dir` picks a folder.

    For any other file, or when numba's own choice stands, ``from_function``
    returns None and numba's next locator decides.
    """

    def __init__(self, py_func, py_file, folder: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(folder, self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            ours = Path(py_file).resolve() == _KERNELS_FILE
        except (OSError, ValueError):
            return None
        folder = _cache_dir() if ours else None
        if folder is None:
            return None
        self = cls(py_func, py_file, folder)
        try:
            self.ensure_cache_path()
        except OSError:  # not writable either: numba's own locators decide
            return None
        return self


def _add_locator() -> None:
    """Put :class:`KernelCacheLocator` first in numba's locators (once per process)."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    names = [(c.__module__, c.__qualname__) for c in impl._locator_classes]
    if (__name__, KernelCacheLocator.__qualname__) not in names:
        impl._locator_classes.insert(0, KernelCacheLocator)


_add_locator()  # before the kernels are defined: numba picks a function's locator then

from . import _cpu_kernels as _k  # noqa: E402  (after the locator is in place)

# What this backend implements: porder's built-in formulas -> the kernels' measure codes.
# What the kernels need to know about a measure (binned or not) is its registry entry.
IMPLEMENTS = {"mi": _k.MI, "je": _k.JE, "kl": _k.KL, "l1": _k.L1, "l2": _k.L2, "ssim": _k.SSIM,
              "entropy": _k.ENTROPY, "psnr": _k.PSNR}
# The measures' constants, passed to the kernels (never read there as globals: numba's disk
# cache would keep a stale value, see _cpu_kernels).
_CONSTANTS = _k.Constants(ssim_c1=SSIM_C1, ssim_c2=SSIM_C2, psnr_peak2=DATA_RANGE**2,
                          psnr_floor=PSNR_NOISE_FLOOR, round_scale=10.0**DECIMALS)
# Images per task: enough to hide the ~2 us Python cost of a kernel call (an
# image takes 10-40 us), few enough to balance the threads at a batch's end.
MAX_CHUNK = 32
# Pixel comparisons (images x K x S**2, the chain's order of work) a one-thread call does
# on the calling thread itself: a few milliseconds, less than a thread hand-off is worth.
SMALL_WORK = 2**22


def _tables(measure, n: int, bins: int):
    """Lookup tables of the counts 0..n a patch of n pixels can produce.

    ``measure`` is a name or entry. qtab (256,) uint8: value -> bin (the
    identity for a measure that does not bin); ltab: log2(c); clogc:
    c * log2(c) as porder.measures tabulates it; plp, lt: P log2 P and log2 P
    of a bin with count c after KL's smoothing, P = (c + 1/bins) / (n + 1).
    """
    v = np.arange(256)
    qtab = (v * bins // 256 if get_measure(measure).binned else v).astype(np.uint8)
    c = np.arange(n + 1, dtype=np.float64)
    ltab = np.zeros(n + 1)
    ltab[1:] = np.log2(c[1:])
    clogc = c * ltab
    prob = (c + 1.0 / bins) / (n + 1.0)
    lt = np.log2(prob)
    return qtab, ltab, clogc, prob * lt, lt


def _arguments(measure, p: int, bins: int, reference: int, descending: bool) -> tuple:
    """The arguments of ``reorder_range`` between the image range and the scratch.

    ``measure`` is an entry (or name) of a built-in this backend implements.
    """
    n = p * p
    m = get_measure(measure)
    qtab, ltab, clogc, plp, lt = _tables(m, n, bins)
    return (IMPLEMENTS[m.name], p, bins, int(reference), bool(descending), qtab, ltab, clogc,
            math.log2(n), plp, lt, _CONSTANTS)


def _scratch(code: int, n: int, bins: int, c: int, k: int) -> tuple:
    """One thread's zeroed scratch for ``reorder_range`` (the kernels leave it zeroed):
    hist, tab, and joint (mi/je above 64 pixels: the exact scores' joint table, then the
    counters per lane of large classes) and cnt_t (kl in lanes) where the measure needs them."""
    dense = code in (_k.MI, _k.JE) and n > 64
    lanes = code == _k.KL and n <= 64
    return (np.zeros(256, dtype=np.int32), np.zeros(1024, dtype=np.uint64),
            np.zeros(bins * bins + 256 * _k.CL if dense else 1, dtype=np.int32),
            np.zeros(c * bins * (-(-k // _k.LANES) * _k.LANES) if lanes else 1, dtype=np.uint8))


def _signature() -> tuple:
    """The argument types of ``reorder_range`` as :func:`reorder_batch` calls it: one
    compiled signature serves every measure, patch size, bin count and channel count."""
    from numba import typeof

    x = np.zeros((1, 1, 1, 1), dtype=np.uint8)
    # reorder_batch's call on one 1x1 image
    args = (x, 0, 1, *_arguments("mi", 1, 1, 0, False), *_scratch(_k.MI, 1, 1, 1, 1),
            np.empty_like(x), np.empty((1, 1), dtype=np.int64), np.zeros(1, dtype=np.uint8))
    return tuple(typeof(a) for a in args)


def load() -> None:
    """Load the kernels from numba's disk cache, or compile them on a machine's first use,
    without running them.

    Only compiles (with the GIL held, apart from LLVM's own work), so it is safe on
    a background thread that outlives its caller: running a kernel there would
    allocate with the GIL released, which races ``tracemalloc.stop()`` in another
    thread on CPython 3.11 (python/cpython#128679, a segfault).
    """
    _k.reorder_range.compile(_signature())


@dataclass(frozen=True)
class CacheState:
    """Where numba caches porder's CPU kernels, and whether they are ready there.

    ``loaded``: compiled or loaded in this process already. ``cached``: numba's
    index in ``folder`` holds them for this numba version, this source file and
    this CPU, so a new process loads them (about 0.5 s) instead of compiling
    (about 30 s). ``error``: why the cache could not be read (None when it could).
    """

    folder: str
    index: str
    cached: bool
    loaded: bool
    error: str | None = None

    @property
    def warm(self) -> bool:
        """True when no compile is ahead: loaded here, or cached on disk."""
        return self.loaded or self.cached


def cache_state() -> CacheState:
    """Whether the kernels are compiled and cached, and where (reads numba's index only:
    no compiling, no loading). Used by ``porder info`` and the CLI's compile message."""
    disp = _k.reorder_range
    cache = disp._cache  # numba's FunctionCache of the kernel (cache=True)
    folder = str(getattr(cache, "cache_path", ""))
    index = ""
    try:
        sig = _signature()
        loaded = sig in disp.overloads
        files = cache._cache_file
        index = files._index_path
        key = cache._index_key(sig, disp.targetctx.codegen())
        cached = key in files._load_index()  # {} when absent, stale or another numba's
    except Exception as e:  # numba's internals moved: say so, do not guess
        return CacheState(folder, index, False, False, f"{type(e).__name__}: {e}")
    return CacheState(folder, index, cached, loaded)


def cores() -> int:
    """Cores this process may run on: the default number of threads (``workers``)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunks(n_img: int, workers: int) -> list[tuple[int, int]]:
    """(lo, hi) image ranges: about 8 per worker, at most MAX_CHUNK images each."""
    size = max(1, min(MAX_CHUNK, -(-n_img // (8 * workers))))
    return [(lo, min(lo + size, n_img)) for lo in range(0, n_img, size)]


def supports(measure, *, size: int, channels: int, patch: int, bins: int) -> bool:
    """Whether the numba kernels compute this case: any built-in formula they implement,
    at any image size, channel count, patch size and bin count."""
    b = as_builtin(get_measure(measure))
    return b is not None and b.name in IMPLEMENTS


def reorder_batch(images, measure, patch: int, *, bins: int, reference: int, descending: bool,
                  workers=None):
    """POR-reorder a batch of images with the numba kernels.

    The contract of :mod:`porder.kernels`: the inputs are validated by
    :func:`porder.reorder`, and :func:`supports` holds.

    Parameters
    ----------
    images : uint8 ndarray (N, S, S, C)
    measure : porder.measures.Measure
        A built-in formula this backend implements (``IMPLEMENTS``).
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
        A measure without a kernel (the controls, plugins).
    """
    b = as_builtin(get_measure(measure))
    if b is None or b.name not in IMPLEMENTS:
        raise ValueError(f"measure {getattr(measure, 'name', measure)!r} has no compiled kernel; "
                         f"the numba kernels implement {', '.join(IMPLEMENTS)}")
    x = np.ascontiguousarray(images)
    if not x.flags.writeable:  # numba types read-only arrays apart: one compile for all
        x = x.copy()
    n_img, s, _, c = x.shape
    p, bins = int(patch), int(bins)
    assert x.dtype == np.uint8 and s % p == 0, "porder.reorder validates the inputs"
    g = s // p
    k, n = g * g, p * p
    workers = cores() if workers is None else int(workers)
    out = np.empty_like(x)
    perm = np.empty((n_img, k), dtype=np.int64)
    if n_img == 0:
        return out, perm
    args = _arguments(b, p, bins, reference, descending)
    chunks = _chunks(n_img, workers)
    todo = iter(chunks)
    lock = threading.Lock()
    abort = np.zeros(1, dtype=np.uint8)  # set to 1 to stop every thread within one chain step

    def work():
        scratch = _scratch(IMPLEMENTS[b.name], n, bins, c, k)  # this thread's
        while not abort[0]:
            with lock:
                lo_hi = next(todo, None)
            if lo_hi is None:
                return
            _k.reorder_range(x, lo_hi[0], lo_hi[1], *args, *scratch, out, perm, abort)

    nthreads = min(workers, len(chunks))
    if nthreads == 1 and n_img * k * s * s <= SMALL_WORK:
        work()  # a small call: no thread hand-off (an interrupt waits for it, briefly)
        return out, perm
    # The calling thread only waits, in a wait that signals interrupt: a Ctrl-C (or any
    # exception raised in it) stops every kernel within one step of its chain, and is
    # raised once they have returned; a kernel never holds an interrupt back.
    tasks = [_pool(nthreads).submit(work) for _ in range(nthreads)]
    try:
        while not wait(tasks, timeout=0.25).done >= set(tasks):
            pass
    except BaseException:
        abort[0] = 1
        wait(tasks)
        raise
    for f in tasks:
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
