"""decoder='nvjpeg' (porder/sources/gpu_decode.py).

Without a GPU, a stand-in torchvision (tests/fake_torchvision.py: Pillow full
decodes into CPU tensors) takes nvJPEG's place, the module's device is set to
'cpu' and the DLPack hand-off to CuPy becomes ``tensor.numpy()``: this tests the
plumbing (reads, header routing, batching and halving, EXIF, draft emulation,
resizing, order, labels, names, skips and messages) against the Pillow path
(decoder='threads'), which is exact wherever the stand-in decodes as Pillow
does and no resizing is needed. The tests marked ``gpu`` run the real nvJPEG
(skipped without CuPy, torchvision and a CUDA GPU).
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

import porder.sources.gpu_decode as gd
from porder.sources import SourceError, open_source

from .. import fake_torchvision as fake
from .test_sources import truncated_jpeg

torch = pytest.importorskip("torch")


@pytest.fixture
def nvjpeg_cpu(monkeypatch):
    """The stand-in torchvision, the CPU as the device, NumPy in place of CuPy."""
    fake.install(monkeypatch)
    monkeypatch.setattr(gd, "_DEVICE", "cpu")
    monkeypatch.setattr(gd, "_to_array", lambda x: x.numpy())
    return fake


def photo(rng, w: int, h: int) -> np.ndarray:
    """(h, w, 3) uint8: gradients, an edge and noise, so JPEG has work to do."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = (rng.uniform(0, 255, 3) + rng.uniform(-90, 90, 3) * x[..., None]
           + rng.uniform(-90, 90, 3) * y[..., None]
           + (x > rng.uniform(0.2, 0.8))[..., None] * rng.uniform(-70, 70, 3)
           + rng.normal(0, 14, (h, w, 3)))
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(path, a: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, "JPEG", **({"quality": 90} | kw))


