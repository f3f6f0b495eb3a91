"""CUDA kernels at any size: stream mode (issue 21), tested on the CPU through the harness.

When one image does not fit a block's shared memory (or a histogram measure has
more than 256 pixels per patch), ``launch_geometry`` chooses stream mode: the
image is read from global memory, the regions that do not fit go to the block's
slice of a global scratch, and the histogram measures run in table mode (no
equality masks). These tests check its layout and bound, run it through
``cuda/host_harness.cu`` against porder's NumPy (generic) path at the issue's
sizes, and force it at 32x32 (where shared mode is the default) over the
tie-heavy image sets, where it must agree with NumPy and with shared mode.
The harness, its build and the image sets are test_kernels_cuda's.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

import porder
from porder.kernels import cuda as kc
from porder.kernels import cuda_geometry as kg
from tests import test_kernels_cuda as tkc
from tests.test_kernels_cuda import (
    A100,
    H100,
    HIST,
    MEASURES,
    PATCHES,
    _fresh_images,
    announce_seed,
    first_mismatch,
    image_sets,
)

# test_kernels_cuda's fixtures: the CPU harness, the launch path on it, CuPy on a GPU
harness, fake_gpu, cp = tkc.harness, tkc.fake_gpu, tkc.cp

# The issue's sizes (S, patch): stream mode on an H100 for mi, je and kl (the others
# fit shared memory at 64 p16 and 128 p16).
LARGE = [(64, 16), (128, 16), (224, 16), (224, 32), (256, 8), (256, 32)]


def stream_bound(g: kg.Geometry) -> int:
    """The documented bound on one image's memory in stream mode (module docstring)."""
    units, n, c = g.channels * g.patches, g.pixels, g.channels
    b = units * n + units * (24 if g.measure == "ssim" else 16) + 5 * g.patches
    b += 8 * (3 * n + 11)
    if g.measure in HIST:
        b += 4 * g.bins * g.threads
    if g.measure in ("mi", "je"):
        b += 4 * c * (g.bins + 1 + n)
    elif g.measure == "kl":
        b += 4 * c * (g.bins + 1)
    if g.measure in ("entropy", "psnr"):
        b += 12 * 2 * g.patches  # the bitonic sort's (key, index) pairs, padded to 2^k
    return b + 16 * len(kg.REGIONS) + 256  # alignment of each region and of the slice


def check(harness, x, measure, patch, *, mode=None, bins=256, reference=0, descending=None,
          modes=None):
    """Harness (in ``mode``, or each of ``modes``) vs porder's NumPy path: perms, pixels."""
    kw = dict(bins=bins, reference=reference, descending=descending)
    ref_out, ref_perm = porder.reorder(x, measure, patch, backend="generic", **kw)
    for m in modes or (mode,):
        out, perm = harness.reorder(x, measure, patch, mode=m, **kw)
        where = f"{measure} {x.shape[1]} p{patch} mode {m} {kw}"
        assert np.array_equal(perm, ref_perm), f"{where}: {first_mismatch(perm, ref_perm)}"
        assert np.array_equal(out, ref_out), \
            f"{where}: {first_mismatch(perm, ref_perm, out, ref_out)}"


# ---------------------------------------------------------------------------
# Geometry


def test_regions_mirror_the_header():
    src = (kg.KERNEL_DIR / kg.HEADER).read_text()
    body = re.search(r"enum Region \{(.*?)\};", src, re.S).group(1)
    names = [t.strip().split("=")[0].strip() for t in body.replace("\n", " ").split(",")]
    assert tuple(t[2:].lower() for t in names if t and t != "R_COUNT") == kg.REGIONS


@pytest.mark.parametrize("measure", MEASURES)
def test_paper_cases_keep_shared_mode(measure):
    for patch in PATCHES:
        g = kg.launch_geometry(measure, 32, 3, patch)
        assert g.mode == "shared" and g.supported and g.gmem_bytes == 0
        assert not g.global_regions and g.mask_bits > 0
        p = dict(zip(kg.PARAM_NAMES, g.params().tolist()))
        assert p["SPACE"] == 0 and p["GMEM"] == 0


