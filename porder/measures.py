"""Patch measures: one registry entry per measure, batched and xp-generic.

Conventions (the same for every measure, so results are comparable)
--------------------------------------------------------------------
* Inputs are uint8 patches of shape (..., p, p, C). A measure is computed on
  each channel separately and the C results are averaged (the paper's rule for
  RGB).
* Histogram measures (``entropy``, ``mi``, ``je``, ``kl``) quantise intensities
  into ``bins`` equal-width bins, ``bin = value * bins // 256``; the default 256
  is one bin per intensity. Entropies are in bits (log base 2).
* Pixel sums are accumulated exactly (integers, or integer-valued float64) and
  only the final formula is floating point, so a result does not depend on how
  images are batched.
* ``descending`` is each measure's default order: for a pairwise measure True
  means "higher is more similar" (the chain takes the maximum next); for a
  standalone measure it is the sort order of the patches.

Public entry: :func:`measure` (values of one measure), :data:`MEASURES` (the
registry, name -> :class:`Measure`) and :func:`register_measure` (add one; installed
packages add theirs through the entry-point group ``porder.measures``).
"""
from __future__ import annotations

import dataclasses
import math
import re
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .backend import get_array_module

DATA_RANGE = 255.0
SSIM_C1 = (0.01 * DATA_RANGE) ** 2
SSIM_C2 = (0.03 * DATA_RANGE) ** 2
# Noise floor of the standalone PSNR: the variance of the rounding error of an
# 8-bit quantiser (1/12), so a flat patch scores a finite 10*log10(255**2 * 12).
PSNR_NOISE_FLOOR = 1.0 / 12.0
# Pairwise log-count sums use a Gram-matrix formulation up to this many pixels
# per patch and sorting above it (the faster of the two on a CPU).
_GRAM_MAX_PIXELS = 16


# --------------------------------------------------------------------------
# Helpers shared by the measures


def _check_uint8(name: str, a) -> None:
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 patches (..., p, p, C), got dtype {a.dtype}")
    if a.ndim < 3 or a.shape[-3] != a.shape[-2]:
        raise ValueError(f"{name} must have shape (..., p, p, C), got {tuple(a.shape)}")


def check_bins(bins: int) -> int:
    """``bins`` as an int; ValueError unless it is an integer from 1 to 256."""
    if not isinstance(bins, (int, np.integer)) or not 1 <= bins <= 256:
        raise ValueError(f"bins must be an integer from 1 to 256, got {bins!r}")
    return int(bins)


_check_bins = check_bins  # the name pipeline.py imports


def _vectors(a):
    """(..., p, p, C) -> (..., C, n): one pixel vector per channel, n = p * p."""
    p, c = a.shape[-2], a.shape[-1]
    v = a.reshape(a.shape[:-3] + (p * p, c))
    return v.swapaxes(-1, -2)


def _quantise(v, bins: int):
    """uint8 intensities -> bin indices in [0, bins) as int32."""
    xp = get_array_module(v)
    q = v.astype(xp.int32)
    return q if bins == 256 else (q * bins) // 256


def _clogc_table(xp, n: int):
    """t[c] = c * log2(c) for c in 0..n (t[0] = 0), float64."""
    c = np.arange(n + 1, dtype=np.float64)
    t = np.zeros(n + 1)
    t[1:] = c[1:] * np.log2(c[1:])
    return xp.asarray(t)


def _log_count_sum(codes):
    """Sum over a row of log2(count of each element's value in that row).

    ``codes`` (..., n) integers -> float64 (...). Equals sum over distinct
    values of c * log2(c), so that the entropy of the row is
    ``log2(n) - result / n``. Sort, mark run starts, count runs.
    """
    xp = get_array_module(codes)
    lead, n = codes.shape[:-1], codes.shape[-1]
    s = xp.sort(codes.reshape(-1, n), axis=-1)  # (M, n)
    m = s.shape[0]
    start = xp.empty(s.shape, dtype=bool)
    start[:, 0] = True
    xp.not_equal(s[:, 1:], s[:, :-1], out=start[:, 1:])
    run = xp.cumsum(start, axis=1) - 1  # run index of each element within its row
    gid = (xp.arange(m, dtype=xp.int64)[:, None] * n + run).ravel()
    counts = xp.bincount(gid, minlength=m * n).reshape(m, n)  # run lengths, 0-padded
    return _clogc_table(xp, n)[counts].sum(axis=1).reshape(lead)


