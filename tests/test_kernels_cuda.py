"""CUDA kernels: porder/kernels/cuda_geometry.py, cuda.py and cuda/*.cu.

Four layers, the first three without a GPU, so that CI catches logic errors
before a device ever runs the kernels:

1. the launch geometry (pure Python, porder/kernels/cuda_geometry.py);
2. the kernel's per-image code (cuda/porder_core.cuh) compiled for the CPU
   through cuda/host_harness.cu (g++, or nvcc) and compared with porder's
   NumPy path: permutations, images and score values;
3. nvcc compiles every .cu for sm_90 and sm_80 with warnings as errors;
4. on a GPU (mark ``gpu``): the kernels against the generic CuPy path and the
   NumPy path, with poisoned outputs and fresh random inputs. Each such test
   draws its inputs from a new seed (the ``seed`` fixture), printed with the
   command that replays it; ``PORDER_TEST_SEED=S`` fixes the seed of every test.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import secrets
import shutil
import subprocess

import numpy as np
import pytest

import porder
from porder.backend import cuda_available
from porder.kernels import cuda as kc
from porder.kernels import cuda_geometry as kg

MEASURES = ["entropy", "psnr", "mi", "je", "kl", "l1", "l2", "ssim"]
HIST = {"entropy", "mi", "je", "kl"}
PATCHES = [4, 8, 16]
H100 = kg.DeviceLimits()
A100 = kg.DeviceLimits(sm_count=108, max_smem_block=166912, smem_per_sm=167936)


# ---------------------------------------------------------------------------
# Test images: random, tie-heavy, saturated and photo-like


def image_sets(rng, n: int = 4, size: int = 32, channels: int = 3) -> dict[str, np.ndarray]:
    shape = (n, size, size, channels)
    rand = rng.integers(0, 256, shape, dtype=np.uint8)
    levels2 = (rng.integers(0, 2, shape) * 255).astype(np.uint8)
    levels4 = (rng.integers(0, 4, shape) * 85).astype(np.uint8)
    const = rng.integers(0, 256, shape, dtype=np.uint8)
    const[:, : size // 2] = 77  # whole rows of constant patches
    const[:, :, size // 2 :] = const[:, :1, size // 2 :]  # repeated patches
    sat = np.where(rng.random(shape) < 0.5, 0, 255).astype(np.uint8)
    sat[:, ::3] = 255
    y, x = np.mgrid[0:size, 0:size] / size
    photo = (rng.uniform(0, 255, (n, 1, 1, channels))
             + rng.uniform(-80, 80, (n, 1, 1, channels)) * x[None, ..., None]
             + rng.normal(0, 12, shape))
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    return {"random": rand, "levels2": levels2, "levels4": levels4, "constant": const,
            "saturated": sat, "photo": photo}


def first_mismatch(perm_a, perm_b, out_a=None, out_b=None) -> str:
    """Describe the first image whose permutation (or pixels) differ."""
    bad = np.nonzero((np.asarray(perm_a) != np.asarray(perm_b)).any(axis=1))[0]
    if len(bad):
        i = bad[0]
        return (f"{len(bad)} images differ; first: image {i}\n  got      {perm_a[i].tolist()}\n"
                f"  expected {perm_b[i].tolist()}")
    if out_a is not None:
        bad = np.nonzero((np.asarray(out_a) != np.asarray(out_b)).reshape(len(out_a), -1)
                         .any(axis=1))[0]
        if len(bad):
            return f"perms equal but pixels of {len(bad)} images differ; first: image {bad[0]}"
    return "equal"


# ---------------------------------------------------------------------------
# 1. Launch geometry (no GPU, no compiler)


def test_enums_mirror_the_header():
    src = (kg.KERNEL_DIR / kg.HEADER).read_text()
    params = re.search(r"enum Param \{(.*?)\};", src, re.S).group(1)
    names = [t.strip().split("=")[0].strip() for t in params.replace("\n", " ").split(",")]
    names = [t[2:] for t in names if t and t != "P_COUNT"]
    assert tuple(names) == kg.PARAM_NAMES
    ids = dict(re.findall(r"M_(\w+) = (\d+)", src))
    assert {k.lower(): int(v) for k, v in ids.items()} == kg.MEASURE_IDS
    assert int(re.search(r"T_HDR = (\d+)", src).group(1)) == kg.TAB_HEADER


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("patch,words", [(4, (16, 1)), (8, (64, 1)), (16, (64, 4))])
def test_geometry_of_the_paper_cases(measure, patch, words):
    g = kg.launch_geometry(measure, 32, 3, patch)
    assert g.supported, g.reason
    assert (g.grid_side, g.patches, g.pixels) == (32 // patch, (32 // patch) ** 2, patch**2)
    assert (g.mask_bits, g.mask_words) == (words if measure in HIST else (64, 1))
    assert g.threads % 32 == 0 and 64 <= g.threads <= kg.MAX_THREADS
    assert g.kernel == f"porder_reorder<{kg.MEASURE_IDS[measure]}, {g.mask_bits}, {g.mask_words}>"
    # regions: 16-byte aligned, in order, non-overlapping, inside smem_bytes
    spans = sorted(g.offsets.values())
    for (o1, s1), (o2, _) in zip(spans, spans[1:]):
        assert o1 % 16 == 0 and o1 + s1 <= o2
    assert spans[-1][0] + spans[-1][1] <= g.smem_bytes <= H100.max_smem_block
    assert g.offsets["mask"][1] == (3 * patch**2 * g.patches * g.mask_bits // 8 * g.mask_words
                                    if measure in ("mi", "je", "kl") else 0)
    assert g.offsets["raw"][1] == 32 * 32 * 3
    # the A100's smaller shared memory still takes every paper case
    assert kg.launch_geometry(measure, 32, 3, patch, limits=A100).supported
    p = g.params()
    assert p.dtype == np.int32 and len(p) == len(kg.PARAM_NAMES)
    assert p[kg.PARAM_NAMES.index("SMEM")] == g.smem_bytes


def test_geometry_occupancy_and_grid():
    g = kg.launch_geometry("mi", 32, 3, 16)
    # ~111 KB per image: two blocks per H100 multiprocessor
    assert g.blocks_per_sm == H100.smem_per_sm // (g.smem_bytes + H100.reserved_smem_block) == 2
    assert g.max_grid == 2 * H100.sm_count
    assert g.grid(10) == 10 and g.grid(0) == 1 and g.grid(10**6) == g.max_grid
    g4 = kg.launch_geometry("mi", 32, 3, 4)
    assert g4.threads == 192 and g4.blocks_per_sm == 2048 // 192
    # 80 registers x 192 threads: 4 blocks per multiprocessor fit the register file
    assert g4.grid(10**6, registers=80) == 4 * H100.sm_count
    assert g4.grid(10**6, registers=16) == g4.max_grid


def test_geometry_chunks_cover_the_batch():
    g = kg.launch_geometry("ssim", 32, 3, 8, chunk_bytes=10 * 3072 + 5)
    assert g.images_per_launch == 10
    assert g.chunks(0) == []
    assert g.chunks(25) == [(0, 10), (10, 20), (20, 25)]
    assert kg.launch_geometry("ssim", 32, 3, 8, chunk_bytes=1).images_per_launch == 1


@pytest.mark.parametrize("size,channels,patch,words", [
    (12, 1, 3, (16, 1)), (20, 2, 5, (32, 1)), (30, 4, 6, (64, 1)), (27, 3, 9, (64, 2)),
    (24, 3, 12, (64, 3)), (16, 3, 16, (64, 4)), (8, 3, 1, (16, 1)),
])
def test_geometry_of_other_shapes(size, channels, patch, words):
    g = kg.launch_geometry("kl", size, channels, patch, bins=10)
    assert g.supported and (g.mask_bits, g.mask_words) == words
    assert g.unit_stride % 16 == 0 and (g.unit_stride // 16) % 2 == 1
    assert g.unit_stride >= g.pixels
    assert g.offsets["hist"][1] == 4 * channels * 10


def test_geometry_falls_back_with_a_reason():
    # shared mode says why it cannot take a case; stream mode (the default then) takes it
    g = kg.launch_geometry("mi", 64, 3, 32, mode="shared")
    assert not g.supported and "256" in g.reason and "patch 16" in g.reason
    assert kg.launch_geometry("l2", 64, 3, 32).supported  # no masks: any patch size
    big = kg.launch_geometry("mi", 128, 3, 16, mode="shared")
    assert not big.supported and "shared memory" in big.reason
    small = dataclasses.replace(A100, max_smem_block=64 * 1024)
    assert not kg.launch_geometry("mi", 32, 3, 16, limits=small, mode="shared").supported
    for case in (("mi", 64, 3, 32), ("mi", 128, 3, 16)):
        assert kg.launch_geometry(*case).mode == "stream" and kg.launch_geometry(*case).supported
    assert kg.launch_geometry("mi", 32, 3, 16, limits=small).mode == "stream"


@pytest.mark.parametrize("kwargs,match", [
    (dict(measure="mi", patch=5), "does not divide"),
    (dict(measure="none", patch=8), "no CUDA kernel"),
    (dict(measure="nope", patch=8), "unknown measure"),
    (dict(measure="mi", patch=8, bins=0), "bins"),
    (dict(measure="mi", patch=8, bins=257), "bins"),
    (dict(measure="mi", patch=8, reference=16), "out of range"),
])
def test_geometry_rejects_bad_options(kwargs, match):
    kwargs = dict(kwargs)
    m, p = kwargs.pop("measure"), kwargs.pop("patch")
    with pytest.raises(ValueError, match=match):
        kg.launch_geometry(m, 32, 3, p, **kwargs)


def test_check_images_and_vec_flags():
    # images are validated once, by porder.reorder, before any kernel runs
    with pytest.raises(ValueError, match="uint8"):
        porder.reorder(np.zeros((2, 32, 32, 3), np.float32), "mi", 8)
    with pytest.raises(ValueError, match=r"\(N, S, S, C\)"):
        porder.reorder(np.zeros((2, 32, 31, 3), np.uint8), "mi", 8)
    with pytest.raises(ValueError, match="does not divide"):
        porder.reorder(np.zeros((2, 32, 32, 3), np.uint8), "mi", 7)
    g8, g4 = kg.launch_geometry("mi", 32, 3, 8), kg.launch_geometry("mi", 32, 1, 2)
    assert kg.vec_flags(256, 512, g8) == 3
    assert kg.vec_flags(257, 512, g8) == 2
    assert kg.vec_flags(256, 512, g4) == 1  # P*C = 2: bytewise stores


def test_kernel_table_matches_the_numpy_formulas():
    n, bins = 64, 16
    t = kg.kernel_table(n, bins)
    lg = t[kg.TAB_HEADER : kg.TAB_HEADER + n + 1]
    assert t[0] == 6.0 and lg[0] == 0.0 and lg[8] == 3.0
    hist = np.array([3.0])  # a bin holding 3 of 64 pixels, smoothed as porder.measures does
    p = porder.measures._smoothed(hist, n, bins)
    kp = t[kg.TAB_HEADER + 2 * (n + 1) + 3]
    assert kp == pytest.approx(p[0], rel=1e-15)


def test_kernel_source_inlines_the_header():
    src = kc.kernel_source()
    assert '#include "porder_core.cuh"' not in src
    assert "namespace porder" in src and "porder_reorder" in src


def test_reorder_batch_needs_a_gpu_array():
    if cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CuPy"):
        kc.reorder_batch(np.zeros((1, 32, 32, 3), np.uint8), porder.get_measure("mi"), 8,
                         bins=256, reference=0, descending=True)


# ---------------------------------------------------------------------------
# 2. The kernel's per-image code on the CPU


class Harness:
    """ctypes front end of host_harness.cu."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        vp, i, ll = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
        lib.porder_host_reorder.argtypes = [i, i, i, vp, ll, i, vp, vp, vp, vp]
        lib.porder_host_scores.argtypes = [i, i, i, vp, ll, vp, vp, vp]
        lib.porder_host_chain_key.argtypes = [ctypes.c_double, i]
        lib.porder_host_chain_key.restype = ctypes.c_double
        lib.porder_host_sort_key.argtypes = [ctypes.c_double, i]
        lib.porder_host_sort_key.restype = ctypes.c_double
        self.lib = lib

    def reorder(self, x, measure, patch, *, bins=256, reference=0, descending=None, mode=None):
        n, s, _, c = x.shape
        g = kg.launch_geometry(measure, s, c, patch, bins=bins, reference=reference,
                               descending=descending, mode=mode)
        assert g.supported, g.reason
        out = np.full(x.shape, 0xA5, dtype=np.uint8)  # poisoned: every byte must be written
        perm = np.full((n, g.patches), -7, dtype=np.int64)
        params, table = g.params(), g.table()
        vec = kg.vec_flags(x.ctypes.data, out.ctypes.data, g)
        rc = self.lib.porder_host_reorder(
            kg.MEASURE_IDS[g.measure], g.mask_bits, g.mask_words, x.ctypes.data, n, vec,
            out.ctypes.data, perm.ctypes.data, params.ctypes.data, table.ctypes.data)
        assert rc == 0, f"host harness returned {rc} (-2: wrote past the shared-memory layout)"
        return out, perm

    def scores(self, x, measure, patch, *, bins=256, mode=None):
        n, s, _, c = x.shape
        g = kg.launch_geometry(measure, s, c, patch, bins=bins, mode=mode)
        shape = (n, g.patches, g.patches) if measure in kg.PAIRWISE else (n, g.patches)
        out = np.full(shape, np.nan)
        params, table = g.params(), g.table()
        rc = self.lib.porder_host_scores(kg.MEASURE_IDS[g.measure], g.mask_bits, g.mask_words,
                                         x.ctypes.data, n, params.ctypes.data,
                                         table.ctypes.data, out.ctypes.data)
        assert rc == 0
        return out


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Harness:
    """host_harness.cu built with g++ (or nvcc), or a skip saying why."""
    src = kg.KERNEL_DIR / "host_harness.cu"
    lib = tmp_path_factory.mktemp("harness") / "libporder_host.so"
    flags = ["-std=c++17", "-O1", "-shared", "-o", str(lib), str(src)]
    if shutil.which("g++"):
        cmd = ["g++", "-x", "c++", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror"]
    elif shutil.which("nvcc"):
        cmd = ["nvcc", "-x", "cu", "--fmad=false", "-Xcompiler", "-fPIC,-ffp-contract=off",
               "--Werror", "all-warnings"]
    else:
        pytest.skip("neither g++ nor nvcc is on the PATH: cannot build the CPU harness")
    r = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd + flags)}\n{r.stdout}\n{r.stderr}"
    return Harness(lib)