@pytest.mark.parametrize("limits", [H100, A100], ids=["H100", "A100"])
@pytest.mark.parametrize("measure", MEASURES)
def test_stream_layout_at_the_issue_sizes(measure, limits):
    for size, patch in LARGE + [(256, 1), (256, 256), (30, 6)]:
        g = kg.launch_geometry(measure, size, 3, patch, limits=limits,
                               mode="stream" if size == 30 else None)
        where = f"{measure} {size} p{patch}"
        assert g.supported, f"{where}: {g.reason}"
        if g.mode == "shared":
            assert measure not in ("mi", "je", "kl") and size <= 128, where
            continue
        assert (g.mask_bits, g.mask_words) == (0, 0)
        assert g.kernel == kg.kernel_name(measure, g.mask_bits, g.mask_words)
        assert "raw" in g.global_regions  # the image is read where it is
        # shared regions within the block's budget, global ones within gmem_bytes
        spans = {"s": [], "g": []}
        for name, (off, size_) in g.offsets.items():
            if size_:
                spans["g" if name in g.global_regions else "s"].append((off, size_))
        for space, limit in (("s", g.smem_bytes), ("g", g.gmem_bytes)):
            sp = sorted(spans[space])
            for (o1, s1), (o2, _) in zip(sp, sp[1:]):
                assert o1 % 16 == 0 and o1 + s1 <= o2, where
            assert not sp or sp[-1][0] + sp[-1][1] <= limit, where
        assert g.smem_bytes <= limits.max_smem_block
        assert g.blocks_per_sm >= 1
        assert g.smem_bytes + g.gmem_bytes <= stream_bound(g), where
        # one launch's scratch: within SCRATCH_BYTES (or one block)
        grid = g.grid(10**6)
        assert g.scratch_bytes(grid) <= max(kg.SCRATCH_BYTES, g.gmem_bytes)
        p = dict(zip(kg.PARAM_NAMES, g.params().tolist()))
        assert p["GMEM"] == g.gmem_bytes and p["SMEM"] == g.smem_bytes
        assert p["QS"] == g.unit_stride >= g.pixels


def test_stream_memory_bound_of_the_issue_cases():
    # 224 p16 mi: units ~150 KB + tables 256 KB + small: under 0.5 MB per image in flight
    g = kg.launch_geometry("mi", 224, 3, 16)
    assert g.smem_bytes + g.gmem_bytes < 512 * 1024
    assert g.scratch_bytes(g.grid(10**6)) <= kg.SCRATCH_BYTES
    # 256 p8 (K = 1024) and 256 p1 (K = 65536): linear in the image, 17 bytes per
    # pixel and channel at most (16 per unit + the unit's pixels) + 5 per patch + tables
    for patch in (8, 1):
        g = kg.launch_geometry("mi", 256, 3, patch)
        assert g.smem_bytes + g.gmem_bytes <= 256 * 256 * (3 * 17 + 5) + 300 * 1024


@pytest.mark.parametrize("measure", MEASURES)
def test_every_case_the_work_bound_admits_runs_fused(measure):
    """porder.reorder's work bound (check_work, compiled) is what the CUDA path runs now:
    every size and patch it admits is a fused-kernel case (no generic CuPy fallback, and
    so no (K, K) matrix past MAX_MATRIX_PATCHES on the GPU)."""
    from porder.reorder import check_work

    m = porder.get_measure(measure)
    for size in (32, 48, 64, 96, 128, 224, 256, 512, 1024, 2048, 4096):
        for patch in (p for p in range(1, size + 1) if size % p == 0):
            try:
                check_work(m, patch, size, generic=False)
            except ValueError:
                continue
            g = kg.launch_geometry(measure, size, 3, patch)
            assert g.supported, f"{measure} {size} p{patch}: {g.reason}"