def _entropy_bits(log_count_sum, n: int):
    """Shannon entropy in bits from a log-count sum over n samples."""
    return math.log2(n) - log_count_sum / n


def _channel_mean(x):
    """Average over the channel axis (the last one)."""
    return x.mean(axis=-1)


# --------------------------------------------------------------------------
# Standalone measures: (..., p, p, C) -> (...)


def entropy(a, *, bins: int = 256):
    """Shannon entropy of a patch's intensity histogram, in bits.

    Notes
    -----
    ``H(a) = -sum_i p_i log2 p_i`` over the ``bins`` intensity bins, per channel,
    averaged over channels (paper Eqs. 1-2).
    """
    q = _quantise(_vectors(a), bins)  # (..., C, n)
    return _channel_mean(_entropy_bits(_log_count_sum(q), q.shape[-1]))


def _moments(a):
    """Exact first and second pixel sums per channel: (..., C) float64 each."""
    xp = get_array_module(a)
    v = _vectors(a).astype(xp.float64)  # integer-valued, so sums are exact
    return v.sum(axis=-1), (v * v).sum(axis=-1), v.shape[-1]


def psnr(a, *, bins: int = 256):
    """Peak signal-to-noise ratio of a patch against its own mean, in dB.

    Notes
    -----
    The patch's "noise" is its variance about its own mean (the error of the
    best constant approximation): ``PSNR = 10 log10(255^2 / max(var, 1/12))``
    per channel, averaged. The floor 1/12 is the variance of 8-bit rounding
    noise, so a flat patch gets a finite 58.9 dB instead of infinity. ``bins``
    is accepted for a uniform signature and ignored.
    """
    xp = get_array_module(a)
    s1, s2, n = _moments(a)
    var = (n * s2 - s1 * s1) / (n * n)  # exact numerator
    return _channel_mean(10.0 * xp.log10(DATA_RANGE**2 / xp.maximum(var, PSNR_NOISE_FLOOR)))


# --------------------------------------------------------------------------
# Pairwise measures on explicit pairs: a, b (..., p, p, C) broadcast -> (...)


def _pair_codes(a, b, bins: int):
    qa, qb = _quantise(_vectors(a), bins), _quantise(_vectors(b), bins)
    return qa * bins + qb  # (..., C, n): one code per co-located pixel pair


def joint_entropy(a, b, *, bins: int = 256):
    """Joint entropy of co-located pixel pairs of two patches, in bits.

    Notes
    -----
    ``JE(a, b) = -sum_{i,j} p_ij log2 p_ij`` where ``p_ij`` is the fraction of
    pixel positions with ``a`` in bin i and ``b`` in bin j (paper Eqs. 3-4),
    per channel, averaged. Lower means the patches explain each other better.
    """
    codes = _pair_codes(a, b, bins)
    return _channel_mean(_entropy_bits(_log_count_sum(codes), codes.shape[-1]))


def mutual_information(a, b, *, bins: int = 256):
    """Mutual information of two patches, in bits.

    Notes
    -----
    ``MI(a, b) = H(a) + H(b) - JE(a, b)`` (paper Eq. 5), per channel, averaged.
    """
    qa, qb = _quantise(_vectors(a), bins), _quantise(_vectors(b), bins)
    n = qa.shape[-1]
    ha = _entropy_bits(_log_count_sum(qa), n)
    hb = _entropy_bits(_log_count_sum(qb), n)
    je = _entropy_bits(_log_count_sum(qa * bins + qb), n)
    return _channel_mean(ha + hb - je)


def _histograms(q, bins: int):
    """Dense counts (..., bins) of bin indices q (..., n)."""
    xp = get_array_module(q)
    lead, n = q.shape[:-1], q.shape[-1]
    m = int(np.prod(lead)) if lead else 1
    gid = (xp.arange(m, dtype=xp.int64)[:, None] * bins + q.reshape(m, n)).ravel()
    return xp.bincount(gid, minlength=m * bins).reshape(lead + (bins,))