def _check_against_numpy(harness, x, measure, patch, **kw):
    out, perm = harness.reorder(x, measure, patch, **kw)
    ref_out, ref_perm = porder.reorder(x, measure, patch, backend="generic", **kw)
    assert np.array_equal(perm, ref_perm), first_mismatch(perm, ref_perm)
    assert np.array_equal(out, ref_out), first_mismatch(perm, ref_perm, out, ref_out)


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("measure", MEASURES)
def test_harness_orders_like_numpy(harness, measure, patch):
    sets = image_sets(np.random.default_rng(100 + patch))
    for bins in ((256, 16) if measure in HIST else (256,)):
        for name, x in sets.items():
            try:
                _check_against_numpy(harness, x, measure, patch, bins=bins)
            except AssertionError as e:
                raise AssertionError(f"{name} images, bins={bins}: {e}") from None


@pytest.mark.parametrize("measure", MEASURES)
def test_harness_reference_and_direction(harness, measure):
    x = image_sets(np.random.default_rng(7))["levels4"]
    default = porder.get_measure(measure).descending
    for patch, ref in ((4, 37), (8, 5), (16, 3)):
        _check_against_numpy(harness, x, measure, patch, reference=ref)
        _check_against_numpy(harness, x, measure, patch, reference=ref, descending=not default)


