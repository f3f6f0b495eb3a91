"""Each measure against an independent reference (scipy, scikit-learn, tests/reference.py)."""
import math

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy
from sklearn.metrics import mutual_info_score

import porder
from porder import MEASURES, measure, score_matrix, split

from . import reference as ref

RNG = np.random.default_rng(20261125)
PAIRWISE = [n for n, m in MEASURES.items() if m.kind == "pairwise"]


def random_patches(n, p, levels=256, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, levels, (n, p, p, 3)) * (256 // levels)).astype(np.uint8)


def structured_patches(n, p, seed=1):
    """Smooth gradients plus noise: patches with shared structure, like photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:p, 0:p]
    base = rng.uniform(0, 200, (n, 1, 1, 3)) + rng.uniform(-6, 6, (n, 1, 1, 3)) * x[..., None]
    return np.clip(base + rng.normal(0, 8, (n, p, p, 3)), 0, 255).astype(np.uint8)


CASES = {
    "random": random_patches(6, 8),
    "coarse": random_patches(6, 4, levels=8, seed=2),
    "structured": structured_patches(6, 16),
}


@pytest.mark.parametrize("case", CASES)
def test_entropy_matches_scipy(case):
    a = CASES[case]
    got = measure("entropy", a)
    for i in range(len(a)):
        want = np.mean([scipy_entropy(np.bincount(a[i, ..., c].ravel(), minlength=256), base=2)
                        for c in range(3)])
        assert got[i] == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_mi_matches_sklearn(case):
    a = CASES[case]
    b = np.roll(a, 1, axis=0)
    got = measure("mi", a, b)
    for i in range(len(a)):
        want = np.mean([mutual_info_score(a[i, ..., c].ravel(), b[i, ..., c].ravel())
                        for c in range(3)]) / math.log(2)
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bins", [256, 16, 3])
@pytest.mark.parametrize("case", CASES)
def test_histogram_measures_match_reference(case, bins):
    a = CASES[case]
    b = np.roll(a, 1, axis=0)
    for i in range(len(a)):
        assert measure("entropy", a[i], bins=bins) == pytest.approx(ref.entropy(a[i], bins))
        assert measure("je", a[i], b[i], bins=bins) == pytest.approx(
            ref.joint_entropy(a[i], b[i], bins))
        assert measure("kl", a[i], b[i], bins=bins) == pytest.approx(ref.kl(a[i], b[i], bins))
        mi = ref.entropy(a[i], bins) + ref.entropy(b[i], bins) - ref.joint_entropy(a[i], b[i], bins)
        assert measure("mi", a[i], b[i], bins=bins) == pytest.approx(mi, abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_pixel_measures_match_reference(case):
    a = CASES[case]
    b = np.roll(a, 1, axis=0)
    for i in range(len(a)):
        assert measure("l1", a[i], b[i]) == pytest.approx(ref.l1(a[i], b[i]), rel=1e-12)
        assert measure("l2", a[i], b[i]) == pytest.approx(ref.l2(a[i], b[i]), rel=1e-12)
        assert measure("ssim", a[i], b[i]) == pytest.approx(ref.ssim(a[i], b[i]), rel=1e-9)
        assert measure("psnr", a[i]) == pytest.approx(ref.psnr(a[i]), rel=1e-12)


def test_measures_on_real_photographs(real_images):
    pt = split(real_images, 8)[:3]  # (3, 16, 8, 8, 3)
    a, b = pt[:, 0], pt[:, 5]
    for i in range(3):
        assert measure("mi", a[i], b[i]) == pytest.approx(
            ref.entropy(a[i]) + ref.entropy(b[i]) - ref.joint_entropy(a[i], b[i]), abs=1e-12)
        assert measure("ssim", a[i], b[i]) == pytest.approx(ref.ssim(a[i], b[i]), rel=1e-9)
        assert measure("kl", a[i], b[i]) == pytest.approx(ref.kl(a[i], b[i]))
        assert measure("l1", a[i], b[i]) == pytest.approx(ref.l1(a[i], b[i]))
        assert measure("psnr", a[i]) == pytest.approx(ref.psnr(a[i]))


def test_known_values():
    flat = np.full((4, 4, 3), 7, np.uint8)
    half = np.zeros((4, 4, 3), np.uint8)
    half[:2] = 255
    assert measure("entropy", flat) == 0.0
    assert measure("entropy", half) == pytest.approx(1.0)
    assert measure("mi", half, half) == pytest.approx(1.0)  # MI(a, a) = H(a)
    assert measure("je", half, flat) == pytest.approx(1.0)
    assert measure("ssim", half, half) == pytest.approx(1.0)
    assert measure("l1", half, flat) == pytest.approx((248 * 8 + 7 * 8) / 16)
    assert measure("kl", half, half) == pytest.approx(0.0, abs=1e-15)
    # flat patch: the 1/12 noise floor keeps PSNR finite
    assert measure("psnr", flat) == pytest.approx(10 * math.log10(255**2 * 12))


def test_batched_broadcasting():
    a = random_patches(4, 8)
    got = measure("mi", a[:, None], a[None, :])  # (4, 4)
    assert got.shape == (4, 4)
    assert got[1, 2] == pytest.approx(measure("mi", a[1], a[2]))
    assert np.allclose(np.diag(got), measure("entropy", a))


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("patch", [4, 8, 16])
def test_score_matrix_equals_pair_function(xp, name, patch):
    rng = np.random.default_rng(patch)
    imgs = (rng.integers(0, 256, (3, 32, 32, 3)) // 16 * 16).astype(np.uint8)
    pt = xp.asarray(split(imgs, patch))
    mat = score_matrix(name, pt)
    pair = measure(name, pt[:, :, None], pt[:, None, :])
    k = pt.shape[1]
    off = ~np.eye(k, dtype=bool)
    diff = xp.abs(mat - pair)[:, xp.asarray(off)]
    assert float(diff.max()) <= 1e-9


def test_bad_input():
    a = random_patches(2, 4)
    with pytest.raises(ValueError, match="unknown measure 'mutual'"):
        measure("mutual", a, a)
    with pytest.raises(ValueError, match="needs a second patch"):
        measure("mi", a)
    with pytest.raises(ValueError, match="takes no second patch"):
        measure("entropy", a, a)
    with pytest.raises(ValueError, match="uint8"):
        measure("mi", a.astype(np.float32), a)
    with pytest.raises(ValueError, match="bins must be"):
        measure("mi", a, a, bins=0)
    with pytest.raises(ValueError, match="control"):
        measure("random", a)
    with pytest.raises(ValueError, match="differ in shape"):
        measure("mi", a, random_patches(2, 8))


def test_registry_is_complete():
    assert set(MEASURES) == {"entropy", "psnr", "mi", "je", "kl", "l1", "l2", "ssim",
                             "none", "random"}
    for m in MEASURES.values():
        assert m.summary and m.kind in {"standalone", "pairwise", "control"}
        assert (m.fn is None) == (m.kind == "control")
        assert (m.matrix is not None) == (m.kind == "pairwise")
    assert porder.get_measure("mi").descending and not porder.get_measure("je").descending