def _smoothed(hist, n: int, bins: int):
    """Additive smoothing: one pseudo-pixel spread evenly over all bins."""
    return (hist + 1.0 / bins) / (n + 1.0)


def kl_divergence(a, b, *, bins: int = 256):
    """Kullback-Leibler divergence KL(a || b) of intensity histograms, in bits.

    Parameters
    ----------
    a : uint8 array (..., p, p, C)
        The reference patch (P).
    b : uint8 array (..., p, p, C)
        The candidate patch (Q).

    Notes
    -----
    ``KL(P || Q) = sum_i P_i log2(P_i / Q_i)`` per channel, averaged. Both
    histograms are smoothed additively with a pseudo-count of ``1/bins`` per
    bin (one pseudo-pixel in all), ``P_i = (c_i + 1/bins) / (n + 1)``, so the
    divergence is finite even where supports differ. Not symmetric.
    """
    xp = get_array_module(a)
    a, b = xp.broadcast_arrays(a, b)
    qa, qb = _quantise(_vectors(a), bins), _quantise(_vectors(b), bins)
    n = qa.shape[-1]
    pa = _smoothed(_histograms(qa, bins), n, bins)
    pb = _smoothed(_histograms(qb, bins), n, bins)
    return _channel_mean((pa * (xp.log2(pa) - xp.log2(pb))).sum(axis=-1))


def l1_distance(a, b, *, bins: int = 256):
    """Mean absolute difference of two patches (L1 norm per pixel).

    Notes
    -----
    ``L1(a, b) = sum |a - b| / n`` per channel (n pixels), averaged over
    channels; ``bins`` is ignored.
    """
    xp = get_array_module(a)
    d = xp.abs(_vectors(a).astype(xp.int32) - _vectors(b).astype(xp.int32))
    return _channel_mean(d.sum(axis=-1) / d.shape[-1])


def l2_distance(a, b, *, bins: int = 256):
    """Root-mean-square difference of two patches (L2 norm per pixel).

    Notes
    -----
    ``L2(a, b) = sqrt(sum (a - b)^2 / n)`` per channel, averaged; ``bins`` is
    ignored.
    """
    xp = get_array_module(a)
    d = _vectors(a).astype(xp.float64) - _vectors(b).astype(xp.float64)
    return _channel_mean(xp.sqrt((d * d).sum(axis=-1) / d.shape[-1]))


def _ssim_formula(s1a, s1b, s2a, s2b, sab, n):
    """Single-window SSIM from exact pixel sums (population statistics)."""
    mua, mub = s1a / n, s1b / n
    va = (n * s2a - s1a * s1a) / (n * n)
    vb = (n * s2b - s1b * s1b) / (n * n)
    cov = (n * sab - s1a * s1b) / (n * n)
    num = (2 * mua * mub + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mua * mua + mub * mub + SSIM_C1) * (va + vb + SSIM_C2)
    return num / den


def ssim(a, b, *, bins: int = 256):
    """Structural similarity of two patches with one window over the whole patch.

    Notes
    -----
    ``SSIM = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))``
    with population (1/n) variances and covariance, ``C1 = (0.01*255)^2``,
    ``C2 = (0.03*255)^2``, per channel, averaged. ``bins`` is ignored.
    """
    xp = get_array_module(a)
    va = _vectors(a).astype(xp.float64)
    vb = _vectors(b).astype(xp.float64)
    n = va.shape[-1]
    r = _ssim_formula(
        va.sum(-1), vb.sum(-1), (va * va).sum(-1), (vb * vb).sum(-1), (va * vb).sum(-1), n
    )
    return _channel_mean(r)


# --------------------------------------------------------------------------
# Score matrices for the ordering: patches (N, K, p, p, C) -> (N, K, K)
# S[:, i, j] = measure(ref = patch i, candidate = patch j).