def test_mode_option():
    assert kg.launch_geometry("mi", 32, 3, 8, mode="stream").mode == "stream"
    assert kg.launch_geometry("mi", 32, 3, 8, mode="shared").mode == "shared"
    with pytest.raises(ValueError, match="mode"):
        kg.launch_geometry("mi", 32, 3, 8, mode="global")


def test_scratch_cuts_the_grid():
    g = kg.launch_geometry("mi", 256, 3, 8)
    assert g.scratch_grid == kg.SCRATCH_BYTES // g.gmem_bytes < g.max_grid
    assert g.grid(10**6) == g.scratch_grid and g.grid(3) == 3


# ---------------------------------------------------------------------------
# The harness in stream mode


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("measure", MEASURES)
def test_stream_mode_orders_like_numpy_at_32(harness, measure, patch):
    """Forced at 32x32: every tie-heavy image set, bins 256 and 16."""
    sets = image_sets(np.random.default_rng(200 + patch))
    for bins in ((256, 16) if measure in HIST else (256,)):
        for name, x in sets.items():
            try:
                check(harness, x, measure, patch, mode="stream", bins=bins)
            except AssertionError as e:
                raise AssertionError(f"{name} images: {e}") from None


@pytest.mark.parametrize("measure", MEASURES)
def test_stream_mode_reference_direction_and_shapes(harness, measure):
    x = image_sets(np.random.default_rng(17))["levels4"]
    default = porder.get_measure(measure).descending
    for patch, ref in ((4, 37), (16, 3)):
        check(harness, x, measure, patch, mode="stream", reference=ref, descending=not default)
    rng = np.random.default_rng(5)
    for size, channels, patch in ((12, 1, 3), (20, 2, 5), (27, 3, 9), (8, 3, 1), (10, 3, 10),
                                  (30, 2, 6), (24, 3, 2)):
        y = (rng.integers(0, 5, (3, size, size, channels)) * 60).astype(np.uint8)
        y[1] = rng.integers(0, 256, y[1].shape)
        check(harness, y, measure, patch, mode="stream", bins=7 if measure in HIST else 256)


@pytest.mark.parametrize("measure", MEASURES)
def test_stream_scores_match_shared_mode_and_numpy(harness, measure):
    """Stream-mode scores: within 1e-9 of NumPy; equal to shared mode's bit for bit,
    except mi/je whose joint log-counts it sums class by class (then within 1e-12)."""
    rng = np.random.default_rng(6)
    x = np.concatenate([image_sets(rng, n=2)[k] for k in ("random", "levels4", "photo")])
    for patch in (4, 16):
        for bins in ((256, 16) if measure in HIST else (256,)):
            got = harness.scores(x, measure, patch, bins=bins, mode="stream")
            shared = harness.scores(x, measure, patch, bins=bins, mode="shared")
            pt = porder.split(x, patch)
            if measure in kg.PAIRWISE:
                want = porder.score_matrix(measure, pt, bins=bins)
                off = ~np.eye(want.shape[1], dtype=bool)
                got, shared, want = got[:, off], shared[:, off], want[:, off]
            else:
                want = porder.measure(measure, pt, bins=bins)
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
            if measure in ("mi", "je"):
                np.testing.assert_allclose(got, shared, rtol=1e-12, atol=1e-12)
            else:
                np.testing.assert_array_equal(got, shared)


@pytest.mark.parametrize("measure", MEASURES)
def test_stream_mode_at_the_issue_sizes(harness, measure):
    """64 p16, 128 p16, 224 p16/p32, 256 p8/p32 vs NumPy: auto mode (stream, or shared
    where the image fits), and forced stream mode where auto chose shared."""
    for size, patch in LARGE:
        sets = image_sets(np.random.default_rng(size + patch), n=1, size=size)
        # NumPy's (K, K) score matrices are slow past 128 px (mi, je at 256 p8: their
        # (K, K, n) joint counts, l1 its K*K/2 pair differences, take ~2 s an image and
        # channel): fewer images there
        kinds = ("random", "levels4", "constant", "photo") if size <= 128 else \
            ("levels4", "photo")
        x = np.concatenate([sets[k] for k in kinds])
        if size == 256 and patch == 8 and measure in ("mi", "je", "l1"):
            x = np.ascontiguousarray(sets["levels4"][..., :1])  # one grey image
        auto = kg.launch_geometry(measure, size, x.shape[3], patch).mode
        check(harness, x, measure, patch, modes=(None, "stream") if auto == "shared" else None)


