"""porder.experiment.stats against scipy.stats on fixed numbers."""
from __future__ import annotations

import math

import pytest

from porder.experiment.stats import (
    PairedDifference,
    paired_difference,
    t_cdf,
    t_ppf,
    verdict,
)

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 9, 14, 29, 100, 2.5])
@pytest.mark.parametrize("x", [-40.0, -3.2, -1.0, -0.1, 0.0, 0.3, 1.7, 2.776, 12.7, 500.0])
def test_t_cdf_matches_scipy(x, df):
    assert t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), rel=1e-10, abs=1e-13)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 30, 1000, 0.5])
@pytest.mark.parametrize("q", [0.0005, 0.025, 0.1, 0.5, 0.75, 0.975, 0.995, 0.9995])
def test_t_ppf_matches_scipy(q, df):
    assert t_ppf(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-9, abs=1e-12)


def test_known_quantiles():
    # Textbook table values of t_{0.975, df}.
    for df, want in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (30, 2.042)):
        assert round(t_ppf(0.975, df), 3) == want


def test_bad_arguments():
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        t_ppf(1.0, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_cdf(0.5, 0)
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1, 2], [1])


PAIRS = [
    ([0.61, 0.58, 0.66, 0.59, 0.63], [0.55, 0.57, 0.60, 0.52, 0.61]),     # clearly higher
    ([0.50, 0.52, 0.49], [0.51, 0.50, 0.50]),                             # noise
    ([300, 250, 400, 350], [500, 450, 400, 650]),                          # steps: fewer
    ([1.0, 2.0], [0.5, 0.25]),                                             # 2 pairs
    ([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.15], [0.3, 0.3, 0.1, 0.6, 0.6, 0.5, 0.2]),
]


@pytest.mark.parametrize("a, b", PAIRS)
def test_paired_difference_matches_ttest_rel(a, b):
    got = paired_difference(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    d = [x - y for x, y in zip(a, b)]
    assert got.n == len(a)
    assert got.mean == pytest.approx(sum(d) / len(d), rel=1e-12)
    assert got.t == pytest.approx(ref.statistic, rel=1e-9)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-8)
    assert got.lo == pytest.approx(ci.low, rel=1e-9)
    assert got.hi == pytest.approx(ci.high, rel=1e-9)
    # The interval by hand: mean +- t.ppf(0.975, n-1) * sd / sqrt(n).
    sd = scipy_stats.tstd(d)
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    assert got.hi - got.mean == pytest.approx(half, rel=1e-9)


def test_other_level_matches_scipy():
    a, b = PAIRS[0]
    got = paired_difference(a, b, level=0.9)
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.9)
    assert (got.lo, got.hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_missing_values_drop_their_pair():
    got = paired_difference([300, None, 400, 350], [500, 450, None, 650])
    ref = paired_difference([300, 350], [500, 650])
    assert got == ref and got.n == 2


def test_degenerate_cases():
    one = paired_difference([0.6], [0.5])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and not one.has_interval
    assert one.sign() == 0
    none = paired_difference([None], [0.5])
    assert none.n == 0 and none.mean is None
    same = paired_difference([400, 500, 600], [300, 400, 500])   # every difference is +100
    assert (same.lo, same.hi, same.sd) == (100.0, 100.0, 0.0) and same.sign() == 1


def _pd(lo, hi):
    return PairedDifference(3, (lo + hi) / 2, 1.0, lo, hi, None, None)


NA = PairedDifference(0, None, None, None, None, None, None)


def test_verdict_reads_the_intervals():
    assert verdict(_pd(0.01, 0.05), _pd(-10, 10), 3) == "faster"         # AUC higher
    assert verdict(_pd(-0.01, 0.05), _pd(-300, -50), 3) == "faster"      # fewer steps
    assert verdict(_pd(-0.05, -0.01), NA, 5) == "slower"
    assert verdict(_pd(-0.01, 0.01), _pd(20, 300), 3) == "slower"         # more steps
    assert verdict(_pd(-0.01, 0.01), _pd(-5, 5), 4) == "no detectable difference at 4 seeds"
    assert verdict(_pd(0.01, 0.02), _pd(10, 30), 3).startswith("mixed")
    assert verdict(paired_difference([0.7], [0.5]), NA, 1) == "n/a (1 seed)"