def _symmetric_pairs_matrix(fn, patches, bins):
    """Matrix of a symmetric pair function, evaluated on pairs i < j only."""
    xp = get_array_module(patches)
    n_img, k = patches.shape[:2]
    i, j = (xp.asarray(t) for t in np.triu_indices(k, 1))
    vals = fn(patches[:, i], patches[:, j], bins=bins)  # (N, P)
    out = xp.zeros((n_img, k, k), dtype=xp.float64)
    out[:, i, j] = vals
    out[:, j, i] = vals
    return out


def _log_count_matrix(q, bins: int):
    """L[..., i, j] = sum over pixels of log2(joint count) for patch pair (i, j).

    q (N, C, K, n) bin indices -> (N, C, K, K) float64. The joint count of
    pixel t for the pair (i, j) is ``sum_u [q_i,u == q_i,t][q_j,u == q_j,t]``,
    a Gram product of 0/1 equality matrices (exact in float64); the diagonal
    gives each patch's own log-count sum. Large patches sort pair codes instead.
    """
    xp = get_array_module(q)
    n_img, c, k, n = q.shape
    if n > _GRAM_MAX_PIXELS:
        i, j = (xp.asarray(t) for t in np.triu_indices(k))
        vals = _log_count_sum(q[:, :, i] * bins + q[:, :, j])  # (N, C, P)
        out = xp.empty((n_img, c, k, k), dtype=xp.float64)
        out[:, :, i, j] = vals
        out[:, :, j, i] = vals
        return out
    qt = q.swapaxes(-1, -2)  # (N, C, n, K)
    eq = (qt[..., :, :, None] == q[..., None, :, :]).astype(xp.float64)  # (N, C, n_t, K, n_u)
    counts = eq @ eq.swapaxes(-1, -2)  # (N, C, n_t, K, K), integers 1..n
    out = xp.zeros((n_img, c, k, k), dtype=xp.float64)
    for t0 in range(0, n, 8):  # a product of 8 counts <= 16**8 < 2**53 is exact
        out += xp.log2(counts[:, :, t0 : t0 + 8].prod(axis=2))
    return out


def _je_matrix(patches, bins):
    q = _quantise(_vectors(patches), bins).swapaxes(1, 2)  # (N, C, K, n)
    je = _entropy_bits(_log_count_matrix(q, bins), q.shape[-1])  # (N, C, K, K)
    return je.mean(axis=1)


def _mi_matrix(patches, bins):
    xp = get_array_module(patches)
    q = _quantise(_vectors(patches), bins).swapaxes(1, 2)  # (N, C, K, n)
    je = _entropy_bits(_log_count_matrix(q, bins), q.shape[-1])  # (N, C, K, K)
    h = xp.diagonal(je, axis1=-2, axis2=-1)  # (N, C, K): JE(a, a) = H(a)
    return (h[..., :, None] + h[..., None, :] - je).mean(axis=1)


def _kl_matrix(patches, bins):
    xp = get_array_module(patches)
    q = _quantise(_vectors(patches), bins).swapaxes(1, 2)  # (N, C, K, n)
    p = _smoothed(_histograms(q, bins), q.shape[-1], bins)  # (N, C, K, B)
    logp = xp.log2(p)
    neg_h = (p * logp).sum(axis=-1)  # (N, C, K)
    cross = p @ logp.swapaxes(-1, -2)  # (N, C, K, K): sum_b P_i,b log Q_j,b
    return (neg_h[..., :, None] - cross).mean(axis=1)


def _gram(patches):
    """Exact sums for all patch pairs: s1, s2 (N, C, K) and sab (N, C, K, K)."""
    xp = get_array_module(patches)
    v = _vectors(patches).astype(xp.float64).swapaxes(1, 2)  # (N, C, K, n)
    return v.sum(-1), (v * v).sum(-1), v @ v.swapaxes(-1, -2), v.shape[-1]


def _ssim_matrix(patches, bins):
    s1, s2, sab, n = _gram(patches)
    r = _ssim_formula(
        s1[..., :, None], s1[..., None, :], s2[..., :, None], s2[..., None, :], sab, n
    )
    return r.mean(axis=1)