def exif_with(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def insert_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """``data`` (a JPEG) with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def jpeg_bytes(a: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", **({"quality": 90} | kw))
    return buf.getvalue()


def mixed_folder(root, rng):
    """Class folders of 32x32 JPEGs nvJPEG gets (RGB, grey, progressive, EXIF 1..8, 4:4:4),
    one it refuses, and files that go to Pillow: CMYK, PNG (one 40x40), trailing bytes,
    empty, corrupt, truncated, a FIFO."""
    for i in range(12):
        save_jpeg(root / "a" / f"rgb{i}.jpg", photo(rng, 32, 32))
    save_jpeg(root / "a" / "grey.jpg", photo(rng, 32, 32)[..., 0])
    save_jpeg(root / "a" / "prog.jpg", photo(rng, 32, 32), progressive=True)
    save_jpeg(root / "a" / "full-chroma.jpg", photo(rng, 32, 32), subsampling=0)
    for o in range(1, 9):
        save_jpeg(root / "b" / f"exif{o}.jpg", photo(rng, 32, 32), exif=exif_with(o))
    save_jpeg(root / "b" / "refused.jpg", photo(rng, 32, 32), comment=fake.REFUSE)
    Image.fromarray(photo(rng, 32, 32)).convert("CMYK").save(root / "b" / "cmyk.jpg", quality=90)
    (root / "c").mkdir()
    Image.fromarray(photo(rng, 32, 32)).save(root / "c" / "p.png")
    Image.fromarray(photo(rng, 40, 40)).convert("RGBA").save(root / "c" / "big.png")
    (root / "c" / "tail.jpg").write_bytes(jpeg_bytes(photo(rng, 32, 32)) + b"junk")
    (root / "c" / "empty.jpg").write_bytes(b"")
    (root / "c" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9")
    truncated_jpeg(root / "c" / "cut.jpg", rng)
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "c" / "fifo.jpg")
    return root


def read(src, batch_size):
    batches = list(src.iter_batches("train", batch_size))
    for b in batches:
        assert isinstance(b.images, np.ndarray) and b.images.dtype == np.uint8
        assert b.images.shape[1:] == (src.image_size, src.image_size, 3)
    return (np.concatenate([b.images for b in batches]),
            np.concatenate([b.labels for b in batches]),
            [n for b in batches for n in b.names],
            [s for b in batches for s in b.skipped])


# --------------------------------------------------------------------------
# The same batches as Pillow's path


@pytest.mark.parametrize("batch_size,workers", [(1, 1), (5, 2), (64, 2), (7, 1)])
def test_nvjpeg_gives_the_pillow_paths_batches(tmp_path, nvjpeg_cpu, batch_size, workers):
    root = mixed_folder(tmp_path / "d", np.random.default_rng(0))
    got = {}
    for decoder in ("threads", "nvjpeg"):
        with open_source(str(root), test_fraction=0, on_error="skip", workers=workers,
                         decoder=decoder) as src:
            got[decoder] = read(src, batch_size)
            counts = src._gpu.counts if decoder == "nvjpeg" else None
    ref = got["threads"]
    skipped = {"c/empty.jpg", "c/corrupt.jpg", "c/cut.jpg"} | (
        {"c/fifo.jpg"} if hasattr(os, "mkfifo") else set())
    assert {n for n, _ in ref[3]} == skipped
    for a, b, what in zip(got["nvjpeg"], ref, ("images", "labels", "names", "skipped")):
        if what in ("images", "labels"):
            np.testing.assert_array_equal(a, b, err_msg=what)
        else:
            assert a == b, what
    # 12 RGB + grey + progressive + 4:4:4 + 8 EXIF reach nvJPEG; one of them is refused
    assert counts["nvjpeg"] == 23 and counts["refused"] == 1
    assert counts["pillow"] == len(ref[2]) + len(ref[3]) - 24


def test_a_bad_file_fails_with_the_pillow_paths_message(tmp_path, nvjpeg_cpu):
    root = mixed_folder(tmp_path / "d", np.random.default_rng(1))
    errors = {}
    for decoder in ("threads", "nvjpeg"):
        with open_source(str(root), test_fraction=0, workers=2, decoder=decoder) as src:
            with pytest.raises(SourceError) as e:
                read(src, 8)
        errors[decoder] = str(e.value)
    assert errors["nvjpeg"] == errors["threads"]
    assert "cannot decode image" in errors["nvjpeg"] and "\n" not in errors["nvjpeg"]


def test_an_all_bad_batch_is_empty(tmp_path, nvjpeg_cpu):
    (tmp_path / "d" / "k").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "d" / "k" / f"x{i}.jpg").write_bytes(b"\xff\xd8\xff nothing")
    with open_source(str(tmp_path / "d"), test_fraction=0, on_error="skip", workers=1,
                     decoder="nvjpeg", size=16) as src:
        (batch,) = src.iter_batches("train", 8)
    assert batch.images.shape == (0, 16, 16, 3) and batch.images.dtype == np.uint8
    assert [n for n, _ in batch.skipped] == ["k/x0.jpg", "k/x1.jpg", "k/x2.jpg"]


# --------------------------------------------------------------------------
# Batching


def plain_folder(root, n, rng, size=(32, 32)):
    for i in range(n):
        save_jpeg(root / f"c{i % 2}" / f"x{i:03d}.jpg", photo(rng, *size))
    return root


def test_one_nvjpeg_call_per_batch_in_order(tmp_path, nvjpeg_cpu):
    root = plain_folder(tmp_path / "d", 20, np.random.default_rng(2))
    with open_source(str(root), test_fraction=0, workers=2, decoder="nvjpeg") as src:
        nvjpeg_cpu.CALLS.clear()  # the probe decode of check_available
        got = read(src, 8)
    with open_source(str(root), test_fraction=0, workers=2, decoder="threads") as src:
        ref = read(src, 8)
    assert [c[0] for c in nvjpeg_cpu.CALLS] == [8, 8, 4]
    # RGB asked for, on the module's device, and the EXIF orientation left to porder
    assert set(c[1:] for c in nvjpeg_cpu.CALLS) == {("RGB", "cpu", False)}
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[2] == ref[2] == sorted(ref[2], key=lambda n: (n[:2], n))  # class, then name


def test_a_refused_file_is_found_by_halving(tmp_path, nvjpeg_cpu):
    rng = np.random.default_rng(3)
    root = plain_folder(tmp_path / "d", 16, rng)
    save_jpeg(root / "c0" / "x004.jpg", photo(rng, 32, 32), comment=fake.REFUSE)  # 3rd of 16
    with open_source(str(root), test_fraction=0, workers=1, decoder="nvjpeg") as src:
        nvjpeg_cpu.CALLS.clear()
        got = read(src, 16)
        counts = src._gpu.counts
    with open_source(str(root), test_fraction=0, workers=1, decoder="threads") as src:
        ref = read(src, 16)
    np.testing.assert_array_equal(got[0], ref[0])
    assert counts == {"nvjpeg": 15, "pillow": 0, "refused": 1}
    # 16, 8 and 4 fail; of the halves 2 + 2, the second fails: 1 + 1; then 4 and 8 more
    assert [c[0] for c in nvjpeg_cpu.CALLS] == [16, 8, 4, 2, 2, 1, 1, 4, 8]


def test_waves_bound_the_pixels_of_one_call(tmp_path, nvjpeg_cpu, monkeypatch):
    root = plain_folder(tmp_path / "d", 8, np.random.default_rng(4))
    monkeypatch.setattr(gd, "WAVE_PIXELS", 3 * 32 * 32)
    with open_source(str(root), test_fraction=0, workers=1, decoder="nvjpeg") as src:
        nvjpeg_cpu.CALLS.clear()
        got = read(src, 8)
    with open_source(str(root), test_fraction=0, workers=1, decoder="threads") as src:
        ref = read(src, 8)
    assert [c[0] for c in nvjpeg_cpu.CALLS] == [3, 3, 2]
    np.testing.assert_array_equal(got[0], ref[0])


def test_one_channel_output_is_made_rgb(tmp_path, nvjpeg_cpu, monkeypatch):
    """A decoder that returns grey JPEGs as (1, H, W) despite mode RGB: grey and colour
    images of one size in one batch still give Pillow's RGB pixels."""
    rng = np.random.default_rng(19)
    for i in range(6):
        a = photo(rng, 32, 32)
        save_jpeg(tmp_path / "d" / "k" / f"x{i}.jpg", a[..., 0] if i % 2 else a)

    def keep_grey(input, mode=None, device="cpu", apply_exif_orientation=False):
        return fake.decode_jpeg(input, fake.ImageReadMode.UNCHANGED, device,
                                apply_exif_orientation)

    monkeypatch.setattr(sys.modules["torchvision.io"], "decode_jpeg", keep_grey)
    got = {}
    for decoder in ("nvjpeg", "threads"):
        with open_source(str(tmp_path / "d"), test_fraction=0, workers=1,
                         decoder=decoder) as src:
            got[decoder] = read(src, 6)[0]
    np.testing.assert_array_equal(got["nvjpeg"], got["threads"])


# --------------------------------------------------------------------------
# EXIF, draft and resizing


def test_exif_orientation_of_non_square_images(tmp_path, nvjpeg_cpu):
    """48x24 images with each orientation, to 16x16: nearest to Pillow's result among the
    eight ways to turn the image (the stand-in leaves the orientation to porder)."""
    rng = np.random.default_rng(5)
    a = photo(rng, 48, 24)
    a[:, :24] //= 3  # a dark left half: each turn differs
    a[:12, :, 1] = 255
    for o in range(1, 9):
        save_jpeg(tmp_path / "d" / "k" / f"o{o}.jpg", a, exif=exif_with(o), quality=95)
    with open_source(str(tmp_path / "d"), test_fraction=0, workers=1, decoder="nvjpeg",
                     size=16) as src:
        got = read(src, 8)[0].astype(float)
    with open_source(str(tmp_path / "d"), test_fraction=0, workers=1, decoder="threads",
                     size=16) as src:
        ref = read(src, 8)[0].astype(float)
    for o in range(8):
        dist = [np.abs(got[o] - ref[p]).mean() for p in range(8)]
        assert int(np.argmin(dist)) == o or dist[o] == min(dist), (o + 1, dist)
        assert dist[o] < 3, (o + 1, dist)


def test_orient_matches_pillows_exif_transpose():
    a = np.random.default_rng(6).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    t = torch.from_numpy(a).permute(2, 0, 1)
    for o in range(1, 9):
        im = Image.fromarray(a)
        im.getexif()[0x0112] = o
        want = np.asarray(ImageOps.exif_transpose(im))
        got = gd._orient(t, o).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"orientation {o}")