@pytest.mark.parametrize("size,channels,patch", [
    (12, 1, 3), (20, 2, 5), (30, 4, 6), (27, 3, 9), (24, 3, 12), (16, 3, 16), (8, 3, 1),
    (10, 3, 2),
])
@pytest.mark.parametrize("measure", ["mi", "kl", "entropy", "ssim", "l1", "psnr"])
def test_harness_other_shapes(harness, measure, size, channels, patch):
    rng = np.random.default_rng(size * 10 + channels)
    x = (rng.integers(0, 5, (3, size, size, channels)) * 60).astype(np.uint8)
    x[1] = rng.integers(0, 256, x[1].shape)
    _check_against_numpy(harness, x, measure, patch, bins=7 if measure in HIST else 256)


def test_harness_unaligned_and_strided_input(harness):
    rng = np.random.default_rng(3)
    buf = rng.integers(0, 256, 2 * 32 * 32 * 3 + 1, dtype=np.uint8)
    x = np.frombuffer(buf.data, dtype=np.uint8, count=2 * 32 * 32 * 3, offset=1)
    x = x.reshape(2, 32, 32, 3)
    assert x.ctypes.data % 4 != 0  # bytewise loads
    _check_against_numpy(harness, x, "mi", 8)


@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("measure", MEASURES)
def test_harness_values_match_numpy(harness, measure, patch):
    """Scores within 1e-9 relative of porder.score_matrix / porder.measure."""
    rng = np.random.default_rng(5)
    x = np.concatenate([image_sets(rng, n=2)[k] for k in ("random", "levels4", "photo")])
    for bins in ((256, 16) if measure in HIST else (256,)):
        got = harness.scores(x, measure, patch, bins=bins)
        pt = porder.split(x, patch)
        if measure in kg.PAIRWISE:
            want = porder.score_matrix(measure, pt, bins=bins)
            off = ~np.eye(want.shape[1], dtype=bool)
            got, want = got[:, off], want[:, off]
        else:
            want = porder.measure(measure, pt, bins=bins)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12,
                                   err_msg=f"{measure} patch {patch} bins {bins}")


