"""The compiled CPU kernels at native resolution (issue 21): the generic path's permutations.

Above 64 pixels a patch, ``mi`` and ``je`` order candidates by value classes of the
reference compared in byte lanes (``_cpu_kernels._channel_product``; classes over
``CLASS_COMPARE_MAX`` pixels by counters per lane, ``_table_class``). The images here
reach every branch of it: photo-like gradients (classes of a few pixels), pure noise
(classes of two and three), flat images (one class per patch: every candidate ties),
two-level images (classes either side of ``CLASS_COMPARE_MAX``, products far past
float64 between exponent renormalisations) and coarse bins. A few images each, so the
suite stays fast; ``benchmarks/bench_equivalence.py`` sweeps wider.
"""
from __future__ import annotations

import numpy as np
import pytest

import porder
from porder.kernels import _cpu_kernels as k
from porder.kernels import cpu


def photo_like(n: int, size: int, seed: int) -> np.ndarray:
    """bench_core's photo-like recipe (gradients, an edge, noise) at any size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    ramp = (rng.uniform(-80, 80, (n, 1, 1, 3)) * x[None, ..., None]
            + rng.uniform(-80, 80, (n, 1, 1, 3)) * y[None, ..., None])
    edge = ((x[None] > rng.uniform(0.2, 0.8, (n, 1, 1)))[..., None]
            * rng.uniform(-60, 60, (n, 1, 1, 3)))
    img = base + ramp + edge + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_kind(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (n, size, size, 3)
    if kind == "photo":
        return photo_like(n, size, seed)
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "flat":
        return np.full(shape, 77, np.uint8)
    if kind == "levels":  # two values at random: classes of about half a patch each
        return np.where(rng.random(shape) < 0.5, 20, 230).astype(np.uint8)
    raise ValueError(kind)


def assert_same(images, measure, patch, **kw):
    got = porder.reorder(images, measure, patch, backend="compiled", **kw)[1]
    want = porder.reorder(images, measure, patch, backend="generic", **kw)[1]
    bad = np.flatnonzero((got != want).any(axis=1))
    assert bad.size == 0, f"{measure} p{patch} {kw}: images {bad.tolist()} differ"


@pytest.mark.parametrize("kind", ["photo", "noise", "flat", "levels"])
@pytest.mark.parametrize("measure", ["mi", "je"])
@pytest.mark.parametrize("size,patch,n", [(64, 8, 3), (64, 16, 4), (128, 16, 2), (128, 32, 3),
                                          (224, 16, 1), (256, 32, 1)])
def test_mi_je_same_as_generic_at_native_sizes(size, patch, n, measure, kind):
    assert_same(image_kind(kind, n, size, seed=size + patch), measure, patch)


@pytest.mark.parametrize("bins", [2, 16])
@pytest.mark.parametrize("measure", ["mi", "je"])
def test_coarse_bins_make_classes_past_the_compare_limit(measure, bins):
    # 16 or 2 bins over 256 or 1024 pixels: classes of 100+ pixels, some counted by table
    for size, patch in ((64, 16), (64, 32)):
        x = photo_like(3, size, seed=bins)
        g = size // patch
        q = (x.astype(np.int64) * bins // 256).reshape(3, g, patch, g, patch, 3)
        q = q.transpose(0, 1, 3, 5, 2, 4).reshape(-1, patch * patch)
        assert max(np.bincount(row).max() for row in q) > k.CLASS_COMPARE_MAX
        assert_same(x, measure, patch, bins=bins)


@pytest.mark.parametrize("measure", ["mi", "je"])
def test_reference_and_direction_at_native_sizes(measure):
    x = photo_like(2, 128, seed=5)
    flip = not porder.MEASURES[measure].descending
    assert_same(x, measure, 16, reference=37, descending=flip)
    assert_same(x, measure, 16, reference=5)


@pytest.mark.parametrize("measure", ["kl", "l1", "l2", "ssim", "entropy", "psnr"])
def test_other_measures_same_as_generic_at_native_sizes(measure):
    for kind in ("photo", "levels"):
        assert_same(image_kind(kind, 2, 128, seed=11), measure, 16)
        assert_same(image_kind(kind, 1, 128, seed=12), measure, 32)


def test_a_thousand_patches():
    # K = 1024: mi's lanes at 128 p4, the other measures at 256 p8 (generic mi there
    # takes 40 s an image)
    assert_same(photo_like(1, 128, seed=3), "mi", 4)
    x = photo_like(1, 256, seed=4)
    for measure in ("kl", "l1", "ssim", "entropy"):
        assert_same(x, measure, 8)
    perm = porder.reorder(x, "mi", 8, backend="compiled")[1]
    assert sorted(perm[0].tolist()) == list(range(1024))


def test_scratch_grows_with_patches_not_their_square():
    # one thread's scratch at K = 1024 is a few bytes per patch pixel, whatever the measure
    for code in cpu.IMPLEMENTS.values():
        for n in (16, 64, 256):
            small = sum(a.nbytes for a in cpu._scratch(code, n, 256, 3, 256))
            big = sum(a.nbytes for a in cpu._scratch(code, n, 256, 3, 1024))
            assert big <= 4 * small + 2**20
            assert big <= 2**21


def test_stop_flag_ends_a_large_image_within_a_step():
    x = photo_like(1, 224, seed=6)
    args = cpu._arguments("mi", 16, 256, 0, True)
    scratch = cpu._scratch(k.MI, 256, 256, 3, 196)
    out, perm = np.empty_like(x), np.full((1, 196), -1, np.int64)
    k.reorder_range(x, 0, 1, *args, *scratch, out, perm, np.ones(1, np.uint8))
    assert (perm == -1).all()  # stopped before the first image