def count_interpolate(monkeypatch) -> list:
    calls = []
    real = torch.nn.functional.interpolate

    def spy(x, *args, **kw):
        calls.append(tuple(x.shape))
        return real(x, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "interpolate", spy)
    return calls


def test_resize_is_skipped_at_native_size_and_batched_per_shape(tmp_path, nvjpeg_cpu,
                                                                 monkeypatch):
    rng = np.random.default_rng(7)
    root = plain_folder(tmp_path / "d", 6, rng)
    save_jpeg(root / "c0" / "wide.jpg", photo(rng, 40, 30))
    save_jpeg(root / "c1" / "wide2.jpg", photo(rng, 40, 30))
    calls = count_interpolate(monkeypatch)
    with open_source(str(root), test_fraction=0, workers=1, decoder="nvjpeg", size=32) as src:
        read(src, 16)
    assert calls == [(2, 3, 30, 40)]  # only the two 40x30 images, in one call (one shape)
    calls.clear()
    with open_source(str(root), test_fraction=0, workers=1, decoder="nvjpeg", size=16) as src:
        images = read(src, 16)[0]
    # to 16: the 32x32 images are drafted by 2 to 16x16, and so not resized; the 40x30
    # ones are not drafted (30 < 2 x 16), and resized
    assert calls == [(2, 3, 30, 40)] and images.shape == (8, 16, 16, 3)