def test_harness_keys_round_like_numpy(harness):
    rng = np.random.default_rng(11)
    s = np.concatenate([
        rng.normal(0, 3, 2000), rng.normal(0, 1e-8, 200),
        np.round(rng.normal(0, 2, 200), 9) + 5e-10,  # exactly between two 9-decimal values
        [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 1e300, -1e300, 5e-10, -5e-10, 1.5e-9],
    ])
    for desc in (False, True):
        with np.errstate(over="ignore"):
            rounded = np.round(s if desc else -s, 9), np.round(-s if desc else s, 9)
        want_chain = np.nan_to_num(rounded[0], nan=-np.finfo(float).max,
                                   posinf=np.finfo(float).max, neginf=-np.finfo(float).max)
        want_sort = rounded[1]
        got_chain = np.array([harness.lib.porder_host_chain_key(v, desc) for v in s])
        got_sort = np.array([harness.lib.porder_host_sort_key(v, desc) for v in s])
        np.testing.assert_array_equal(got_chain, want_chain)
        np.testing.assert_array_equal(got_sort, want_sort)


# ---------------------------------------------------------------------------
# 2b. The Python launch path, with the kernel replaced by the CPU harness


def test_kernel_signature_is_what_launch_passes():
    src = (kg.KERNEL_DIR / kg.KERNEL_SOURCE).read_text()
    sig = re.search(r"porder_reorder\((.*?)\)\s*\{", src, re.S).group(1)
    names = [re.split(r"[\s*]+", a.strip())[-1] for a in sig.split(",")]
    assert names == ["images", "n_images", "vec", "out", "perm", "params", "tab", "err",
                     "scratch"]


