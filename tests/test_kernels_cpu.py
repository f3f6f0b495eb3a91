"""The numba CPU kernels (porder.kernels.cpu) against the generic NumPy path.

The generic path (``porder.reorder(..., backend='generic')``: score matrices
from porder.measures and the chain of porder.ordering) is the reference; the
compiled kernels must give the same permutations and images on every input,
ties included, so the inputs below are chosen to make ties and edge cases
common: constant patches, images quantised to a few levels, saturated pixels.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import porder
from porder import MEASURES
from porder.kernels import cpu

SCORED = [n for n, m in MEASURES.items() if m.kind != "control"]


def photo_like(n, seed, size=32, channels=3):
    """Smooth gradients, an edge and noise (few ties at 256 bins)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = (rng.uniform(0, 255, (n, 1, 1, channels))
           + rng.uniform(-80, 80, (n, 1, 1, channels)) * x[None, ..., None]
           + rng.uniform(-80, 80, (n, 1, 1, channels)) * y[None, ..., None]
           + (x[None] > rng.uniform(0.2, 0.8, (n, 1, 1)))[..., None]
           * rng.uniform(-60, 60, (n, 1, 1, channels))
           + rng.normal(0, 12, (n, size, size, channels)))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_set(kind, n=3, size=32, channels=3, seed=0):
    """Test images of one kind (N, size, size, channels) uint8."""
    rng = np.random.default_rng(seed)
    shape = (n, size, size, channels)
    if kind == "noise":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "photo":
        return photo_like(n, seed, size, channels)
    if kind == "levels":  # 2-4 grey levels: joint histograms and scores tie a lot
        levels = rng.integers(2, 5)
        return (rng.integers(0, levels, shape) * (255 // (levels - 1))).astype(np.uint8)
    if kind == "saturated":  # mostly 0 and 255 with a little noise between
        img = np.where(rng.random(shape) < 0.5, 0, 255)
        mid = rng.random(shape) < 0.1
        return np.where(mid, rng.integers(0, 256, shape), img).astype(np.uint8)
    if kind == "blocks":  # constant 4x4 blocks: many constant patches, exact ties
        small = rng.integers(0, 3, (n, size // 4, size // 4, channels)) * 100
        return np.repeat(np.repeat(small, 4, axis=1), 4, axis=2).astype(np.uint8)
    if kind == "constant":
        return np.full(shape, 77, dtype=np.uint8)
    raise ValueError(kind)


def assert_same(images, measure, patch, **kw):
    """Compiled and generic reorder agree exactly (perm and images)."""
    got_img, got_perm = porder.reorder(images, measure, patch, backend="compiled", **kw)
    want_img, want_perm = porder.reorder(images, measure, patch, backend="generic", **kw)
    assert got_perm.dtype == np.int64 and got_img.dtype == np.uint8
    bad = np.flatnonzero((got_perm != want_perm).any(axis=1))
    assert bad.size == 0, (f"{measure} p{patch} {kw}: images {bad.tolist()} differ; "
                           f"got {got_perm[bad[0]].tolist()} want {want_perm[bad[0]].tolist()}")
    np.testing.assert_array_equal(got_img, want_img)


KINDS = ["noise", "photo", "levels", "saturated", "blocks", "constant"]


@pytest.mark.parametrize("patch", [4, 8, 16])
@pytest.mark.parametrize("measure", SCORED)
def test_same_as_generic_on_every_kind_of_image(measure, patch):
    imgs = np.concatenate([image_set(kind, n=4, seed=patch) for kind in KINDS])
    assert_same(imgs, measure, patch)


@pytest.mark.parametrize("measure", SCORED)
def test_same_as_generic_small_patches(measure):
    # patch 2 (256 patches of 4 pixels) and 1 (1024 one-pixel patches)
    imgs = np.concatenate([image_set(k, n=1, seed=5) for k in ("photo", "levels", "noise")])
    assert_same(imgs, measure, 2)
    assert_same(imgs[:1], measure, 1)


@pytest.mark.parametrize("measure", SCORED)
@pytest.mark.parametrize("bins", [16, 2])
def test_same_as_generic_with_coarse_bins(measure, bins):
    imgs = np.concatenate([image_set(k, n=3, seed=bins) for k in ("photo", "noise", "levels")])
    for patch in (4, 8, 16):
        assert_same(imgs, measure, patch, bins=bins)


@pytest.mark.parametrize("measure", SCORED)
def test_same_as_generic_reference_and_direction(measure):
    imgs = np.concatenate([image_set(k, n=3, seed=7) for k in ("photo", "levels", "blocks")])
    flipped = not MEASURES[measure].descending
    for patch in (4, 8, 16):
        k = (32 // patch) ** 2
        assert_same(imgs, measure, patch, reference=k - 1)
        assert_same(imgs, measure, patch, descending=flipped)
        assert_same(imgs, measure, patch, reference=k // 2, descending=flipped)


@pytest.mark.parametrize("measure", SCORED)
@pytest.mark.parametrize("channels", [1, 4])
def test_same_as_generic_other_channel_counts(measure, channels):
    imgs = np.concatenate([image_set(k, n=2, channels=channels, seed=channels)
                           for k in ("photo", "levels", "noise")])
    for patch in (4, 8, 16):
        assert_same(imgs, measure, patch)


@pytest.mark.parametrize("measure", SCORED)
@pytest.mark.parametrize("size, patch", [(24, 6), (24, 12), (40, 20), (30, 5)])
def test_same_as_generic_other_sizes(measure, size, patch):
    # 6x6 and 5x5: one-word masks; 12x12: multi-word masks; 20x20: dense tables
    imgs = np.concatenate([image_set(k, n=2, size=size, seed=size)
                           for k in ("photo", "levels", "noise")])
    assert_same(imgs, measure, patch)


@pytest.mark.parametrize("measure", SCORED)
def test_same_as_generic_on_real_photographs(measure, real_images):
    for patch in (4, 8, 16):
        assert_same(real_images, measure, patch)
        assert_same(real_images, measure, patch, bins=16)


@pytest.mark.parametrize("measure", ["mi", "kl", "ssim", "entropy"])
def test_empty_and_single_image_batches(measure):
    imgs = image_set("photo", n=1)
    assert_same(imgs, measure, 8)
    out, perm = porder.reorder(imgs[:0], measure, 8, backend="compiled")
    assert out.shape == (0, 32, 32, 3) and perm.shape == (0, 16) and perm.dtype == np.int64


def test_single_patch_images():
    imgs = image_set("photo", n=2)
    for measure in ("mi", "psnr"):
        out, perm = porder.reorder(imgs, measure, 32, backend="compiled")
        assert perm.tolist() == [[0], [0]]
        np.testing.assert_array_equal(out, imgs)


def test_workers_and_unusual_arrays_share_one_compiled_kernel():
    from porder.kernels import _cpu_kernels

    imgs = image_set("photo", n=9)[::2]  # a strided view
    assert not imgs.flags.c_contiguous
    frozen = np.ascontiguousarray(imgs)
    frozen.flags.writeable = False
    want = porder.reorder(np.ascontiguousarray(imgs), "mi", 8, backend="generic")[1]
    for workers in (1, 2, None):
        perm = porder.reorder(imgs, "mi", 8, backend="compiled", workers=workers)[1]
        np.testing.assert_array_equal(perm, want)
    np.testing.assert_array_equal(porder.reorder(frozen, "mi", 8, backend="compiled")[1], want)
    # every call above (and in this file) reuses one compiled signature: no
    # second minute-long compile for strided or read-only inputs
    assert len(_cpu_kernels.reorder_range.signatures) == 1


def test_load_prepares_the_signature_a_real_call_uses():
    # cpu.load() (the pipeline's kernel-load thread) only compiles; a fresh process
    # must then run every call on that one signature, with no second compile.
    code = ("import numpy as np, porder\n"
            "from porder.kernels import cpu, _cpu_kernels as k\n"
            "cpu.load()\n"
            "assert len(k.reorder_range.signatures) == 1\n"
            "x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)\n"
            "for m in ('mi', 'kl', 'ssim', 'entropy'):\n"
            "    porder.reorder(x, m, 4, backend='compiled', workers=2)\n"
            "print(len(k.reorder_range.signatures))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "1"


def test_controls_use_the_shared_path():
    imgs = image_set("photo", n=2)
    for measure in ("none", "random"):
        a = porder.reorder(imgs, measure, 8, backend="compiled", seed=3)
        b = porder.reorder(imgs, measure, 8, backend="generic", seed=3)
        np.testing.assert_array_equal(a[1], b[1])


def test_bad_input_is_a_clear_error():
    # porder.reorder validates the inputs once, before any kernel (kernels/__init__.py)
    imgs = image_set("photo", n=1)
    m = MEASURES["mi"]

    def compiled(x, patch, **kw):
        kw = {"bins": 256, "reference": 0, "descending": True, **kw}
        return porder.reorder(x, m, patch, backend="compiled", **kw)

    with pytest.raises(ValueError, match="uint8"):
        compiled(imgs.astype(np.int16), 8)
    with pytest.raises(ValueError, match="does not divide"):
        compiled(imgs, 5)
    with pytest.raises(ValueError, match="bins"):
        compiled(imgs, 8, bins=0)
    with pytest.raises(ValueError, match="out of range"):
        compiled(imgs, 8, reference=16)
    with pytest.raises(ValueError, match="workers"):
        compiled(imgs, 8, workers=0)
    with pytest.raises(ValueError, match="no compiled kernel"):
        cpu.reorder_batch(imgs, MEASURES["none"], 8, bins=256, reference=0, descending=True)


def test_cache_dir_falls_back_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: False)  # read-only install
    assert cpu._cache_dir() == str(tmp_path / "porder" / "numba")
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: True)
    assert cpu._cache_dir() is None  # numba's own __pycache__ next to the kernels
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setattr(cpu.os, "access", lambda path, mode: False)
    assert cpu._cache_dir() is None  # the user's choice wins


def _reorder_in_child(images, want, queue):
    perm = porder.reorder(images, "mi", 8, backend="compiled", workers=2)[1]
    queue.put(bool((perm == want).all()))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_its_own_threads():
    # the thread pool is kept between calls; a forked child (a DataLoader
    # worker) has none of its threads and must start its own, not hang
    import multiprocessing

    imgs = image_set("photo", n=64)
    want = porder.reorder(imgs, "mi", 8, backend="compiled", workers=2)[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_reorder_in_child, args=(imgs, want, queue))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.terminate()
        pytest.fail("reorder hung in a forked child")
    assert child.exitcode == 0 and queue.get(timeout=5)


def test_importing_the_kernels_leaves_the_environment_alone(tmp_path):
    # A read-only install (os.access says so): porder's kernels cache in the per-user
    # folder, chosen by a numba cache locator for porder's kernel file alone; the
    # environment and numba's configuration stay as the caller set them.
    code = ("import os, numba, threadpoolctl\n"
            "import numba.core.config as config\n"
            "os.access = lambda *a, **k: False\n"
            "before = dict(os.environ), config.CACHE_DIR\n"
            "from porder.kernels import cpu, _cpu_kernels as k\n"
            "assert (dict(os.environ), config.CACHE_DIR) == before, 'environment changed'\n"
            "print(k.reorder_range._cache._cache_path)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(tmp_path / "porder" / "numba") + os.sep)


def test_cache_locator_answers_for_porder_kernels_only(monkeypatch, tmp_path):
    from numba.core import caching

    from porder.kernels import _cpu_kernels as k

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    user = str(tmp_path / "porder" / "numba")
    # the decision: a kernels folder that cannot be written (here: absent) or a writable one
    assert cpu._cache_dir(tmp_path / "site-packages" / "porder" / "kernels") == user
    assert cpu._cache_dir(tmp_path) is None
    # the locator: numba asks it first; it answers for _cpu_kernels.py only
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    assert impl._locator_classes[0] is cpu.KernelCacheLocator
    monkeypatch.setattr(cpu, "_cache_dir", lambda here=None: user)
    loc = cpu.KernelCacheLocator.from_function(k.reorder_range.py_func, k.__file__)
    assert loc.get_cache_path().startswith(user + os.sep)
    assert cpu.KernelCacheLocator.from_function(photo_like, __file__) is None
    monkeypatch.setattr(cpu, "_cache_dir", lambda here=None: None)  # numba's own choice
    assert cpu.KernelCacheLocator.from_function(k.reorder_range.py_func, k.__file__) is None


def test_kernel_constants_are_the_measures_constants():
    # The kernels take the formulas' constants as an argument (a numba global would be
    # frozen into the disk cache): one definition, in porder.measures and ordering.
    from porder import measures, ordering
    from porder.kernels import _cpu_kernels as k
    from porder.kernels import cpu

    c = cpu._CONSTANTS
    assert (c.ssim_c1, c.ssim_c2) == (measures.SSIM_C1, measures.SSIM_C2)
    assert (c.psnr_peak2, c.psnr_floor) == (measures.DATA_RANGE**2, measures.PSNR_NOISE_FLOOR)
    assert c.round_scale == 10.0**ordering.DECIMALS
    assert not any(hasattr(k, name) for name in ("SSIM_C1", "SSIM_C2", "PSNR_PEAK2",
                                                 "PSNR_NOISE_FLOOR", "ROUND_SCALE"))
    assert cpu._arguments("ssim", 8, 256, 0, True)[-1] is c


def test_supports_built_in_formulas_only():
    def l1_again(a, b, *, bins=256):
        return porder.measures.l1_distance(a, b, bins=bins)

    kw = dict(size=32, channels=3, patch=8, bins=256)
    assert all(cpu.supports(MEASURES[m], **kw) for m in SCORED)
    assert not cpu.supports(MEASURES["none"], **kw)
    copy = porder.Measure("l1-copy", "pairwise", False, "l1 again", porder.measures.l1_distance,
                          porder.measures._l1_matrix)
    assert cpu.supports(copy, **kw)  # the same formula: the l1 kernel computes it
    other = porder.Measure("l1-other", "pairwise", False, "l1 again", l1_again)
    assert not cpu.supports(other, **kw)