def _l2_matrix(patches, bins):
    xp = get_array_module(patches)
    s1, s2, sab, n = _gram(patches)
    d2 = s2[..., :, None] + s2[..., None, :] - 2 * sab  # exact sum of squared differences
    return xp.sqrt(xp.maximum(d2, 0) / n).mean(axis=1)


def _l1_matrix(patches, bins):
    return _symmetric_pairs_matrix(l1_distance, patches, bins)


# --------------------------------------------------------------------------
# Generic forms of any measure (those without a matrix of their own)


def _broadcast_matrix(m: "Measure", patches, bins: int):
    """(N, K, K) scores of a pairwise measure's ``fn`` on every ordered pair of patches.

    ``fn`` sees two broadcast views of shape (N, K, K, p, p, C) (no copy);
    what it allocates is bounded by the chunking of :func:`porder.reorder`.
    """
    xp = get_array_module(patches)
    n_img, k = patches.shape[:2]
    a, b = xp.broadcast_arrays(patches[:, :, None], patches[:, None, :])  # (N, K, K, p, p, C)
    return _checked_scores(m, m.fn(a, b, bins=bins), (n_img, k, k))


def _checked_scores(m: "Measure", scores, shape: tuple):
    """A measure's values as float64 of ``shape``; ValueError naming the measure otherwise."""
    xp = get_array_module(scores)
    if tuple(getattr(scores, "shape", ())) != shape:
        raise ValueError(f"measure {m.name!r} ({m.origin}) returned values of shape "
                         f"{tuple(getattr(scores, 'shape', ()))}, expected {shape}")
    return scores.astype(xp.float64, copy=False)


def pairwise_matrix(m: "Measure", patches, bins: int):
    """(N, K, K) score matrix of pairwise measure ``m``: its ``matrix``, or ``fn`` on all pairs."""
    if m.matrix is not None:
        return m.matrix(patches, bins)
    return _broadcast_matrix(m, patches, bins)


def standalone_scores(m: "Measure", patches, bins: int):
    """(N, K) scores of standalone measure ``m`` on patches (N, K, p, p, C)."""
    return _checked_scores(m, m.fn(patches, bins=bins), tuple(patches.shape[:2]))


# --------------------------------------------------------------------------
# The registry

KINDS = ("standalone", "pairwise")  # what a registered measure may be; 'control' is porder's own
ENTRY_POINT_GROUP = "porder.measures"
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class PluginWarning(UserWarning):
    """A measure plugin (entry point of group ``porder.measures``) could not be loaded."""


