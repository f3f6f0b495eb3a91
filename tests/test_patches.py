import numpy as np
import pytest

from porder.patches import apply_perm, invert_perm, merge, restore_images, split


def test_split_is_row_major(xp):
    img = xp.arange(4 * 4 * 1, dtype=xp.uint8).reshape(1, 4, 4, 1)
    p = split(img, 2)  # (1, 4, 2, 2, 1)
    assert p.shape == (1, 4, 2, 2, 1)
    # patch (0, 1) is index 1: rows 0-1, columns 2-3
    assert p[0, 1, :, :, 0].tolist() == [[2, 3], [6, 7]]
    assert (merge(p) == img).all()


@pytest.mark.parametrize("patch", [1, 2, 4, 8, 16, 32])
def test_split_merge_roundtrip(xp, patch):
    rng = np.random.default_rng(0)
    img = xp.asarray(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    assert (merge(split(img, patch)) == img).all()


def test_patch_must_divide():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="patch size 5 does not divide the image size 32"):
        split(img, 5)


def test_perm_apply_and_invert(xp):
    rng = np.random.default_rng(1)
    img = xp.asarray(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    perm = xp.asarray(np.stack([rng.permutation(16) for _ in range(5)]))
    pt = split(img, 8)
    moved = apply_perm(pt, perm)
    assert (moved[2, 3] == pt[2, int(perm[2, 3])]).all()
    assert (apply_perm(moved, invert_perm(perm)) == pt).all()
    assert (restore_images(merge(moved), perm, 8) == img).all()


@pytest.mark.parametrize("patch", [1, 4, 8, 16, 32])
def test_apply_perm_is_a_per_image_gather(xp, patch):
    """Against NumPy's take_along_axis (an independent formulation of the same gather),
    for any permutation, repeated indices included."""
    rng = np.random.default_rng(patch)
    img = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    k = (32 // patch) ** 2
    perm = rng.integers(0, k, (6, k))  # not even a permutation: any indices gather
    pt = split(img, patch)
    expected = np.take_along_axis(pt, perm.reshape(6, k, 1, 1, 1), axis=1)
    got = apply_perm(xp.asarray(pt), xp.asarray(perm))
    np.testing.assert_array_equal(got.get() if hasattr(got, "get") else got, expected)
    empty = apply_perm(xp.zeros((0, k, patch, patch, 3), xp.uint8), xp.zeros((0, k), xp.int64))
    assert empty.shape == (0, k, patch, patch, 3)


def test_apply_perm_refuses_indices_of_other_images():
    pt = split(np.zeros((2, 8, 8, 3), np.uint8), 4)  # (2, 4, 4, 4, 3)
    with pytest.raises(IndexError, match="outside 0..3"):
        apply_perm(pt, np.array([[0, 1, 2, 4], [0, 1, 2, 3]]))  # 4 would be image 1's patch 0
    with pytest.raises(IndexError, match="outside 0..3"):
        apply_perm(pt, np.array([[0, 1, 2, -1], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match=r"perm has shape \(2, 3\), patches need \(2, 4\)"):
        apply_perm(pt, np.zeros((2, 3), np.int64))