def test_stream_mode_small_bins_and_kl_classes(harness):
    """bins 16 and 2 at 128 p16 (small tables, many ties), grey and 4-channel images."""
    rng = np.random.default_rng(21)
    x = rng.integers(0, 256, (2, 128, 128, 4), dtype=np.uint8)
    x[1, :64] = 200
    for measure in ("mi", "je", "kl", "entropy"):
        for bins in (16, 2):
            check(harness, x, measure, 16, bins=bins)
    g = x[..., :1].copy()
    for measure in ("mi", "kl", "ssim"):
        check(harness, g, measure, 32)


# ---------------------------------------------------------------------------
# The launch path (CuPy replaced by NumPy, the kernel by the harness)


def test_launch_path_in_stream_mode(fake_gpu, monkeypatch):
    x = image_sets(np.random.default_rng(12), n=3, size=128)["photo"]
    m = porder.get_measure("mi")
    out, perm = kc.reorder_batch(x, m, 16, bins=256, reference=0, descending=m.descending,
                                 check=True)
    ref_out, ref_perm = porder.reorder(x, "mi", 16, backend="generic")
    assert np.array_equal(perm, ref_perm) and np.array_equal(out, ref_out)
    g = kg.launch_geometry("mi", 128, 3, 16)
    assert g.mode == "stream" and fake_gpu[g.kernel].launches == [3]
    # a scratch budget of two blocks: the grid is cut to two
    monkeypatch.setattr(kg, "SCRATCH_BYTES", 2 * g.gmem_bytes)
    g2 = kg.launch_geometry("l1", 224, 3, 16)
    assert g2.mode == "stream" and g2.grid(100) == max(1, 2 * g.gmem_bytes // g2.gmem_bytes)


# ---------------------------------------------------------------------------
# On a GPU


def _gpu_stream_check(cp, x, measure, patch, mode=None, seed=None):
    n, s, _, c = x.shape
    g = kg.launch_geometry(measure, s, c, patch, limits=kc.device_limits(), mode=mode)
    xg = cp.asarray(x)
    out = cp.full(x.shape, 0xA5, dtype=cp.uint8)
    perm = cp.full((n, g.patches), -7, dtype=cp.int64)
    kc.launch(xg, g, out, perm, check=True)
    out, perm = cp.asnumpy(out), cp.asnumpy(perm)
    nout, nperm = porder.reorder(x, measure, patch, backend="generic")
    where = f"{measure} {s} p{patch} {g.mode} seed {seed}"
    assert np.array_equal(perm, nperm), f"{where}: {first_mismatch(perm, nperm)}"
    assert np.array_equal(out, nout), f"{where}: {first_mismatch(perm, nperm, out, nout)}"


@pytest.mark.gpu
@pytest.mark.parametrize("measure", MEASURES)
def test_gpu_stream_mode(cp, measure, request):
    seed = announce_seed(request.node)
    x = _fresh_images(24, seed)
    for patch in PATCHES:  # forced at 32x32, many blocks, against NumPy
        _gpu_stream_check(cp, x, measure, patch, mode="stream", seed=seed)
    rng = np.random.default_rng(seed)
    for size, patch in ((128, 16), (224, 16), (224, 32), (256, 32)):
        y = image_sets(rng, n=1, size=size)
        _gpu_stream_check(cp, np.concatenate([y["photo"], y["levels4"]]), measure, patch,
                          seed=seed)