@dataclass(frozen=True)
class Measure:
    """One ordering measure: what :func:`register_measure` takes and the registry holds.

    Parameters
    ----------
    name : str
        Lowercase letters, digits, ``_`` or ``-``, starting with a letter (at
        most 32 characters): the name used by ``porder reorder -m``,
        ``compare -m``, ``train --measure`` and :func:`porder.reorder`.
    kind : {'standalone', 'pairwise'}
        'standalone' scores each patch on its own and the patches are sorted
        by score; 'pairwise' scores a candidate patch against a reference
        patch and the greedy chain takes the best candidate next. (porder's
        controls ``none`` and ``random`` have kind 'control'.)
    descending : bool
        The default direction: for a pairwise measure True means "higher is
        more similar"; for a standalone measure it sorts the highest first.
    summary : str
        One line saying what the measure computes (``porder measures``).
    fn : callable
        ``fn(a, b, *, bins)`` for a pairwise measure, ``fn(a, *, bins)`` for a
        standalone one. ``a`` and ``b`` are uint8 patches (..., p, p, C) of the
        same shape, NumPy or CuPy arrays (use
        :func:`porder.backend.get_array_module` to stay generic); the result
        has shape (...). ``bins`` (1..256) is the histogram resolution asked
        for; a measure that does not bin may ignore it.
    matrix : callable, optional
        ``matrix(patches, bins)``: the (N, K, K) scores ``S[:, i, j] = fn(i, j)``
        of patches (N, K, p, p, C), computed faster than pair by pair. Without
        it porder evaluates ``fn`` on every pair by broadcasting.
    binned : bool
        Whether the measure quantises intensities into ``bins`` bins
        (``bin = value * bins // 256``); porder's compiled kernels read it.
    origin : str, optional
        Who provides the measure: 'porder' for the built-ins, the distribution
        name for a plugin. :func:`register_measure` fills it in when None.

    Notes
    -----
    Only ``name``, ``kind``, ``descending``, ``summary`` and ``fn`` are needed:
    a measure without a compiled kernel runs on porder's generic path (the
    same permutations rules: scores rounded to 9 decimals, ties to the lowest
    index, NaN last), through :func:`porder.reorder`, the CLI, ``compare``,
    ``train --measure`` and :class:`porder.nn.PatchReorder`.

    Examples
    --------
    A pairwise measure with only ``fn`` (porder builds the score matrix)::

        import numpy as np
        import porder

        def max_abs(a, b, *, bins=256):
            d = a.astype(np.int16) - b.astype(np.int16)
            return np.abs(d).max(axis=(-3, -2, -1)).astype(np.float64)

        porder.register_measure(porder.Measure(
            "maxabs", "pairwise", False, "largest absolute pixel difference", max_abs))
        images, perm = porder.reorder(images, "maxabs", 8)
    """

    name: str
    kind: str
    descending: bool
    summary: str
    fn: Optional[Callable] = None
    matrix: Optional[Callable] = None
    binned: bool = False
    origin: Optional[str] = None

    @property
    def direction(self) -> str:
        if self.kind == "pairwise":
            return "higher is more similar" if self.descending else "lower is more similar"
        if self.kind == "standalone":
            return "highest first" if self.descending else "lowest first"
        return "-"


class _Registry(Mapping):
    """name -> :class:`Measure`; the installed plugins are loaded on first listing or miss."""

    def __init__(self):
        self._entries: dict[str, Measure] = {}

    def __getitem__(self, name: str) -> Measure:
        m = self._entries.get(name)
        if m is None:
            _load_plugins()
            return self._entries[name]
        return m

    def __iter__(self):
        _load_plugins()
        return iter(list(self._entries))

    def __len__(self) -> int:
        _load_plugins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"MEASURES({', '.join(self)})"


MEASURES: Mapping[str, Measure] = _Registry()
"""The measure registry, name -> :class:`Measure`: the built-ins, the controls
``none`` and ``random``, and every registered or plugin measure (loaded on first
listing or on a name not found). ``porder measures`` prints it."""
_LOCK = threading.RLock()  # reentrant: a plugin's import may look up a measure
_plugins = "new"  # 'new' -> 'loading' -> 'done'


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_entry(m: Measure) -> None:
    """ValueError (one line) for a measure that cannot be registered."""
    if not isinstance(m, Measure):
        raise ValueError(f"register_measure takes a porder.Measure, got {type(m).__name__}")
    if not isinstance(m.name, str) or not _NAME.fullmatch(m.name):
        raise ValueError(f"measure name {m.name!r} is not valid: use 1 to 32 lowercase letters, "
                         "digits, '_' or '-', starting with a letter")
    what = f"measure {m.name!r}"
    if m.kind not in KINDS:
        raise ValueError(f"{what}: kind must be 'standalone' or 'pairwise', got {m.kind!r}")
    if not isinstance(m.descending, bool):
        raise ValueError(f"{what}: descending must be True or False, got {m.descending!r}")
    if not isinstance(m.summary, str) or not m.summary.strip() or "\n" in m.summary:
        raise ValueError(f"{what}: summary must be one non-empty line, got {m.summary!r}")
    if not callable(m.fn):
        raise ValueError(f"{what}: fn must be callable, got {type(m.fn).__name__}")
    if m.matrix is not None and (m.kind != "pairwise" or not callable(m.matrix)):
        raise ValueError(f"{what}: matrix must be None or, for a pairwise measure, callable; "
                         f"got {type(m.matrix).__name__} for kind {m.kind!r}")
    if not isinstance(m.binned, bool):
        raise ValueError(f"{what}: binned must be True or False, got {m.binned!r}")
    if m.origin is not None and (not isinstance(m.origin, str) or not m.origin.strip()):
        raise ValueError(f"{what}: origin must be a non-empty string or None, got {m.origin!r}")