class FakeKernel:
    """Stands in for the compiled CUDA kernel: checks the launch, runs the harness."""

    num_regs = 64

    def __init__(self, harness, name):
        self.harness, self.name, self.launches = harness, name, []
        self.max_dynamic_shared_size_bytes = 48 * 1024
        self.mid, self.wb, self.nw = map(int, re.findall(r"\d+", name))

    def __call__(self, grid, block, args, shared_mem=0):
        images, n_images, vec, out, perm, params, tab, err, scratch = args
        p = dict(zip(kg.PARAM_NAMES, params.tolist()))
        assert scratch.dtype == np.uint8 and scratch.size >= grid[0] * p["GMEM"]
        assert block == (p["NT"],) and shared_mem == p["SMEM"] and 1 <= grid[0] <= int(n_images)
        assert shared_mem <= 48 * 1024 or self.max_dynamic_shared_size_bytes >= shared_mem
        assert (p["MID"], p["WB"], p["NW"]) == (self.mid, self.wb, self.nw)
        assert images.flags.c_contiguous and out.flags.c_contiguous and perm.flags.c_contiguous
        assert isinstance(n_images, np.int64) and isinstance(vec, np.int32)
        assert images.shape[0] == out.shape[0] == perm.shape[0] == int(n_images)
        self.launches.append(int(n_images))
        rc = self.harness.lib.porder_host_reorder(
            self.mid, self.wb, self.nw, images.ctypes.data, int(n_images), int(vec),
            out.ctypes.data, perm.ctypes.data, params.ctypes.data, tab.ctypes.data)
        assert rc == 0


@pytest.fixture
def fake_gpu(harness, monkeypatch):
    """porder.kernels.cuda with NumPy standing in for CuPy and the harness for the kernel."""
    import types

    fake = types.SimpleNamespace(
        ndarray=np.ndarray, empty=np.empty, full=np.full, zeros=np.zeros, asarray=np.asarray,
        ascontiguousarray=np.ascontiguousarray, uint8=np.uint8, int32=np.int32, int64=np.int64,
        cuda=types.SimpleNamespace(Device=lambda *a: types.SimpleNamespace(id=0)))
    kernels = {}

    def kernel(name, device_id):
        return kernels.setdefault(name, FakeKernel(harness, name))

    monkeypatch.setattr(kc, "_cupy", lambda: fake)
    monkeypatch.setattr(kc, "_kernel", kernel)
    monkeypatch.setattr(kc, "_device_arrays", lambda g, d: (g.params(), g.table()))
    monkeypatch.setattr(kc, "_error_flag", lambda d: np.zeros(1, np.int32))
    monkeypatch.setattr(kc, "_no_scratch", lambda d: np.zeros(1, np.uint8))
    monkeypatch.setattr(kc, "_ptr", lambda a: a.ctypes.data)
    monkeypatch.setattr(kc, "device_limits", lambda: H100)
    return kernels


@pytest.mark.parametrize("measure,patch", [("mi", 16), ("kl", 4), ("psnr", 8), ("ssim", 8)])
def test_launch_path_on_the_harness(fake_gpu, measure, patch):
    x = image_sets(np.random.default_rng(9), n=5)["photo"]
    out, perm = kc.reorder_batch(x, porder.get_measure(measure), patch, bins=256, reference=0,
                                 descending=porder.get_measure(measure).descending, check=True)
    ref_out, ref_perm = porder.reorder(x, measure, patch, backend="generic")
    assert perm.dtype == np.int64 and np.array_equal(perm, ref_perm)
    assert np.array_equal(out, ref_out)
    (k,) = fake_gpu.values()
    assert k.launches == [5]
    if patch == 16 and measure == "mi":  # 111 KB: the limit was raised before the launch
        assert k.max_dynamic_shared_size_bytes > 48 * 1024


