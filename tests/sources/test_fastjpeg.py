"""The JPEG fast path (porder.sources.fastjpeg): the pixels of Pillow's regular path
on every JPEG it takes, Pillow's regular path (and its errors) for every other file,
and taken for the common JPEGs (so it cannot silently stop working)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from porder.sources import fastjpeg
from porder.sources.pillow import RESAMPLE, decode_file, decode_pillow


def photo(w, h, seed=0):
    """Smooth, photo-like RGB content (JPEG-friendly), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (3 + c) + y / (5 + c)) for c in range(3)], -1) * 90 + 128
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def jpeg(a, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", **kw)
    return buf.getvalue()


def regular(data: bytes, size: int):
    """Pillow's regular path: the image, or the error as (type, message)."""
    try:
        return decode_pillow(io.BytesIO(data), size)
    except Exception as exc:  # noqa: BLE001 - compared, not handled
        return type(exc), str(exc)


def via_file(tmp_path, data: bytes, size: int):
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    try:
        return decode_file(str(path), size)
    except Exception as exc:  # noqa: BLE001
        return type(exc), str(exc)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b)
    return a == b


FAST_CASES = [
    dict(w=32, h=32),
    dict(w=32, h=32, quality=50, subsampling=0),              # 4:4:4
    dict(w=32, h=32, quality=95, subsampling=1),              # 4:2:2
    dict(w=33, h=31, subsampling=2),                          # odd sides, 4:2:0
    dict(w=100, h=75, progressive=True),
    dict(w=640, h=480, optimize=True),                        # draft by 8 at size 32
    dict(w=300, h=90),                                        # draft limited by the short side
    dict(w=20, h=20),                                         # upscaled, no draft
    dict(w=64, h=64, comment=b"hello"),                       # a COM segment
    dict(w=64, h=48, icc_profile=b"\0" * 300),                # an APP2 ICC segment
]


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()
                                                                      if k != "icc_profile"))
@pytest.mark.parametrize("size", [16, 32, 64])
def test_fast_path_gives_pillows_pixels_and_is_taken(case, size):
    case = dict(case)
    data = jpeg(photo(case.pop("w"), case.pop("h")), **case)
    got = fastjpeg.decode(data, size, RESAMPLE)
    assert got is not None, "the fast path was not taken"
    expected = regular(data, size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


def exif_orientation(a):
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg(a, exif=exif)


def cmyk():
    buf = io.BytesIO()
    Image.fromarray(photo(32, 32)).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("make, why", [
    (lambda: jpeg(photo(32, 32)[..., 0]), "grey"),
    (cmyk, "CMYK"),
    (lambda: exif_orientation(photo(48, 32)), "EXIF orientation"),
    (lambda: jpeg(photo(32, 32), exif=Image.Exif().tobytes()), "empty EXIF"),
    (lambda: jpeg(photo(64, 64))[:300], "truncated"),
    (lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF", "header only"),
    (lambda: jpeg(photo(32, 32)).replace(b"\xff\xda", b"\xff\x00", 1), "no scan"),
])
def test_other_files_take_pillows_regular_path(tmp_path, make, why):
    data = make()
    assert fastjpeg.decode(data, 32, RESAMPLE) is None, why
    assert same(via_file(tmp_path, data, 32), regular(data, 32)), why


def test_huge_frames_are_left_to_pillows_bomb_check(monkeypatch):
    data = jpeg(photo(64, 64))
    assert fastjpeg.decode(data, 32, RESAMPLE) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    assert fastjpeg.decode(data, 32, RESAMPLE) is None


def test_trailing_bytes_after_the_image(tmp_path):
    data = jpeg(photo(40, 40)) + b"\0garbage after the end marker" * 10
    assert same(via_file(tmp_path, data, 32), regular(data, 32))


def test_disabled_means_the_regular_path(monkeypatch):
    monkeypatch.setattr(fastjpeg, "ENABLED", False)
    assert fastjpeg.decode(jpeg(photo(32, 32)), 32, RESAMPLE) is None


def test_corrupted_jpegs_decode_or_fail_exactly_as_pillow_does(tmp_path):
    """Seeded byte flips anywhere in a file: the image, or the error, of the regular path."""
    rng = np.random.default_rng(7)
    originals = [jpeg(photo(32, 32, seed=s), quality=q) for s, q in ((0, 75), (1, 95))]
    originals.append(jpeg(photo(96, 64, seed=2), progressive=True))
    taken = 0
    for k in range(300):
        data = bytearray(originals[k % len(originals)])
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(3, len(data)))] = int(rng.integers(0, 256))
        data = bytes(data)
        taken += fastjpeg.decode(data, 32, RESAMPLE) is not None
        assert same(via_file(tmp_path, data, 32), regular(data, 32)), k
    assert taken > 50  # most flips land in entropy-coded data, which the fast path takes
