"""POR ordering: patch permutations from scores.

* Standalone measures: a stable sort of the patch scores (N, K).
* Pairwise measures: a greedy chain. It starts at the reference patch; at each
  step the remaining patch with the best score against the current reference
  is placed next and becomes the reference. Ties go to the lowest index.
* Controls: ``none`` (identity) and ``random`` (a seeded shuffle that depends
  only on the seed and each image's index in the dataset, never on batching).

Every function returns ``perm`` (N, K) int64 with output position j holding
source patch ``perm[:, j]``.
"""
from __future__ import annotations

from .backend import get_array_module

_M64 = 0xFFFFFFFFFFFFFFFF
# Scores are compared after rounding to this many decimals, so that scores that
# are mathematically equal (common for small patches) tie exactly whatever the
# floating-point path (NumPy or CuPy, matrix or pair formula) that produced them.
DECIMALS = 9


def sort_order(scores, *, descending: bool):
    """Stable sort of standalone scores (N, K) -> perm (N, K).

    Equal scores (after rounding to ``DECIMALS`` decimals) keep their row-major
    order in either direction.
    """
    xp = get_array_module(scores)
    key = xp.round(-scores if descending else scores, DECIMALS)
    return xp.argsort(key, axis=1, kind="stable").astype(xp.int64)


def greedy_chain(matrix, *, descending: bool, reference: int = 0):
    """Greedy POR chain through a score matrix.

    Parameters
    ----------
    matrix : float array (N, K, K)
        ``matrix[:, i, j]`` scores candidate j against reference i.
    descending : bool
        True when a higher score means more similar.
    reference : int
        Index of the starting patch, 0 <= reference < K.

    Returns
    -------
    perm : int64 array (N, K), ``perm[:, 0] == reference``.

    Notes
    -----
    Scores are rounded to ``DECIMALS`` decimals; ties go to the lowest index
    (argmax returns the first). NaN scores rank last.
    """
    xp = get_array_module(matrix)
    n, k, _ = matrix.shape
    if not 0 <= reference < k:
        raise ValueError(f"reference patch {reference} is out of range 0..{k - 1}")
    big = xp.finfo(xp.float64).max
    s = matrix if descending else -matrix
    s = xp.nan_to_num(xp.round(s.astype(xp.float64), DECIMALS), nan=-big, posinf=big, neginf=-big)
    rows = xp.arange(n)
    perm = xp.empty((n, k), dtype=xp.int64)
    used = xp.zeros((n, k), dtype=bool)
    cur = xp.full(n, reference, dtype=xp.int64)
    perm[:, 0] = cur
    used[rows, cur] = True
    for step in range(1, k):
        cand = xp.where(used, -xp.inf, s[rows, cur])  # (N, K)
        cur = xp.argmax(cand, axis=1)
        perm[:, step] = cur
        used[rows, cur] = True
    return perm


def identity_order(n: int, k: int, xp):
    """perm (N, K) that leaves every patch in place."""
    return xp.broadcast_to(xp.arange(k, dtype=xp.int64), (n, k)).copy()


def _splitmix64(x, xp):
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x + xp.uint64(0x9E3779B97F4A7C15)) & xp.uint64(_M64)
    x = ((x ^ (x >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)) & xp.uint64(_M64)
    x = ((x ^ (x >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)) & xp.uint64(_M64)
    return x ^ (x >> xp.uint64(31))


def random_order(n: int, k: int, xp, *, seed: int = 0, start: int = 0):
    """Seeded shuffle of K patches for images start .. start+n-1 -> (N, K).

    Image i's permutation depends only on (seed, start + i), so it is the same
    however a dataset is batched or sharded.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    img = xp.arange(start, start + n, dtype=xp.uint64)[:, None]
    pos = xp.arange(k, dtype=xp.uint64)[None, :]
    key = _splitmix64(_splitmix64(img ^ _splitmix64(xp.full(1, seed, dtype=xp.uint64), xp), xp)
                      + pos, xp)
    return xp.argsort(key, axis=1, kind="stable").astype(xp.int64)
