"""Large images (128-256 px) through the rest of the stack: decoding and resizing,
batch memory, HDF5 chunks, and PatchReorder on large feature maps (issue 21).

The models at sizes above 32 are tested in ``tests/train/test_large_models.py``.
"""
from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from porder import reorder
from porder.pipeline import BATCH_BYTES, CacheSpec, batch_rows, build_cache
from porder.sources import fastjpeg
from porder.sources.pillow import RESAMPLE, decode_file, decode_pillow
from porder.store import LARGE_CHUNK_BYTES, Writer

DOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dogs-vs-cats-1k"
if not DOGS.is_dir():
    DOGS = Path("/work/shared/data/dogs-vs-cats-1k")
SIZES = (128, 224, 256)


def photo(w, h, seed=0):
    """Smooth, photo-like RGB content (JPEG-friendly), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (7 + c) + y / (11 + c)) for c in range(3)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def jpeg(a, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.fixture
def resized_from(monkeypatch):
    """The (w, h) of every image resized while decoding: what draft left to resample."""
    seen = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kw):
        seen.append(self.size)
        return resize(self, size, *args, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return seen


def draft_side(side: int, w: int, h: int, size: int) -> int:
    """libjpeg's DCT-scaled side: the largest of 8, 4, 2, 1 keeping both sides >= size."""
    scale = min(w // size, h // size)
    s = next((s for s in (8, 4, 2) if scale >= s), 1)
    return -(-side // s)


# -------------------------------------------------------------------- decoding


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("w, h", [(2048, 1536), (1000, 750), (500, 375), (300, 700),
                                  (257, 256), (255, 300), (120, 90)])
def test_draft_never_scales_below_the_target(w, h, size, resized_from):
    """Both JPEG paths decode at 1/8, 1/4 or 1/2 only while both sides stay >= size
    (then resample to size x size), and give the same pixels."""
    data = jpeg(photo(w, h))
    fast = fastjpeg.decode(data, size, RESAMPLE)
    assert fast is not None, "the fast path was not taken"
    regular = decode_pillow(io.BytesIO(data), size)
    assert fast.shape == regular.shape == (size, size, 3)
    np.testing.assert_array_equal(fast, regular)
    expected = (draft_side(w, w, h, size), draft_side(h, w, h, size))
    assert resized_from == [expected, expected]            # one resize per path
    assert min(expected) >= min(size, w, h)                 # never below the target
    if min(w, h) >= 2 * size:                               # and draft did scale
        assert max(expected) < max(w, h)


def draft_vs_full(data: bytes, size: int) -> float:
    """Mean absolute difference (levels) between porder's decode (draft, then the
    bicubic resize) and the bicubic resize of the full decode."""
    got = decode_pillow(io.BytesIO(data), size).astype(np.float64)
    with Image.open(io.BytesIO(data)) as img:
        full = np.asarray(img.convert("RGB").resize((size, size), RESAMPLE), dtype=np.float64)
    return float(np.abs(got - full).mean())


@pytest.mark.parametrize("size", SIZES)
def test_draft_stays_close_to_a_full_decode(size):
    """On smooth content draft costs a fraction of a level (it differs where the
    content has detail near the target's Nyquist limit: see the real JPEGs)."""
    y, x = np.mgrid[0:1200, 0:1600]
    a = np.stack([np.sin(x / (60 + 9 * c) + y / (80 + 7 * c)) for c in range(3)], -1) * 100 + 128
    assert draft_vs_full(jpeg(a.astype(np.uint8)), size) < 0.5


@pytest.mark.parametrize("size", SIZES)
def test_png_and_exif_rotated_jpeg_at_large_sizes(tmp_path, size):
    a = photo(400, 300)
    png = tmp_path / "a.png"
    Image.fromarray(a).save(png)
    got = decode_file(str(png), size)
    want = np.asarray(Image.fromarray(a).resize((size, size), RESAMPLE))
    np.testing.assert_array_equal(got, want)
    exif = Image.Exif()
    exif[0x0112] = 6                                        # rotate 90 degrees
    rot = tmp_path / "r.jpg"
    rot.write_bytes(jpeg(a, exif=exif.tobytes()))
    assert decode_file(str(rot), size).shape == (size, size, 3)


@pytest.mark.skipif(not DOGS.is_dir(), reason=f"the real JPEGs are not here ({DOGS})")
@pytest.mark.parametrize("size", SIZES)
def test_real_jpegs_fast_path_equals_pillow(size, resized_from):
    files = sorted(DOGS.glob("*.jpg"))[::97][:10]           # cats and dogs, several sizes
    assert files
    for f in files:
        data = f.read_bytes()
        got = decode_file(str(f), size)
        assert got.shape == (size, size, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, decode_pillow(io.BytesIO(data), size))
    assert all(min(wh) >= min(size, 1) for wh in resized_from if wh != (size, size))
    with Image.open(files[0]) as img:
        w, h = img.size
    assert resized_from[0] == (draft_side(w, w, h, size), draft_side(h, w, h, size))


@pytest.mark.skipif(not DOGS.is_dir(), reason=f"the real JPEGs are not here ({DOGS})")
def test_real_jpegs_draft_stays_within_a_few_levels():
    """Measured on every 20th photo that draft shrinks at 128 (42 of 50): mean 1.6,
    worst 4.8 levels from the full decode's bicubic resize (docs/sources.md)."""
    diffs = []
    for f in sorted(DOGS.glob("*.jpg"))[::20]:
        data = f.read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            if min(img.size) // 128 < 2:
                continue
        diffs.append(draft_vs_full(data, 128))
    assert len(diffs) >= 10
    assert np.mean(diffs) < 2.5 and max(diffs) < 6


# -------------------------------------------------------------------- batch memory


def test_batch_rows_bound_the_bytes_of_a_batch():
    assert batch_rows(512, 32) == 512 and batch_rows(10_922, 32) == 10_922   # 32x32 unchanged
    assert batch_rows(512, 224) == 222 and batch_rows(512, 256) == 170
    assert batch_rows(7, 256) == 7 and batch_rows(512, 8192) == 1
    for size in (32, 64, 128, 224, 256, 512):
        assert batch_rows(10**6, size) * 3 * size * size <= BATCH_BYTES


def test_capped_batches_write_the_same_file(tmp_path, monkeypatch):
    """Fewer images per batch changes memory only: the same rows, perms and names."""
    def build(name):
        out = tmp_path / name
        build_cache(CacheSpec("synthetic:40:3", out, measure="mi", patch=16, size=64,
                              batch_size=64, workers=1))
        with h5py.File(out) as f:
            return {k: f["train"][k][:] for k in ("images", "perm", "labels", "names")}
    whole = build("whole.h5")
    seen = []
    import porder.sources.base as base
    iter_batches = base.Source.iter_batches

    def spy(self, split, batch_size, **kw):
        seen.append(batch_size)
        return iter_batches(self, split, batch_size, **kw)

    monkeypatch.setattr(base.Source, "iter_batches", spy)
    monkeypatch.setattr("porder.pipeline.BATCH_BYTES", 3 * 64 * 64 * 6)     # 6 images
    capped = build("capped.h5")
    assert set(seen) == {6}
    for k in whole:
        np.testing.assert_array_equal(whole[k], capped[k])


# -------------------------------------------------------------------- HDF5 chunks


def chunks_of(tmp_path, size, patch, batch):
    w = Writer(tmp_path / f"c{size}_{patch}_{batch}.h5", meta={"image_size": size, "patch": patch,
                                                               "measure": "none", "bins": 256,
                                                               "source": "t"},
               classes=["a", "b"], chunk=batch)
    try:
        g = w.f["train"]
        return g["images"].chunks, g["perm"].chunks, g["perm"].dtype.itemsize
    finally:
        w.discard()


@pytest.mark.parametrize("batch", [64, 256, 512, 4096])
@pytest.mark.parametrize("patch", [1, 4, 8])
def test_32x32_chunks_are_as_before(tmp_path, patch, batch):
    images, perm, _ = chunks_of(tmp_path, 32, patch, batch)
    assert images == (min(batch, 512), 32, 32, 3)           # 512 rows: 1.5 MiB, as always
    k = (32 // patch) ** 2
    itemsize = 1 if k <= 256 else 2
    assert perm == (max(1, min(max(batch, 1024), 4 * 2**20 // (k * itemsize))), k)


@pytest.mark.parametrize("size, patch, rows", [(64, 8, 85), (128, 16, 21), (224, 16, 6),
                                               (224, 8, 6), (256, 8, 5), (256, 4, 5),
                                               (1024, 32, 1)])
def test_large_rows_keep_chunks_within_the_chunk_cache(tmp_path, size, patch, rows):
    images, perm, itemsize = chunks_of(tmp_path, size, patch, 512)
    assert images == (rows, size, size, 3)
    row = size * size * 3                                   # one row past 1 MiB: one row a chunk
    assert np.prod(images) <= max(row, LARGE_CHUNK_BYTES) and LARGE_CHUNK_BYTES == 2**20
    assert np.prod(perm) * itemsize <= LARGE_CHUNK_BYTES


def test_one_image_of_a_224_file_reads_at_most_a_mebibyte(tmp_path):
    """Reading row i touches one chunk: 6 rows of 224x224 (0.86 MiB), not 27 (3.9 MiB)."""
    out = tmp_path / "big.h5"
    build_cache(CacheSpec("synthetic:20:2", out, measure="none", size=224, patch=16, workers=1))
    with h5py.File(out) as f:
        ds = f["train"]["images"]
        assert ds.chunks[0] * 224 * 224 * 3 <= 2**20
        assert ds.compression is None                       # see docs/hdf5-format.md


# -------------------------------------------------------------------- PatchReorder


torch = pytest.importorskip("torch")


def image_map(n, s, seed=0):
    """Float maps (N, 3, S, S) whose channels quantise to themselves (values 0..255,
    min 0 and max 255), and the uint8 images (N, S, S, 3) they stand for."""
    rng = np.random.default_rng(seed)
    imgs = (rng.integers(0, 8, (n, s // 8, s // 8, 3)) * 32).repeat(8, 1).repeat(8, 2)
    imgs = np.clip(imgs + rng.integers(0, 32, (n, s, s, 3)), 0, 255).astype(np.uint8)
    imgs[:, 0, 0], imgs[:, 0, 1] = 0, 255
    x = torch.from_numpy(imgs.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
    return x, imgs


@pytest.mark.parametrize("s, patch", [(56, 8), (56, 28), (112, 8), (112, 16), (112, 28)])
@pytest.mark.parametrize("measure", ["mi", "entropy"])
def test_patch_reorder_large_maps_forward_is_porder_reorder(s, patch, measure):
    from porder.nn import PatchReorder
    x, imgs = image_map(2, s, seed=s + patch)
    layer = PatchReorder(measure, patch, channels="all")
    y = layer(x)
    want, perm = reorder(imgs, measure, patch)
    np.testing.assert_array_equal(layer.last_perm.numpy(), perm)
    np.testing.assert_array_equal(y.permute(0, 2, 3, 1).numpy(), want.astype(np.float32))


@pytest.mark.parametrize("s, patch", [(112, 8), (112, 28), (224, 4)])
def test_patch_reorder_large_maps_backward_moves_gradients_back(s, patch):
    from porder.nn import PatchReorder
    torch.manual_seed(0)
    x = torch.randn(2, 4, s, s, requires_grad=True)
    layer = PatchReorder("mi", patch, bins=64)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    k = (s // patch) ** 2
    perm = layer.last_perm                                    # (N, K)
    assert perm.shape == (2, k) and sorted(perm[0].tolist()) == list(range(k))
    inverse = torch.argsort(perm, dim=1)
    from porder.nn import permute_patches
    torch.testing.assert_close(x.grad, permute_patches(g, inverse, patch), rtol=0, atol=0)


def test_patch_reorder_map_not_divisible_is_one_clear_line():
    from porder.nn import PatchReorder
    with pytest.raises(ValueError, match=r"^patch size 16 does not divide the feature map size "
                                         r"56x56; choose a divisor of 56$"):
        PatchReorder("mi", 16)(torch.zeros(1, 8, 56, 56))