def register_measure(measure: Measure, *, replace: bool = False) -> Measure:
    """Add a measure to porder's registry.

    Parameters
    ----------
    measure : Measure
        The entry; see :class:`Measure` for what each field must be.
    replace : bool
        Replace a registered measure of the same name (default: refuse).

    Returns
    -------
    Measure
        The entry as registered, with ``origin`` filled in when it was None
        (the top-level package of ``measure.fn``, e.g. ``'__main__'``).

    Raises
    ------
    ValueError
        A field that is not valid (name syntax, kind, a non-callable ``fn``,
        ...), or a name already registered without ``replace=True``.

    Notes
    -----
    Installed packages register measures without code in the caller: an
    entry point in the group ``porder.measures`` naming a :class:`Measure`,
    e.g. in ``pyproject.toml``::

        [project.entry-points."porder.measures"]
        maxabs = "my_package.measures:MAXABS"

    Plugins are loaded once per process, when the registry is first listed or
    a name is not found; a plugin that fails to load is skipped with a
    :class:`PluginWarning` naming its entry point.
    """
    _load_plugins()  # a plugin's name counts as taken
    return _add(measure, replace=replace)


def _add(measure: Measure, *, replace: bool = False) -> Measure:
    """:func:`register_measure` without loading the plugins first."""
    _check_entry(measure)
    if measure.origin is None:
        module = getattr(measure.fn, "__module__", None) or "__main__"
        measure = dataclasses.replace(measure, origin=module.partition(".")[0])
    with _LOCK:
        old = MEASURES._entries.get(measure.name)
        if old is not None and not replace:
            raise ValueError(f"measure {measure.name!r} is already registered (origin "
                             f"{old.origin}); pass replace=True to replace it")
        MEASURES._entries[measure.name] = measure
    return measure


def _load_plugins() -> None:
    """Register the measures of the installed ``porder.measures`` entry points, once."""
    global _plugins
    if _plugins == "done":
        return
    with _LOCK:
        if _plugins != "new":  # done, or being loaded by this thread (a plugin's own lookup)
            return
        _plugins = "loading"
        try:
            from importlib.metadata import entry_points

            for ep in entry_points(group=ENTRY_POINT_GROUP):
                _load_plugin(ep)
        finally:
            _plugins = "done"


def _load_plugin(ep) -> None:
    """Register one entry point's measure; a PluginWarning (one line) if it cannot be."""
    dist = getattr(ep, "dist", None)
    origin = dist.name if dist is not None else ep.value.partition(":")[0].partition(".")[0]
    try:
        m = ep.load()
        if not isinstance(m, Measure):
            raise ValueError(f"the object is of type {type(m).__name__}, not porder.Measure")
        old = MEASURES._entries.get(getattr(m, "name", None))
        if old is not None and old.origin != "porder" and \
                dataclasses.replace(old, origin=None) == dataclasses.replace(m, origin=None):
            return  # the plugin's module registered it itself on import
        _add(dataclasses.replace(m, origin=origin))
    except Exception as e:  # a broken plugin must not break porder
        version = f" {dist.version}" if dist is not None else ""
        warnings.warn_explicit(
            f"measure plugin '{ep.name} = {ep.value}' ({ENTRY_POINT_GROUP} entry point of "
            f"{origin}{version}) was not loaded: {_first_line(e)}",
            PluginWarning, "porder", 0)


def as_builtin(measure: Measure) -> Optional[Measure]:
    """porder's built-in entry that computes what ``measure`` computes, or None.

    A built-in, or a copy of one under another name (the same ``kind``,
    ``fn``, ``matrix`` and ``binned``), gives that built-in; anything else
    (a plugin, a control) None. The compiled kernels implement the built-in
    formulas and nothing else.
    """
    key = (measure.kind, measure.fn, measure.matrix, measure.binned)
    for b in _BUILTINS:
        if (b.kind, b.fn, b.matrix, b.binned) == key:
            return b
    return None


