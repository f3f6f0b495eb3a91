"""Exactness of the compiled CPU kernels where their shortcuts are most at risk.

The lanes of ``mi``, ``je`` and ``kl`` order candidates by a product of counts
(``porder.kernels._cpu_kernels._count_product_band``) and score exactly only those
near the best. Products of one channel span up to 2^+-530, so one image's
spread between candidates can pass float64's range: the images here make that
spread as large as possible (per patch and channel, a flat, a narrow or a
full-range histogram, chosen at random), next to the image that exposed the
underflow of the first version (issue 21). The full sweep (20,000 images, every
measure, patches 4, 8 and 16) is ``benchmarks/bench_equivalence.py``.
"""
from __future__ import annotations

import numpy as np
import pytest

import porder
from benchmarks.bench_core import images as bench_core_images  # the issue's image recipe
from porder import MEASURES

SCORED = [n for n, m in MEASURES.items() if m.kind != "control"]


def spread_images(n: int, seed: int, size: int = 32, patch: int = 8,
                  channels: int = 3) -> np.ndarray:
    """Images whose patches differ most between channels (a wide spread of products).

    Each patch channel is, at random, flat (one value), narrow (2-4 nearby
    values), two-level or full-range noise: a candidate then matches the
    reference well in one channel and badly in another, so the products of
    counts of two candidates can differ by far more than float64's range.
    """
    rng = np.random.default_rng(seed)
    g = size // patch
    out = np.empty((n, g, g, channels, patch, patch), np.uint8)
    mode = rng.integers(0, 4, (n, g, g, channels))
    base = rng.integers(0, 252, (n, g, g, channels, 1, 1))
    shape = out.shape
    out[...] = np.where((mode == 0)[..., None, None], base,
               np.where((mode == 1)[..., None, None], base + rng.integers(0, 4, shape),
               np.where((mode == 2)[..., None, None], np.where(rng.random(shape) < 0.5, 0, 255),
                        rng.integers(0, 256, shape))))
    return np.ascontiguousarray(out.transpose(0, 1, 4, 2, 5, 3)).reshape(n, size, size, channels)


def mismatches(images, measure, patch, **kw) -> np.ndarray:
    """Indices of the images whose compiled and generic permutations differ."""
    got = porder.reorder(images, measure, patch, backend="compiled", **kw)[1]
    want = porder.reorder(images, measure, patch, backend="generic", **kw)[1]
    return np.flatnonzero((got != want).any(axis=1))


def test_kl_regression_image_of_issue_21():
    # images(6000, seed=3)[3759] of bench_core: at step 13 (reference 15) the
    # product of candidate 3 fell below 2^-1074 in channel 1 and became 0, so
    # patch 4 (KL 7.5706) won over patch 3 (KL 7.4828)
    img = bench_core_images(6000, seed=3)[3759:3760]
    perm = porder.reorder(img, "kl", 8, backend="compiled")[1]
    assert perm[0].tolist() == [0, 1, 5, 8, 12, 9, 13, 10, 6, 7, 11, 14, 15, 3, 2, 4]
    assert perm.tolist() == porder.reorder(img, "kl", 8, backend="generic")[1].tolist()


@pytest.mark.parametrize("patch", [4, 8, 16])
@pytest.mark.parametrize("measure", SCORED)
def test_same_as_generic_on_wide_product_spreads(measure, patch):
    imgs = spread_images(150, seed=patch, patch=patch)
    bad = mismatches(imgs, measure, patch)
    assert bad.size == 0, f"{measure} p{patch}: images {bad.tolist()} differ"


@pytest.mark.parametrize("measure", ["mi", "je", "kl"])
@pytest.mark.parametrize("channels", [1, 12])
def test_same_as_generic_on_wide_spreads_other_channel_counts(measure, channels):
    # 12 channels at 8x8: twelve channels of 2^+-530 each, far past float64
    for patch in (4, 8):
        imgs = spread_images(40, seed=channels, patch=patch, channels=channels)
        bad = mismatches(imgs, measure, patch)
        assert bad.size == 0, f"{measure} p{patch} C{channels}: images {bad.tolist()} differ"


@pytest.mark.parametrize("measure", ["mi", "je", "kl"])
def test_same_as_generic_on_wide_spreads_reversed(measure):
    # the opposite direction inverts the products: the far ones overflow instead
    flipped = not MEASURES[measure].descending
    for patch in (4, 8):
        imgs = spread_images(60, seed=11, patch=patch)
        bad = mismatches(imgs, measure, patch, descending=flipped)
        assert bad.size == 0, f"{measure} p{patch} reversed: images {bad.tolist()} differ"


def exact_tie(measure: str, swap: bool, reverse: bool = False) -> np.ndarray:
    """One 32x32 image of 12 channels, patches of 8, built so that patches 1 and 2 tie
    exactly, one far ahead in channels 0-5 and the other in channels 6-11.

    The product of counts of the one behind first falls ~2^-384 per channel,
    far below float64's range, before it catches up: the tie (to the lower
    index) is only found if the products keep their exponents. ``swap`` puts
    the other one at index 1. The 13 other patches lose in the measure's
    direction (``reverse``: the opposite one).
    """
    rng = np.random.default_rng(0)
    C, n = 12, 64
    uniq = np.stack([rng.permutation(64) * 4 for _ in range(C)], axis=1)  # (n, C) distinct
    flat = np.full((n, C), 1)
    ref = flat if measure == "je" else uniq
    other = uniq if measure == "je" else flat  # the worst candidate in every channel
    if reverse:
        other = ref  # the best one
    early = np.where(np.arange(C) < 6, flat, ref if measure != "je" else uniq)
    late = np.where(np.arange(C) < 6, ref if measure != "je" else uniq, flat)
    patches = [ref, late, early] if swap else [ref, early, late]
    patches += [other] * 13
    q = np.stack(patches).reshape(4, 4, 8, 8, C).transpose(0, 2, 1, 3, 4)
    return q.reshape(1, 32, 32, C).astype(np.uint8)


@pytest.mark.parametrize("measure", ["mi", "je", "kl"])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_exact_ties_across_channels_beyond_float64_range(measure, swap, reverse):
    img = exact_tie(measure, swap, reverse)
    kw = {"descending": not MEASURES[measure].descending} if reverse else {}
    got = porder.reorder(img, measure, 8, backend="compiled", **kw)[1]
    want = porder.reorder(img, measure, 8, backend="generic", **kw)[1]
    assert want[0, 1] == 1  # the tie: the lower index wins
    assert got.tolist() == want.tolist()
