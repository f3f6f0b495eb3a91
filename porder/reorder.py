"""The per-batch POR pipeline: images in, reordered images and permutations out."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .backend import array_module, get_array_module, resolve_device, to_device
from .kernels import check_backend, compiled_reorder, supports
from .measures import Measure, as_builtin, check_bins, get_measure, pairwise_matrix, standalone_scores
from .ordering import greedy_chain, identity_order, random_order, sort_order
from .patches import apply_perm, check_patch_size, from_torch, merge, split

# Working memory one chunk of images may use while scoring (bytes); chunks are
# processed one after another (on a CPU, one per core), so memory is bounded
# by this, not by the size of the batch or the dataset.
CHUNK_BYTES = 64 * 2**20

# What one image may ask of a pairwise measure, so that impossible work is refused up
# front instead of running for days inside a compiled kernel: the greedy chain scores
# each remaining patch against the reference, about K**2 / 2 pairs of p*p pixels, that
# is K * S**2 / 2 pixel comparisons per image and channel. 4e10 is about ten minutes
# of one core (the compiled kernels do 1e8-3e8 a second at 224x224).
MAX_PAIR_WORK = 4 * 10**10
# The generic path scores a (K, K) float64 matrix per image: 8192 patches is 512 MiB.
MAX_MATRIX_PATCHES = 8192


@dataclass(frozen=True)
class ReorderOptions:
    """The options of a reorder, validated and resolved by :func:`resolve_options`."""

    measure: Measure  # the registry entry
    patch: int  # patch side p
    size: int  # image side S
    bins: int  # 1..256
    reference: int  # 0 <= reference < patches
    descending: bool  # the measure's default unless overridden

    @property
    def grid(self) -> int:
        """G = S // p: patches per side."""
        return self.size // self.patch

    @property
    def patches(self) -> int:
        """K = G * G: patches per image."""
        return self.grid**2


def resolve_options(measure: str | Measure, patch: int, size: int, *, bins: int = 256,
                    reference: int = 0, descending=None,
                    backend: str = "compiled") -> ReorderOptions:
    """Validate the options of a reorder of SIZE x SIZE images, once, where they enter.

    Parameters
    ----------
    measure : str or Measure
        A registry name (installed plugins included) or its entry.
    patch : int
        Patch side; must divide ``size``.
    size : int
        Image side S (images are S x S).
    bins, reference, descending, backend
        As for :func:`reorder` (``descending=None``: the measure's default).

    Returns
    -------
    ReorderOptions
        The measure's entry, ``bins`` as an int and ``descending`` resolved.

    Raises
    ------
    ValueError
        An unknown measure, ``size`` below 1, a patch that does not divide
        ``size``, ``bins`` outside 1..256, ``reference`` outside 0..K-1, or work
        beyond :data:`MAX_PAIR_WORK` (or, on the generic path,
        :data:`MAX_MATRIX_PATCHES`), with the smallest patch that fits.
    """
    m = get_measure(measure)
    bins = check_bins(bins)
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be at least 1, got {size}")
    size = int(size)
    g = check_patch_size(size, patch)
    if not isinstance(reference, (int, np.integer)) or not 0 <= reference < g * g:
        raise ValueError(f"reference patch {reference} is out of range 0..{g * g - 1} "
                         f"for patch {patch} on {size}x{size} images")
    check_work(m, patch, size, generic=backend == "generic" or as_builtin(m) is None)
    desc = m.descending if descending is None else bool(descending)
    return ReorderOptions(m, patch, size, bins, int(reference), desc)


