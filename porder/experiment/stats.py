"""Paired statistics of a comparison: runs of two orderings that share a seed are a pair.

Pure Python (``math`` only): the Student t distribution (:func:`t_cdf`,
:func:`t_ppf`), the t interval and paired t test on the differences of paired
runs (:func:`paired_difference`), and the one-line verdict a comparison prints
(:func:`verdict`). The tests check every number against ``scipy.stats``
(``t.cdf``, ``t.ppf``, ``ttest_rel`` and its confidence interval).

Why a t interval: a comparison has few seeds (3-10), each seed gives one paired
difference, and the t interval is the standard, exact-under-normality interval
for the mean of a few paired differences. A bootstrap interval is not offered:
with 3-5 pairs it has only a handful of distinct resamples and is too narrow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

LEVEL = 0.95  # confidence level of every interval porder reports


# ----------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(ln_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(x: float, df: float) -> float:
    """Cumulative distribution function of Student's t with ``df`` degrees of freedom.

    Parameters
    ----------
    x : float
    df : float
        Degrees of freedom, > 0.

    Returns
    -------
    float
        P(T <= x), to about 1e-12 (``scipy.stats.t.cdf``).
    """
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + x * x))   # P(T > |x|)
    return 1.0 - tail if x >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """Quantile function of Student's t: the x with ``t_cdf(x, df) == q``.

    Parameters
    ----------
    q : float
        Probability, 0 < q < 1.
    df : float
        Degrees of freedom, > 0.

    Returns
    -------
    float
        The quantile, to about 1e-10 relative (``scipy.stats.t.ppf``).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"probability must be strictly between 0 and 1, got {q}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:          # bracket: the t of df=1 at q=0.9995 is 636.6
        lo, hi = hi, hi * 2.0
    for _ in range(200):              # bisection: 200 halvings reach float resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ----------------------------------------------------------- paired samples
@dataclass(frozen=True)
class PairedDifference:
    """Mean of the paired differences ``a[i] - b[i]`` with its t interval and t test.

    ``lo``/``hi``/``t``/``p`` are None with fewer than 2 pairs (no interval
    exists); with 2+ pairs whose differences are all equal the interval is that
    single value (``sd`` 0) and ``t``/``p`` are None.
    """

    n: int                      # pairs used
    mean: Optional[float]       # mean difference (None: no pair)
    sd: Optional[float]         # sample standard deviation of the differences (n - 1)
    lo: Optional[float]         # the interval at ``level``
    hi: Optional[float]
    t: Optional[float]          # paired t statistic, mean / (sd / sqrt(n))
    p: Optional[float]          # its two-sided p-value
    level: float = LEVEL

    @property
    def has_interval(self) -> bool:
        return self.lo is not None

    def sign(self) -> int:
        """+1: the interval lies above 0; -1: below 0; 0: it holds 0 or does not exist."""
        if not self.has_interval:
            return 0
        if self.lo > 0:
            return 1
        if self.hi < 0:
            return -1
        return 0


def paired_difference(a: Sequence[float], b: Sequence[float],
                      level: float = LEVEL) -> PairedDifference:
    """Paired difference ``a - b`` over seeds: mean, t interval and paired t test.

    Parameters
    ----------
    a, b : sequences of float or None, same length
        One value per seed (``a[i]`` and ``b[i]`` share seed i). Pairs where
        either value is None (e.g. a run that never reached a target) are
        dropped; ``n`` counts the pairs kept.
    level : float
        Confidence level of the interval, 0 < level < 1.

    Returns
    -------
    PairedDifference
        ``mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)``; ``t``/``p`` are those
        of ``scipy.stats.ttest_rel(a, b)``.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be strictly between 0 and 1, got {level}")
    d = [float(x) - float(y) for x, y in zip(a, b) if x is not None and y is not None]
    n = len(d)
    if n == 0:
        return PairedDifference(0, None, None, None, None, None, None, level)
    mean = math.fsum(d) / n
    if n == 1:
        return PairedDifference(1, mean, None, None, None, None, None, level)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        return PairedDifference(n, mean, 0.0, mean, mean, None, None, level)
    se = sd / math.sqrt(n)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    t = mean / se
    p = 2.0 * t_cdf(-abs(t), n - 1)
    return PairedDifference(n, mean, sd, mean - half, mean + half, t, p, level)


# ------------------------------------------------------------------ verdict
def verdict(auc: PairedDifference, steps: PairedDifference, n_seeds: int) -> str:
    """One-line verdict on "does this ordering train faster than the other?".

    Parameters
    ----------
    auc : PairedDifference
        Difference of the area under the test-accuracy curve (ordering minus
        reference): above 0 means the ordering learns sooner.
    steps : PairedDifference
        Difference of the steps to the target accuracy: below 0 means faster.
    n_seeds : int
        Seeds of the comparison (for the wording).

    Returns
    -------
    str
        ``"faster"`` when one interval shows the ordering faster (AUC interval
        above 0, or steps interval below 0) and the other does not show it
        slower; ``"slower"`` symmetrically; ``"mixed (AUC ..., steps ...)"`` when
        the two intervals disagree; ``"n/a (1 seed)"`` with a single seed;
        otherwise ``"no detectable difference at N seeds"``.
    """
    if n_seeds < 2:
        return "n/a (1 seed)"
    s_auc, s_steps = auc.sign(), -steps.sign()      # +1 = faster for both
    if s_auc and s_steps and s_auc != s_steps:
        word = lambda s: "faster" if s > 0 else "slower"
        return f"mixed (AUC: {word(s_auc)}, steps to target: {word(s_steps)})"
    s = s_auc or s_steps
    if s > 0:
        return "faster"
    if s < 0:
        return "slower"
    return f"no detectable difference at {n_seeds} seeds"
