"""The common JPEG, decoded by Pillow's own libjpeg decoder without its Python parsing.

On a small JPEG (CIFAR's 32x32 files) most of ``Image.open`` + ``load`` is
Pillow's Python code: reading every marker segment (quantisation and Huffman
tables included) into Python objects, which libjpeg then parses again in C.
For the files whose header says there is nothing for that Python code to decide,
this module hands the bytes straight to the decoder Pillow itself would use,
with the arguments Pillow would give it, so the pixels are identical:

* 8-bit, three-component frames (Pillow's mode ``RGB``; its tile is
  ``("jpeg", extents, 0, ("RGB", ""))`` whatever other markers say, as libjpeg
  itself reads the colour transform);
* no APP1 segment (EXIF or XMP, which may carry an orientation) and no APP2
  ``MPF`` segment (a multi-picture file, which Pillow opens as MPO);
* at most ``Image.MAX_IMAGE_PIXELS`` pixels (Pillow's decompression-bomb check).

``draft`` is applied as :meth:`PIL.JpegImagePlugin.JpegImageFile.draft` does
(libjpeg's DCT scaling by 8, 4 or 2 while staying at least ``size`` per side),
then the bicubic resize of :mod:`porder.sources.pillow`. Anything else, and any
file the decoder does not finish cleanly (truncated, corrupt), goes to the
regular path, which gives Pillow's own error. The tests compare both paths on
every kind of JPEG they make and check that the fast path is taken.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

#: False once Pillow's internals turn out not to be what this module expects:
#: every file then takes the regular path.
ENABLED = True

_JPEG = b"\xff\xd8\xff"
_NOT_FRAMES = (0xC4, 0xC8, 0xCC)  # DHT, JPG, DAC share the SOF range


def header_segments(data) -> list[tuple[int, bytes]] | None:
    """The marker segments of a JPEG up to its first scan, as ``(marker, payload)``
    pairs with the start of scan last; None if ``data`` is not a JPEG whose header
    is plainly formed (a marker without a segment, a segment past the end, no scan).

    Fill bytes (``FF FF``) are skipped. Shared with :mod:`porder.sources.gpu_decode`,
    which reads the same header for nvJPEG.
    """
    if not data.startswith(_JPEG):
        return None
    n, pos, out = len(data), 2, []
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte
            pos += 1
            continue
        if marker in (0x00, 0x01, 0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            return None  # no segment expected here: Pillow's parser decides
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        out.append((marker, data[pos + 4 : pos + 2 + length]))
        if marker == 0xDA:  # start of scan
            return out
        pos += 2 + length


def frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) if ``data`` is a JPEG this module decodes, else None."""
    segments = header_segments(data)
    if segments is None:
        return None
    size = None
    for marker, segment in segments:
        if marker == 0xE1 or (marker == 0xE2 and segment.startswith(b"MPF")):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if size is not None or len(segment) < 6 or segment[0] != 8 or segment[5] != 3:
                return None
            height, width = (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4]
            if not width or not height:
                return None
            size = (width, height)
    return size


def decode(data: bytes, size: int, resample) -> np.ndarray | None:
    """``data`` (a whole JPEG file) as (size, size, 3) uint8, or None for the regular path."""
    global ENABLED
    if not ENABLED:
        return None
    frame = frame_size(data)
    if frame is None:
        return None
    w, h = frame
    if Image.MAX_IMAGE_PIXELS is not None and w * h > Image.MAX_IMAGE_PIXELS:
        return None
    scale = min(w // size, h // size)  # JpegImageFile.draft's choice of DCT scaling
    s = next((s for s in (8, 4, 2) if scale >= s), 1)
    dw, dh = (w + s - 1) // s, (h + s - 1) // s
    try:
        im = Image.core.new("RGB", (dw, dh))
        decoder = Image._getdecoder("RGB", "jpeg", ("RGB", ""), (s, 0))
    except (AttributeError, TypeError, ValueError, OSError):  # another Pillow: never again
        ENABLED = False
        return None
    try:
        decoder.setimage(im, (0, 0, dw, dh))
        status, err = decoder.decode(data)
    finally:
        decoder.cleanup()
    if status >= 0 or err < 0:  # wants more data (truncated), or failed
        return None
    img = Image.Image()._new(im)
    if (dw, dh) != (size, size):
        img = img.resize((size, size), resample)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, 3)