_BUILTINS = (
    Measure("entropy", "standalone", True,
            "Shannon entropy of the patch's intensity histogram (bits)", entropy,
            binned=True, origin="porder"),
    Measure("psnr", "standalone", False,
            "peak signal-to-noise ratio of the patch against its own mean (dB)", psnr,
            origin="porder"),
    Measure("mi", "pairwise", True,
            "mutual information H(a)+H(b)-JE(a,b) of co-located pixels (bits)",
            mutual_information, _mi_matrix, binned=True, origin="porder"),
    Measure("je", "pairwise", False,
            "joint entropy of co-located pixel pairs (bits)", joint_entropy, _je_matrix,
            binned=True, origin="porder"),
    Measure("kl", "pairwise", False,
            "KL(reference || candidate) of smoothed intensity histograms (bits)",
            kl_divergence, _kl_matrix, binned=True, origin="porder"),
    Measure("l1", "pairwise", False,
            "mean absolute pixel difference", l1_distance, _l1_matrix, origin="porder"),
    Measure("l2", "pairwise", False,
            "root-mean-square pixel difference", l2_distance, _l2_matrix, origin="porder"),
    Measure("ssim", "pairwise", True,
            "structural similarity, one window over the whole patch", ssim, _ssim_matrix,
            origin="porder"),
)
for _m in _BUILTINS:
    _add(_m)  # through the same checks as any measure (no plugin loading: porder is importing)
for _m in (Measure("none", "control", False, "identity: patches stay where they are",
                   origin="porder"),
           Measure("random", "control", False, "seeded random shuffle of the patches",
                   origin="porder")):
    MEASURES._entries[_m.name] = _m  # the controls: porder's own, never registered from outside
del _m


def get_measure(name: str | Measure) -> Measure:
    """The registry entry for ``name``; ValueError listing the choices otherwise.

    A :class:`Measure` is returned unchanged, so a name is resolved once, where
    it enters (``build_cache``, ``reorder``), and the entry is passed down.
    Installed plugins are loaded the first time a name is not found.
    """
    if isinstance(name, Measure):
        return name
    try:
        return MEASURES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown measure {name!r}; choose one of {', '.join(MEASURES)}"
        ) from None


def measure(name: str, a, b=None, *, bins: int = 256):
    """Compute one measure on uint8 patches, batched over leading axes.

    Parameters
    ----------
    name : str
        A key of :data:`MEASURES` with kind 'standalone' or 'pairwise'.
    a : uint8 array (..., p, p, C)
        Patches (the reference, for a pairwise measure).
    b : uint8 array (..., p, p, C), optional
        Candidate patches, broadcast against ``a``; required for pairwise
        measures, refused for standalone ones.
    bins : int
        Histogram bins for histogram measures, 1 to 256.

    Returns
    -------
    float64 array (...)

    Raises
    ------
    ValueError
        Unknown measure, a control measure, wrong dtype or shape, missing or
        extra ``b``, or bad ``bins``.
    """
    m = get_measure(name)
    bins = check_bins(bins)
    if m.kind == "control":
        raise ValueError(f"measure {m.name!r} is a control ordering and has no values")
    _check_uint8("a", a)
    if m.kind == "standalone":
        if b is not None:
            raise ValueError(f"measure {m.name!r} is standalone and takes no second patch")
        return m.fn(a, bins=bins)
    if b is None:
        raise ValueError(f"measure {m.name!r} is pairwise and needs a second patch b")
    _check_uint8("b", b)
    if a.shape[-3:] != b.shape[-3:]:
        raise ValueError(f"a and b patches differ in shape: {a.shape[-3:]} vs {b.shape[-3:]}")
    a, b = get_array_module(a).broadcast_arrays(a, b)  # every fn sees two arrays of one shape
    return m.fn(a, b, bins=bins)


def score_matrix(name: str, patches, *, bins: int = 256):
    """(N, K, K) scores of a pairwise measure: ``S[:, i, j] = measure(i, j)``."""
    m = get_measure(name)
    if m.kind != "pairwise":
        raise ValueError(f"measure {m.name!r} is not pairwise")
    return pairwise_matrix(m, patches, check_bins(bins))