def test_launch_path_chunks_strided_input(fake_gpu):
    rng = np.random.default_rng(4)
    x = np.concatenate(list(image_sets(rng, n=4).values()))  # 24 images
    wide = np.concatenate([x, x[..., :1]], axis=3)[..., :3]  # not contiguous
    g = kg.launch_geometry("je", 32, 3, 8, chunk_bytes=10 * 3072)
    out = np.full(x.shape, 0xA5, np.uint8)
    perm = np.full((len(x), 16), -7, np.int64)
    kc.launch(wide, g, out, perm, check=True)
    _, ref_perm = porder.reorder(x, "je", 8, backend="generic")
    assert np.array_equal(perm, ref_perm)
    assert fake_gpu[g.kernel].launches == [10, 10, 4]


def test_reorder_decides_the_fallback(fake_gpu, monkeypatch):
    # porder.reorder asks the backend (here the CUDA one, on the harness) whether it
    # supports a case, and runs the generic path when not; the backend never falls back.
    import porder.kernels

    monkeypatch.setattr(porder.kernels, "backend_module", lambda x: kc)
    x = image_sets(np.random.default_rng(8), n=2)["photo"]
    big = np.concatenate([np.concatenate([x, x], 1)] * 2, 2)  # (2, 64, 64, 3)
    # mi at patch 32 used to fall back; stream mode takes it now. What is still outside
    # the fused kernel: an image beyond its 32-bit indices.
    assert kc.supports(porder.get_measure("mi"), size=64, channels=3, patch=32, bins=256)
    huge = np.zeros((0, 30000, 30000, 3), np.uint8)
    assert not kc.supports(porder.get_measure("mi"), size=30000, channels=3, patch=3000,
                           bins=256)
    with pytest.raises(ValueError, match="do not take this case.*32-bit"):
        kc.reorder_batch(huge, porder.get_measure("mi"), 3000, bins=256, reference=0,
                         descending=True)
    assert not fake_gpu  # nothing compiled or launched
    with pytest.raises(ValueError, match="no CUDA kernel"):
        kc.reorder_batch(big, porder.get_measure("none"), 32, bins=256, reference=0,
                         descending=True)
    assert kc.supports(porder.get_measure("je"), size=32, channels=3, patch=8, bins=256)
    out, perm = porder.reorder(x, "je", 8, backend="compiled")
    assert np.array_equal(perm, porder.reorder(x, "je", 8, backend="generic")[1])
    assert [k.launches for k in fake_gpu.values()] == [[2]]
    out, perm = porder.reorder(big, "mi", 32, backend="compiled")  # stream mode
    ref_out, ref_perm = porder.reorder(big, "mi", 32, backend="generic")
    assert np.array_equal(perm, ref_perm) and np.array_equal(out, ref_out)
    assert fake_gpu[kg.launch_geometry("mi", 64, 3, 32).kernel].launches == [2]


# ---------------------------------------------------------------------------
# 3. nvcc compiles every .cu, warnings as errors