def test_draft_scale_is_pillows():
    """The factor of :func:`gd._draft_scale` is the one Pillow's ``draft`` picks."""
    rng = np.random.default_rng(8)
    for w, h, size in [(500, 375, 32), (64, 64, 32), (63, 64, 32), (130, 300, 32),
                       (256, 256, 32), (31, 31, 32), (1000, 90, 16), (40, 30, 16)]:
        im = Image.open(io.BytesIO(jpeg_bytes(photo(rng, w, h))))
        im.draft("RGB", (size, size))
        scale = round(w / im.size[0])
        assert gd._draft_scale(h, w, size) == scale, (w, h, size)
        assert im.size == (-(-w // scale), -(-h // scale))


def test_photos_close_to_pillows_path(nvjpeg_cpu, dogs_vs_cats, tmp_path):
    """With Pillow decoding on both sides, the draft emulation and torch's resize against
    Pillow's path (draft) and a full Pillow decode: loose bounds, numbers printed."""
    files = sorted(dogs_vs_cats.glob("*.jpg"))[:100]
    for f in files:
        dst = tmp_path / "d" / f.name
        dst.parent.mkdir(exist_ok=True)
        dst.symlink_to(f)
    with open_source(str(tmp_path / "d"), test_fraction=0, workers=2, decoder="nvjpeg") as src:
        got, _, names, _ = read(src, 50)
    with open_source(str(tmp_path / "d"), test_fraction=0, workers=2, decoder="threads") as src:
        ref = read(src, 50)[0].astype(np.int16)
    got = got.astype(np.int16)
    full = np.stack([np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "d" / n))
                                .convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
                     for n in names])
    d_draft, d_full = np.abs(got - ref), np.abs(got - full.astype(np.int16))
    print(f"\nnvjpeg plumbing (Pillow decodes) vs Pillow draft: max {d_draft.max()} mean "
          f"{d_draft.mean():.3f}; vs full decode: max {d_full.max()} mean {d_full.mean():.3f}")
    assert d_draft.mean() < 1.0 and d_full.mean() < 6.0


# --------------------------------------------------------------------------
# The header: what goes to nvJPEG


def test_plan_of_plain_progressive_and_grey_jpegs():
    rng = np.random.default_rng(9)
    a = photo(rng, 40, 24)
    assert gd._jpeg_plan(jpeg_bytes(a)) == (1, 40 * 24)
    assert gd._jpeg_plan(jpeg_bytes(a, progressive=True)) == (1, 40 * 24)
    assert gd._jpeg_plan(jpeg_bytes(a[..., 0])) == (1, 40 * 24)
    assert gd._jpeg_plan(jpeg_bytes(a, exif=exif_with(6))) == (6, 40 * 24)