def check_work(m: Measure, patch: int, size: int, *, generic: bool) -> None:
    """Refuse a pairwise reorder whose one image is more work than porder allows.

    The bounds are :data:`MAX_PAIR_WORK` (the chain's pixel comparisons per
    image and channel, K * S**2 / 2) and, where the generic path scores a
    (K, K) matrix, :data:`MAX_MATRIX_PATCHES`. The message names the smallest
    patch side that divides ``size`` and fits both.
    """
    if m.kind != "pairwise":
        return

    def fits(p: int) -> bool:
        k = (size // p) ** 2
        return k * size * size // 2 <= MAX_PAIR_WORK and (not generic or k <= MAX_MATRIX_PATCHES)

    if fits(patch):
        return
    k = (size // patch) ** 2
    ok = next((p for p in range(patch + 1, size + 1) if size % p == 0 and fits(p)), size)
    why = (f"{k * size * size // 2:.1e} pixel comparisons per image and channel, more than "
           f"the {MAX_PAIR_WORK:.0e} (about ten minutes of one core) porder allows"
           if k * size * size // 2 > MAX_PAIR_WORK else
           f"a {k}x{k} score matrix per image on the generic path, more than "
           f"{MAX_MATRIX_PATCHES} patches ({MAX_MATRIX_PATCHES**2 * 8 // 2**20} MiB)")
    raise ValueError(f"patch {patch} on {size}x{size} images is {k:,} patches per image, and "
                     f"{m.name}'s chain compares every pair: {why}; use a patch of at least "
                     f"{ok} (--patch {ok}) or smaller images (--size)")


def _bytes_per_image(m: Measure, k: int, n: int, c: int, bins: int) -> int:
    """Rough peak working memory of scoring one image (float64 temporaries)."""
    if m.kind == "control":  # none/random score nothing: the patches, gathered once
        return 2 * k * n * c
    if m.kind == "standalone":
        return 64 * k * n * c
    if m.matrix is None:  # fn on every pair, broadcast: a few (K, K, n, C) temporaries
        return 32 * k * k * n * c
    gram = c * n * k * n * 8 * 2 if n <= 16 else c * k * k * n * 8 * 3
    return max(gram, c * k * (bins + k) * 8 * 4, c * k * k * n * 4 * 2)


def _order(patches, m: Measure, *, bins: int, reference: int, descending: bool, seed: int,
           start: int):
    """perm (N, K) int64 of patches (N, K, p, p, C); the options are already validated."""
    xp = get_array_module(patches)
    n, k = patches.shape[:2]
    if m.kind == "control":
        if m.name == "none":
            return identity_order(n, k, xp)
        return random_order(n, k, xp, seed=seed, start=start)
    if m.kind == "standalone":
        return sort_order(standalone_scores(m, patches, bins), descending=descending)
    return greedy_chain(pairwise_matrix(m, patches, bins), descending=descending,
                        reference=reference)


def permutations(patches, measure: str | Measure = "mi", *, bins: int = 256, reference: int = 0,
                 descending=None, seed: int = 0, start: int = 0):
    """POR permutations of a batch of patches.

    Parameters
    ----------
    patches : uint8 array (N, K, p, p, C)
    measure : str or Measure
        A registry name, or its resolved :class:`~porder.measures.Measure`.
    bins, reference, descending, seed
        As for :func:`reorder`.
    start : int
        Dataset index of the first image (keys the ``random`` control).

    Returns
    -------
    perm : int64 array (N, K)
    """
    m = get_measure(measure)
    k = patches.shape[1]
    if not 0 <= reference < k:
        raise ValueError(f"reference patch {reference} is out of range 0..{k - 1}")
    desc = m.descending if descending is None else bool(descending)
    return _order(patches, m, bins=check_bins(bins), reference=reference, descending=desc,
                  seed=seed, start=start)


def reorder(images, measure: str | Measure = "mi", patch: int = 8, *, bins: int = 256,
            device: str | None = None, reference: int = 0, descending=None, seed: int = 0,
            start: int = 0, workers: int | None = None, backend: str = "compiled"):
    """Reorder the patches of every image with the POR algorithm.

    Parameters
    ----------
    images : uint8 array (N, S, S, C): NumPy, CuPy, or a torch tensor
        A CPU tensor is read as NumPy and a CUDA tensor as CuPy through
        DLPack, without a copy (a CUDA tensor without CuPy is copied to the
        host). Stack a list of images into one array first.
    measure : str or Measure
        A name from :data:`porder.MEASURES` (``porder measures`` lists them),
        or its entry; the name is looked up once here and the entry passed down.
    patch : int
        Patch side; must divide S (the paper uses 4, 8 or 16 on 32x32).
    bins : int
        Histogram bins for histogram measures (1..256, default one per intensity).
    device : {'cpu', 'cuda', 'auto'}, optional
        Where to compute. 'auto' picks CUDA when CuPy and a GPU are present.
        Default: where ``images`` are ('cuda' for a CuPy array or a CUDA
        tensor when CuPy is installed, else 'cpu').
    reference : int
        Row-major index of the patch the chain starts from (pairwise measures).
    descending : bool, optional
        Override the measure's default direction (see ``porder measures``).
    seed : int
        Seed of the ``random`` control.
    start : int
        Dataset index of ``images[0]``; ``random`` keys each image by it so
        results do not depend on batching.
    workers : int, optional
        CPU threads (default: all cores). Ignored on CUDA.
    backend : {'compiled', 'generic'}
        'compiled' runs the fused kernels of :mod:`porder.kernels` (numba on
        the CPU, CUDA C++ on a GPU) where they implement the case, and the
        generic path otherwise (measures without a kernel: the controls and
        registered plugins; on a GPU, cases too big for shared memory);
        'generic' always the array-generic reference path. Both give
        identical permutations.

    Returns
    -------
    reordered : uint8 array (N, S, S, C)
        The same array type as ``images`` (a torch tensor on the same device
        for a tensor).
    perm : int64 array (N, K)
        Output patch j is input patch ``perm[:, j]``; the same array type as
        ``reordered``.

    Raises
    ------
    ValueError
        Bad shape or dtype, a list instead of one array, a patch size that does
        not divide S, an unknown measure, bad ``bins``, ``reference`` or
        ``workers``, or CUDA asked for but missing.
    """
    if isinstance(images, (list, tuple)):
        raise ValueError(f"images is a {type(images).__name__} of {len(images)} images; stack "
                         "them into one uint8 array of shape (N, S, S, C) first, e.g. "
                         "numpy.stack(images) (torch.stack for tensors)")
    images, back = from_torch(images)
    if not hasattr(images, "ndim") or not hasattr(images, "dtype"):
        raise ValueError(f"images must be a uint8 array of shape (N, S, S, C) (NumPy, CuPy or "
                         f"torch), got {type(images).__name__}")
    in_xp = get_array_module(images)
    if device is None:
        device = "cpu" if in_xp is np else "cuda"
    xp = array_module(resolve_device(device))
    # A CuPy array is computed on the GPU that holds it (not the current one).
    with images.device if xp is not np and in_xp is xp else nullcontext():
        out, perm = _reorder(images, xp, in_xp, measure, patch, bins=bins, reference=reference,
                             descending=descending, seed=seed, start=start, workers=workers,
                             backend=backend)
    return back(out), back(perm)


def _reorder(images, xp, in_xp, measure, patch, *, bins, reference, descending, seed, start,
             workers, backend):
    """:func:`reorder` on an array of ``in_xp``, computed with ``xp``."""
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[3] < 1 \
            or images.shape[1] < 1:
        raise ValueError(f"images must have shape (N, S, S, C), got {tuple(images.shape)}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got dtype {images.dtype}")
    check_backend(backend)
    opts = resolve_options(measure, patch, images.shape[1], bins=bins, reference=reference,
                           descending=descending, backend=backend)
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    x = to_device(images, xp)
    m, n, k, c = opts.measure, x.shape[0], opts.patches, x.shape[3]
    # The one place that decides between the compiled kernels and the generic path.
    if backend == "compiled" and m.kind != "control" and \
            supports(x, m, patch=opts.patch, bins=opts.bins):
        out, perm = compiled_reorder(x, m, opts.patch, bins=opts.bins, reference=opts.reference,
                                     descending=opts.descending, workers=workers)
        return to_device(out, in_xp), to_device(perm, in_xp)
    p = opts.patch
    chunk = max(1, CHUNK_BYTES // _bytes_per_image(m, k, p * p, c, opts.bins))

    def run(lo: int):
        pt = split(x[lo : lo + chunk], p)  # (n, K, p, p, C)
        perm = _order(pt, m, bins=opts.bins, reference=opts.reference,
                      descending=opts.descending, seed=seed, start=start + lo)
        return merge(apply_perm(pt, perm)), perm

    starts = range(0, n, chunk)
    nthreads = 1 if xp is not np else (workers or os.cpu_count() or 1)
    if nthreads > 1 and len(starts) > 1:
        # One BLAS thread per worker: nested BLAS threads oversubscribe the cores.
        with threadpool_limits(1, user_api="blas"), \
                ThreadPoolExecutor(min(nthreads, len(starts))) as pool:
            parts = list(pool.map(run, starts))
    else:
        parts = [run(lo) for lo in starts]
    if not parts:
        out, perm = x.copy(), xp.zeros((0, k), dtype=xp.int64)
    else:
        out = xp.concatenate([p[0] for p in parts])
        perm = xp.concatenate([p[1] for p in parts])
    return to_device(out, in_xp), to_device(perm, in_xp)