def test_every_cu_compiles_with_nvcc(tmp_path):
    """sm_90 cubin (with the ptxas register/spill report) and sm_80 PTX."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: cannot compile the CUDA sources")
    base = [nvcc, "-std=c++17", "--fmad=false", "--Werror", "all-warnings",
            "-DPORDER_INSTANTIATE_ALL"]
    jobs = {}
    for src in sorted(kg.KERNEL_DIR.glob("*.cu")):
        if src.name == "host_harness.cu":  # host code only
            jobs[src.name] = base + ["-c", "-Xcompiler", "-fPIC", str(src),
                                     "-o", str(tmp_path / "harness.o")]
            continue
        jobs[f"{src.name} sm_90"] = base + ["-cubin", "-arch=sm_90", "-Xptxas", "-v", str(src),
                                            "-o", str(tmp_path / f"{src.stem}.sm_90.cubin")]
        jobs[f"{src.name} sm_80"] = base + ["-ptx", "-arch=sm_80", str(src),
                                            "-o", str(tmp_path / f"{src.stem}.sm_80.ptx")]
    assert any("reorder.cu" in k for k in jobs)
    procs = {k: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k, cmd in jobs.items()}
    failed = []
    for k, p in procs.items():
        log, _ = p.communicate(timeout=900)
        if p.returncode:
            failed.append(f"{k}: {' '.join(jobs[k])}\n{log}")
        elif "sm_90" in k:
            (tmp_path / "ptxas.log").write_text(log)
    assert not failed, "\n\n".join(failed)
    # every kernel instantiation was assembled for sm_90
    report = (tmp_path / "ptxas.log").read_text()
    assert report.count("Compiling entry function") == 36  # 28 + stream mode of the 8 measures


# ---------------------------------------------------------------------------
# 4. On a GPU


SEED_ENV = "PORDER_TEST_SEED"   # set it to replay a failed GPU test with the same inputs


def draw_seed(env=None) -> int:
    """The seed of a GPU test's random inputs: ``$PORDER_TEST_SEED`` when set (to
    replay a failure), else a fresh one (new inputs every run)."""
    value = (os.environ if env is None else env).get(SEED_ENV, "").strip()
    if not value:
        return secrets.randbits(32)
    try:
        seed = int(value, 0)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:
        raise ValueError(f"{SEED_ENV}={value!r}: give a whole number 0 <= seed < 2**32")
    return seed


def announce_seed(node) -> int:
    """Draw a test's seed and print it with the command that replays it: pytest
    shows it under "Captured stdout setup" when the test fails; it is also a
    ``user_properties`` entry of the test (in a --junitxml report)."""
    s = draw_seed()
    print(f"random inputs from seed {s}; replay: {SEED_ENV}={s} python -m pytest "
          f"'{node.nodeid}'")
    node.user_properties.append(("seed", s))
    return s


@pytest.fixture
def seed(request) -> int:
    """The seed of a GPU test's random inputs (:func:`announce_seed`)."""
    return announce_seed(request.node)


def test_seeds_are_fresh_unless_fixed_by_the_environment():
    assert draw_seed({SEED_ENV: "12345"}) == 12345 == draw_seed({SEED_ENV: " 0x3039 "})
    assert draw_seed({SEED_ENV: "0"}) == 0
    drawn = {draw_seed({}) for _ in range(8)} | {draw_seed({SEED_ENV: ""})}
    assert len(drawn) > 1 and all(0 <= s < 2**32 for s in drawn)
    for bad in ("-1", "2**32", "4294967296", "seven"):
        with pytest.raises(ValueError, match=SEED_ENV):
            draw_seed({SEED_ENV: bad})


def test_the_seed_fixture_replays_and_reports(request, monkeypatch, capsys):
    monkeypatch.setenv(SEED_ENV, "77")
    assert announce_seed(request.node) == 77
    assert f"seed 77; replay: {SEED_ENV}=77 python -m pytest" in capsys.readouterr().out
    assert ("seed", 77) in request.node.user_properties
    x, y = _fresh_images(24, 77), _fresh_images(24, 77)
    assert np.array_equal(x, y)     # one seed, the same inputs


@pytest.fixture
def cp():
    if not cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available on this machine")
    import cupy

    return cupy