def test_plan_sends_odd_files_to_pillow():
    rng = np.random.default_rng(10)
    a = photo(rng, 32, 32)
    data = jpeg_bytes(a)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    cmyk = io.BytesIO()
    Image.fromarray(a).convert("CMYK").save(cmyk, "JPEG")
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><tiff:Orientation>6</tiff:Orientation>"
    odd = {
        "png": buf.getvalue(),
        "cmyk": cmyk.getvalue(),
        "truncated": data[: len(data) // 2],
        "trailing bytes": data + b"\0",
        "empty": b"",
        "two EXIF": insert_segment(jpeg_bytes(a, exif=exif_with(6)), 0xE1,
                                   b"Exif\0\0" + tiff("II", [(0x0112, 3, 1, 3)])),
        "XMP orientation": insert_segment(data, 0xE1, xmp),
        "MPO": insert_segment(data, 0xE2, b"MPF\0" + bytes(20)),
        "Adobe RGB": insert_segment(data, 0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])),
        "lossless": data.replace(b"\xff\xc0", b"\xff\xc3", 1),
        "12-bit": data.replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1),
        "bad EXIF": insert_segment(data, 0xE1, b"Exif\0\0XX*\0\0\0\0\x08"),
    }
    for what, b in odd.items():
        assert gd._jpeg_plan(b) is None, what
    # the segments inserted above are fine in themselves: XMP without an orientation,
    # Adobe with transform 1 (YCbCr)
    assert gd._jpeg_plan(insert_segment(data, 0xE1, xmp[:29] + b"<x/>")) == (1, 1024)
    assert gd._jpeg_plan(insert_segment(data, 0xEE, b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 1]))) \
        == (1, 1024)


def tiff(order: str, entries: list[tuple[int, int, int, int]]) -> bytes:
    """A TIFF block with IFD0 ``entries`` (tag, type, count, value) in byte order ``order``."""
    e = "little" if order == "II" else "big"
    out = order.encode() + (42).to_bytes(2, e) + (8).to_bytes(4, e) + len(entries).to_bytes(2, e)
    for tag, typ, count, value in entries:
        val = value.to_bytes(2, e) + b"\0\0" if typ == 3 else value.to_bytes(4, e)
        out += tag.to_bytes(2, e) + typ.to_bytes(2, e) + count.to_bytes(4, e) + val
    return out + bytes(4)


@pytest.mark.parametrize("order", ["II", "MM"])
def test_exif_orientation_read_as_pillow_reads_it(order):
    """Where porder reads a value, Pillow reads the same from the same JPEG."""
    a = photo(np.random.default_rng(11), 16, 16)
    data = jpeg_bytes(a)
    cases = [[(0x0112, 3, 1, o)] for o in range(1, 9)]
    cases += [[(0x010F, 2, 4, 0x41424300), (0x0112, 3, 1, 5), (0x0131, 2, 4, 0x41424300)],
              [(0x010F, 2, 4, 0x41424300)]]  # no orientation
    for entries in cases:
        f = insert_segment(data, 0xE1, b"Exif\0\0" + tiff(order, entries))
        want = Image.open(io.BytesIO(f)).getexif().get(0x0112, 1)
        assert gd._jpeg_plan(f) == (want, 256), entries
    for entries in ([(0x0112, 4, 1, 6)], [(0x0112, 3, 2, 6)], [(0x0112, 3, 1, 0)],
                    [(0x0112, 3, 1, 6), (0x0112, 3, 1, 3)]):  # LONG, two values, 0, twice
        f = insert_segment(data, 0xE1, b"Exif\0\0" + tiff(order, entries))
        assert gd._jpeg_plan(f) is None, entries


