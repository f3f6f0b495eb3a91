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