def _fresh_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sets = image_sets(rng, n=max(1, n // 6))
    return np.concatenate(list(sets.values()))


def _gpu_check(cp, x, measure, patch, *, bins=256, reference=0, descending=None, seed=None):
    """Fused kernel vs generic CuPy vs NumPy on x; poisoned outputs; every byte written."""
    n, s, _, c = x.shape
    g = kg.launch_geometry(measure, s, c, patch, bins=bins, reference=reference,
                           descending=descending, limits=kc.device_limits())
    xg = cp.asarray(x)
    out = cp.full(x.shape, 0xA5, dtype=cp.uint8)
    perm = cp.full((n, g.patches), -7, dtype=cp.int64)
    kc.launch(xg, g, out, perm, check=True)
    out, perm = cp.asnumpy(out), cp.asnumpy(perm)
    where = f"{measure} patch {patch} bins {bins} ref {reference} desc {descending} seed {seed}"
    assert (perm >= 0).all(), f"{where}: perm entries left unwritten"
    kw = dict(bins=bins, reference=reference, descending=descending)
    nout, nperm = porder.reorder(x, measure, patch, backend="generic", **kw)
    assert np.array_equal(perm, nperm), f"{where} vs NumPy: {first_mismatch(perm, nperm)}"
    assert np.array_equal(out, nout), f"{where}: {first_mismatch(perm, nperm, out, nout)}"
    # the generic CuPy path (itself first run on a GPU with these tests)
    cout, cperm = porder.reorder(xg, measure, patch, device="cuda", backend="generic", **kw)
    assert np.array_equal(perm, cp.asnumpy(cperm)), \
        f"{where} vs generic CuPy: {first_mismatch(perm, cp.asnumpy(cperm))}"
    assert np.array_equal(out, cp.asnumpy(cout))


@pytest.mark.gpu
@pytest.mark.parametrize("patch", PATCHES)
@pytest.mark.parametrize("measure", MEASURES)
def test_gpu_kernels_match_generic_and_numpy(cp, measure, patch, seed):
    x = _fresh_images(60, seed)
    for bins in ((256, 16) if measure in HIST else (256,)):
        _gpu_check(cp, x, measure, patch, bins=bins, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("measure", MEASURES)
def test_gpu_reference_and_direction(cp, measure, seed):
    x = _fresh_images(24, seed)
    default = porder.get_measure(measure).descending
    _gpu_check(cp, x, measure, 8, reference=5, descending=not default, seed=seed)
    _gpu_check(cp, x, measure, 4, reference=63, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("size,channels,patch", [
    (12, 1, 3), (20, 2, 5), (30, 4, 6), (27, 3, 9), (24, 3, 12), (16, 3, 16), (8, 3, 1)])
@pytest.mark.parametrize("measure", ["mi", "kl", "entropy", "ssim"])
def test_gpu_other_shapes(cp, measure, size, channels, patch, seed):
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 5, (7, size, size, channels)) * 60).astype(np.uint8)
    x[3:] = rng.integers(0, 256, x[3:].shape)
    _gpu_check(cp, x, measure, patch, bins=7 if measure in HIST else 256, seed=seed)


@pytest.mark.gpu
def test_gpu_many_images_grid_stride_and_chunks(cp, seed):
    """More images than resident blocks (grid-stride loop), several launches, strided input."""
    x = _fresh_images(1200, seed)
    lim = kc.device_limits()
    g = kg.launch_geometry("mi", 32, 3, 16, limits=lim, chunk_bytes=500 * 3072)
    assert g.max_grid < 1200 and len(g.chunks(len(x))) == 3
    xg = cp.asarray(np.concatenate([x, x[..., :1]], axis=3))[..., :3]  # not contiguous
    out = cp.full(x.shape, 0xA5, dtype=cp.uint8)
    perm = cp.full((len(x), g.patches), -7, dtype=cp.int64)
    kc.launch(xg, g, out, perm, check=True)
    _, nperm = porder.reorder(x, "mi", 16, backend="generic")
    assert np.array_equal(cp.asnumpy(perm), nperm), \
        f"seed {seed}: {first_mismatch(cp.asnumpy(perm), nperm)}"


@pytest.mark.gpu
def test_gpu_dispatch_and_fallback(cp, seed):
    x = _fresh_images(12, seed)
    out, perm = porder.reorder(cp.asarray(x), "je", 8, device="cuda", backend="compiled")
    nout, nperm = porder.reorder(x, "je", 8, backend="generic")
    assert isinstance(perm, cp.ndarray) and perm.dtype == cp.int64
    assert np.array_equal(cp.asnumpy(perm), nperm) and np.array_equal(cp.asnumpy(out), nout)
    # mi at patch 32: the fused kernel in stream mode (table mode)
    big = np.concatenate([np.concatenate([x, x], 1)] * 2, 2)[:4]  # (4, 64, 64, 3)
    out, perm = porder.reorder(cp.asarray(big), "mi", 32, device="cuda", backend="compiled")
    _, nperm = porder.reorder(big, "mi", 32, backend="generic")
    assert np.array_equal(cp.asnumpy(perm), nperm)
    empty, eperm = kc.reorder_batch(cp.zeros((0, 32, 32, 3), cp.uint8), porder.get_measure("mi"),
                                    8, bins=256, reference=0, descending=True)
    assert empty.shape == (0, 32, 32, 3) and eperm.shape == (0, 16)


@pytest.mark.gpu
def test_gpu_error_flag_reports_a_bad_launch(cp):
    x = cp.asarray(_fresh_images(6, 1))
    g = kg.launch_geometry("mi", 32, 3, 8, limits=kc.device_limits())
    bad = dataclasses.replace(g, smem_bytes=g.smem_bytes + 4096)  # params ask for more
    out = cp.empty(x.shape, cp.uint8)
    perm = cp.empty((len(x), 16), cp.int64)
    kern = kc.get_kernel(g)
    params = cp.asarray(bad.params())
    err = cp.zeros(1, cp.int32)
    kern((1,), (g.threads,), (x, np.int64(len(x)), np.int32(3), out, perm, params,
                              cp.asarray(g.table()), err), shared_mem=g.smem_bytes)
    assert int(err[0]) == 1
    assert "shared memory" in kg.error_message(1)


@pytest.mark.gpu
def test_gpu_compile_report(cp):
    rows = kc.compile_kernels()
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n\n".join(f"{r['kernel']}:\n{r['error']}" for r in errors)
    assert len(rows) == 16  # 4 histogram measures x 3 mask shapes + 4 moment kernels