def test_files_over_pillows_pixel_limit_go_to_pillow(monkeypatch):
    data = jpeg_bytes(photo(np.random.default_rng(12), 32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert gd._jpeg_plan(data) is None


class DeviceArray:
    """An array on a device, as far as the pipeline can tell: shape, dtype, ``get()``,
    and no implicit conversion to NumPy (CuPy raises TypeError there too)."""

    def __init__(self, a: np.ndarray):
        self._a = a
        self.shape, self.dtype, self.ndim = a.shape, a.dtype, a.ndim

    def __len__(self):
        return len(self._a)

    def get(self) -> np.ndarray:
        return self._a

    def __array__(self, *args, **kw):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


def test_build_cache_brings_device_batches_back_for_the_writer(tmp_path, nvjpeg_cpu,
                                                               monkeypatch):
    """build_cache with decoder='nvjpeg' and device 'cuda' played by the CPU: batches are
    device arrays (:class:`DeviceArray`, which refuses implicit conversion to NumPy as
    CuPy does), reorder returns that type, and the file written equals the one of the
    Pillow path."""
    import porder.pipeline as pipeline
    from porder.reader import read_split

    root = plain_folder(tmp_path / "d", 24, np.random.default_rng(22))
    monkeypatch.setattr(gd, "_to_array", lambda x: DeviceArray(x.numpy()))
    seen = []
    real = pipeline.reorder

    def reorder_on_cpu(images, *args, device, **kw):
        seen.append(type(images).__name__)
        if not isinstance(images, DeviceArray):  # the Pillow path's NumPy batches
            return real(images, *args, device="cpu", **kw)
        out, perm = real(images.get(), *args, device="cpu", **kw)
        return DeviceArray(out), DeviceArray(perm)

    monkeypatch.setattr(pipeline, "reorder", reorder_on_cpu)
    monkeypatch.setattr(pipeline, "resolve_device", lambda d: "cuda")
    pipeline.build_cache(pipeline.CacheSpec(str(root), tmp_path / "nv.h5", decoder="nvjpeg",
                                            device="cuda", batch_size=8, workers=2,
                                            test_fraction=0.25))
    assert set(seen) == {"DeviceArray"}
    seen.clear()
    pipeline.build_cache(pipeline.CacheSpec(str(root), tmp_path / "pil.h5", decoder="threads",
                                            device="cuda", batch_size=8, workers=2,
                                            test_fraction=0.25))
    assert set(seen) == {"ndarray"}
    for split in ("train", "test"):
        a, b = read_split(tmp_path / "nv.h5", split), read_split(tmp_path / "pil.h5", split)
        assert a["names"] == b["names"] and len(a["names"]) == (18 if split == "train" else 6)
        for key in ("images", "labels", "perm"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------
# Options and what is missing


def test_nvjpeg_needs_device_cuda(tmp_path):
    from porder.pipeline import CacheSpec, build_cache

    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(13))
    with pytest.raises(ValueError) as e:
        build_cache(CacheSpec(str(root), tmp_path / "o.h5", device="cpu", decoder="nvjpeg"))
    msg = str(e.value)
    assert "decoder='nvjpeg'" in msg and "device='cuda'" in msg and "--device cuda" in msg
    assert "--decoder threads" in msg and "\n" not in msg
    assert not (tmp_path / "o.h5").exists()


def test_cli_nvjpeg_needs_device_cuda(tmp_path):
    from click.testing import CliRunner

    from porder.cli import main

    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(14))
    res = CliRunner().invoke(main, ["reorder", str(root), str(tmp_path / "o.h5"),
                                    "--decoder", "nvjpeg"])
    assert res.exit_code == 2
    assert "--decoder nvjpeg" in res.output and "--device cuda" in res.output
    assert "--decoder threads" in res.output


def test_missing_torchvision_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(15))
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails
    with pytest.raises(SourceError) as e:
        open_source(str(root), decoder="nvjpeg")
    msg = str(e.value)
    assert "needs torchvision" in msg and "pip install torchvision" in msg
    assert "--decoder threads" in msg and "\n" not in msg


def test_old_torchvision_is_refused(tmp_path, monkeypatch):
    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(16))
    fake.install(monkeypatch, version="0.18.1")
    with pytest.raises(SourceError, match=r"needs torchvision >= 0\.19 .*found 0\.18\.1.*"
                                          r"--decoder threads"):
        open_source(str(root), decoder="nvjpeg")


def test_no_cuda_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(17))
    fake.install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SourceError, match=r"needs a CUDA GPU .*--decoder threads"):
        open_source(str(root), decoder="nvjpeg")


