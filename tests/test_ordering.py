"""POR ordering: the greedy chain against a pure-Python reference, and properties."""
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import porder
from porder import MEASURES, reorder, split
from porder.ordering import greedy_chain, random_order, sort_order

from . import reference as ref

PAIRWISE = [n for n, m in MEASURES.items() if m.kind == "pairwise"]
REF_FN = {"mi": lambda a, b: ref.entropy(a) + ref.entropy(b) - ref.joint_entropy(a, b),
          "je": ref.joint_entropy, "kl": ref.kl, "l1": ref.l1, "l2": ref.l2, "ssim": ref.ssim}


def photo_like(n, seed):
    """Images with smooth structure and noise, so scores rarely tie."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    img = (rng.uniform(0, 255, (n, 1, 1, 3)) * (np.sin(x / rng.uniform(2, 9)) + 1)[None, ..., None] / 2
           + rng.normal(0, 20, (n, 32, 32, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("patch", [4, 8, 16])
@pytest.mark.parametrize("name", PAIRWISE)
def test_chain_matches_pure_python(name, patch):
    imgs = photo_like(2 if patch > 4 else 1, seed=patch)
    _, perm = reorder(imgs, name, patch)
    m = MEASURES[name]
    for i, img in enumerate(imgs):
        pt = split(img[None], patch)[0]
        cache = {}

        def score(a, b):
            if (a, b) not in cache:
                cache[a, b] = REF_FN[name](pt[a], pt[b])
            return cache[a, b]

        want = ref.greedy_chain(score, len(pt), higher_is_better=m.descending)
        assert perm[i].tolist() == want


def test_chain_ties_go_to_lowest_index():
    mat = np.zeros((1, 4, 4))
    assert greedy_chain(mat, descending=True).tolist() == [[0, 1, 2, 3]]
    mat[0, 0, 3] = mat[0, 0, 2] = 1.0
    assert greedy_chain(mat, descending=True).tolist() == [[0, 2, 1, 3]]
    assert greedy_chain(mat, descending=True, reference=3).tolist() == [[3, 0, 2, 1]]
    mat[0, 0, 1] = np.nan  # NaN ranks last
    assert greedy_chain(mat, descending=True)[0, :2].tolist() == [0, 2]


def test_standalone_sort_is_stable_and_flippable():
    scores = np.array([[3.0, 1.0, 3.0, 2.0]])
    assert sort_order(scores, descending=True).tolist() == [[0, 2, 3, 1]]
    assert sort_order(scores, descending=False).tolist() == [[1, 3, 0, 2]]


@pytest.mark.parametrize("name", ["entropy", "psnr"])
def test_standalone_reorder_sorts_scores(name):
    imgs = photo_like(3, seed=5)
    out, perm = reorder(imgs, name, 8)
    scores = porder.measure(name, split(out, 8))
    desc = MEASURES[name].descending
    assert np.all(np.diff(scores, axis=1) <= 0 if desc else np.diff(scores, axis=1) >= 0)
    _, flipped = reorder(imgs, name, 8, descending=not desc)
    s2 = porder.measure(name, split(imgs, 8))
    assert np.array_equal(flipped, np.argsort(-s2 if not desc else s2, axis=1, kind="stable"))


def test_none_is_identity_and_random_is_seeded():
    imgs = photo_like(4, seed=3)
    out, perm = reorder(imgs, "none", 8)
    assert np.array_equal(out, imgs) and np.array_equal(perm, np.tile(np.arange(16), (4, 1)))
    _, r1 = reorder(imgs, "random", 8, seed=7)
    _, r2 = reorder(imgs, "random", 8, seed=7)
    _, r3 = reorder(imgs, "random", 8, seed=8)
    assert np.array_equal(r1, r2) and not np.array_equal(r1, r3)
    assert not np.array_equal(r1[0], r1[1])  # each image gets its own shuffle
    # keyed by dataset index, not by position in the batch
    assert np.array_equal(random_order(2, 16, np, seed=7, start=2), r1[2:])


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(list(MEASURES)), patch=st.sampled_from([4, 8, 16]),
       n=st.integers(1, 5), seed=st.integers(0, 2**16), reference=st.integers(0, 3))
def test_output_is_a_permutation_of_input_patches(name, patch, n, seed, reference):
    rng = np.random.default_rng(seed)
    imgs = (rng.integers(0, 256, (n, 32, 32, 3)) // rng.choice([1, 32, 128])).astype(np.uint8)
    out, perm = reorder(imgs, name, patch, reference=reference, seed=seed)
    k = (32 // patch) ** 2
    assert perm.shape == (n, k) and perm.dtype == np.int64
    assert np.array_equal(np.sort(perm, axis=1), np.tile(np.arange(k), (n, 1)))
    if MEASURES[name].kind == "pairwise":
        assert (perm[:, 0] == reference).all()
    for i in range(n):  # pixel multiset preserved per image
        assert np.array_equal(np.sort(out[i].ravel()), np.sort(imgs[i].ravel()))
    restored = porder.restore_images(out, perm, patch)
    assert np.array_equal(restored, imgs)
    assert np.array_equal(porder.apply_perm(split(imgs, patch), perm), split(out, patch))


@pytest.mark.parametrize("name", list(MEASURES))
def test_results_do_not_depend_on_batch_size(name, monkeypatch):
    imgs = photo_like(9, seed=11)
    full = reorder(imgs, name, 4, seed=3)
    parts = [reorder(imgs[i:i + 4], name, 4, seed=3, start=i) for i in range(0, 9, 4)]
    assert np.array_equal(full[1], np.concatenate([p[1] for p in parts]))
    assert np.array_equal(full[0], np.concatenate([p[0] for p in parts]))
    monkeypatch.setattr(sys.modules["porder.reorder"], "CHUNK_BYTES", 1)  # one image per chunk, threads
    assert np.array_equal(reorder(imgs, name, 4, seed=3)[1], full[1])


def test_reorder_on_real_photographs(real_images):
    out, perm = reorder(real_images, "mi", 8)
    assert np.array_equal(porder.restore_images(out, perm, 8), real_images)
    # the chain puts a more similar patch next than a random neighbour would be
    pt = split(real_images, 8)
    mi_next = porder.measure("mi", porder.apply_perm(pt, perm)[:, :-1],
                             porder.apply_perm(pt, perm)[:, 1:]).mean()
    mi_orig_rand = porder.measure("mi", pt[:, 0:1], pt[:, 1:]).mean()
    assert mi_next[()] > 0 and np.isfinite(mi_orig_rand)


def test_reorder_bad_input():
    imgs = np.zeros((2, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="patch size 6 does not divide the image size 32"):
        reorder(imgs, "mi", 6)
    with pytest.raises(ValueError, match="unknown measure"):
        reorder(imgs, "nope", 8)
    with pytest.raises(ValueError, match="reference patch 16 is out of range"):
        reorder(imgs, "mi", 8, reference=16)
    with pytest.raises(ValueError, match="uint8"):
        reorder(imgs.astype(np.float32), "mi", 8)
    with pytest.raises(ValueError, match=r"shape \(N, S, S, C\)"):
        reorder(imgs[0], "mi", 8)
    with pytest.raises(ValueError, match="device="):
        reorder(imgs, "mi", 8, device="tpu")


def test_cuda_without_gpu_is_a_clear_error():
    if porder.backend.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="device='cuda'"):
        reorder(np.zeros((1, 32, 32, 3), np.uint8), "mi", 8, device="cuda")
    out, _ = reorder(np.zeros((1, 32, 32, 3), np.uint8), "mi", 8, device="auto")
    assert out.shape == (1, 32, 32, 3)