def test_a_torchvision_that_cannot_decode_is_refused(tmp_path, nvjpeg_cpu, monkeypatch):
    root = plain_folder(tmp_path / "d", 2, np.random.default_rng(18))

    def broken(*a, **kw):
        raise RuntimeError("image extension not loaded")

    monkeypatch.setattr(sys.modules["torchvision.io"], "decode_jpeg", broken)
    with pytest.raises(SourceError, match=r"cannot decode a JPEG on 'cpu' \(image extension "
                                          r"not loaded\)"):
        open_source(str(root), decoder="nvjpeg")


def test_version_parsing():
    assert gd._version("0.26.0+cu130") == (0, 26)
    assert gd._version("0.19") == (0, 19)
    assert gd._version("1.0.0a0") == (1, 0)
    assert gd._version("weird") == (0, 0)


# --------------------------------------------------------------------------
# On a GPU: the real nvJPEG against Pillow


def real_nvjpeg():
    """Skip unless CuPy, torchvision and a CUDA GPU are all here."""
    from porder.backend import cuda_available

    if not cuda_available():
        pytest.skip("CuPy with a CUDA GPU is not available on this machine")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    pytest.importorskip("torchvision")


@pytest.mark.gpu
def test_gpu_nvjpeg_close_to_pillow(tmp_path):
    real_nvjpeg()
    import cupy

    rng = np.random.default_rng(20)
    root = tmp_path / "d"
    for i in range(40):
        save_jpeg(root / "small" / f"s{i}.jpg", photo(rng, 32, 32))
    for i in range(12):
        save_jpeg(root / "photo" / f"p{i}.jpg", photo(rng, 500 - 4 * i, 375))
    save_jpeg(root / "odd" / "grey.jpg", photo(rng, 64, 48)[..., 0])
    save_jpeg(root / "odd" / "rot6.jpg", photo(rng, 64, 48), exif=exif_with(6))
    save_jpeg(root / "odd" / "prog.jpg", photo(rng, 64, 48), progressive=True)
    Image.fromarray(photo(rng, 32, 32)).convert("CMYK").save(root / "odd" / "cmyk.jpg")
    Image.fromarray(photo(rng, 32, 32)).save(root / "odd" / "p.png")
    truncated_jpeg(root / "odd" / "cut.jpg", rng)
    got = {}
    for decoder in ("threads", "nvjpeg"):
        with open_source(str(root), test_fraction=0, on_error="skip", workers=4,
                         decoder=decoder) as src:
            batches = list(src.iter_batches("train", 16))
            if decoder == "nvjpeg":
                assert all(isinstance(b.images, cupy.ndarray) for b in batches)
                print("\ncounts", src._gpu.counts)
            got[decoder] = (np.concatenate([cupy.asnumpy(b.images) for b in batches]),
                            np.concatenate([b.labels for b in batches]),
                            [n for b in batches for n in b.names],
                            [s for b in batches for s in b.skipped])
    a, b = got["nvjpeg"], got["threads"]
    assert a[0].shape == b[0].shape and a[2] == b[2] and a[3] == b[3]
    np.testing.assert_array_equal(a[1], b[1])
    diff = np.abs(a[0].astype(np.int16) - b[0])
    for group in ("small", "photo", "odd"):
        rows = [i for i, n in enumerate(a[2]) if n.startswith(group)]
        d = diff[rows]
        print(f"nvjpeg vs Pillow, {group}: max {d.max()} mean {d.mean():.3f}")
    assert diff.mean() < 3


@pytest.mark.gpu
def test_gpu_cli_reorder_with_nvjpeg_writes_a_valid_file(tmp_path):
    real_nvjpeg()
    from click.testing import CliRunner

    from porder.cli import main
    from porder.reader import open_checked, read_split

    root = plain_folder(tmp_path / "d", 30, np.random.default_rng(21), size=(48, 40))
    out = {}
    for decoder in ("nvjpeg", "threads"):
        path = tmp_path / f"{decoder}.h5"
        res = CliRunner().invoke(main, ["reorder", str(root), str(path), "--device", "cuda",
                                        "--decoder", decoder, "-b", "8", "--no-progress"])
        assert res.exit_code == 0, res.output
        f, _ = open_checked(path, contents=True)
        f.close()
        out[decoder] = read_split(path, "train"), read_split(path, "test")
    for split in (0, 1):
        a, b = out["nvjpeg"][split], out["threads"][split]
        assert a["names"] == b["names"]
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert a["images"].shape == b["images"].shape
