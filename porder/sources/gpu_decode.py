"""Decoding JPEG files on a CUDA GPU with nvJPEG (``decoder='nvjpeg'``).

The file source (:class:`~porder.sources.decode.FileSource`) hands this module
its files batch by batch; batches come out as CuPy arrays on the GPU, ready for
the kernels, with no host round trip in between:

1. Host threads read each file's bytes (regular files only, through
   :func:`~porder.sources.pillow.read_item`, as Pillow's path does; a member of
   a WebDataset shard or the bytes of a parquet row likewise) and read
   its JPEG header: the frame type, bit depth, components, size, and the EXIF
   orientation (:func:`_jpeg_plan`).
2. ``torchvision.io.decode_jpeg(list, mode=RGB, device="cuda")`` decodes the
   batch with nvJPEG in one call (torchvision >= 0.19), in waves of at most
   :data:`WAVE_PIXELS` pixels so that a batch of large photos stays within GPU
   memory. A call that raises is split in halves until the file nvJPEG refuses
   is alone.
3. The EXIF orientation is applied on the GPU (flips and transposes, as
   Pillow's ``ImageOps.exif_transpose``). torchvision ignores
   ``apply_exif_orientation`` on CUDA (read in the sources of 0.26 and 0.28:
   "only implemented for JPEG format on CPU"), so porder reads the tag itself
   and passes ``False``, which keeps the orientation from being applied twice
   should a later torchvision apply it on CUDA too.
4. Pillow's JPEG ``draft`` is emulated: an image at least twice ``size`` on
   each side is reduced by the factor libjpeg's DCT scaling would use (8, 4
   or 2) to the means of its blocks (:func:`_draft`). Then images of one shape
   are resized together to ``size x size`` with torch's antialiased bicubic
   filter (``interpolate(mode="bicubic", antialias=True)`` in float32, rounded
   and clamped to uint8); an image already of that size is not resampled, as
   on Pillow's path.
5. The batch, stacked to (B, S, S, 3) uint8 on the GPU, becomes a CuPy array
   through DLPack (:func:`_to_array`), the array :class:`~porder.sources.Batch`
   carries.

Pillow stays the reference, and every file nvJPEG is not trusted with goes to
Pillow's own :func:`~porder.sources.pillow.decode_file`, whose pixels, skips
and error messages are then exactly those of ``decoder='threads'``:

* files that are not JPEGs (magic bytes ``FF D8 FF``): PNG, GIF, ...;
* JPEGs that are not 8-bit baseline, extended or progressive Huffman frames
  with 1 or 3 components (CMYK and YCCK, 12-bit, lossless, arithmetic coding),
  3-component JPEGs stored as RGB (Adobe transform 0, or components named
  R, G, B without JFIF), MPO files (Pillow reads them as ``MPO``), files that
  do not end with the EOI marker (truncated files, trailing bytes), images
  over Pillow's ``MAX_IMAGE_PIXELS``, and any header this module cannot read;
* EXIF it cannot read exactly as Pillow would (an orientation that is not one
  SHORT, two EXIF segments, a malformed TIFF header or IFD), and an XMP
  ``tiff:Orientation`` without an EXIF one (Pillow versions differ there);
* files nvJPEG refuses (torchvision raises): decoded by Pillow alone.

What differs from Pillow (the pixels are not identical):

* the draft: libjpeg computes a scaled IDCT from the low DCT coefficients,
  porder's emulation takes block means of the full decode;
* torch's antialiased bicubic, in float32, where Pillow computes its bicubic
  (the same kernel, by the close match measured below) in fixed point;
* nvJPEG's IDCT and chroma upsampling, where Pillow uses libjpeg-turbo's
  integer IDCT and "fancy" (triangular) upsampling.

nvJPEG parses the files in this process, in native code: a hostile file
that gets past the header checks could crash it (nvJPEG has had such bugs,
e.g. a crash on malformed EXIF fixed in CUDA 12.2u2), where
``decoder='processes'`` would cost one file. Use that decoder for untrusted data.

The first two were measured on the CPU with Pillow decoding on both sides
(the stand-in decoder of tests/sources/test_gpu_decode.py; 300 Dogs vs. Cats
photos, about 500x375, to 32x32): torch's resize of the full decode against Pillow's without draft, max
6 and mean 0.07 absolute difference per pixel value; with the draft emulated,
against Pillow's default path (with draft), max 45 and mean 0.35 (without the
emulation: max 124, mean 3.7). The whole difference, nvJPEG included, on 32x32
and on photo-sized JPEGs, is measured by ``benchmarks/bench_gpu_decode.py`` on
the device, which has NOT been run yet.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..messages import one_line
from .base import SourceError
from .fastjpeg import header_segments
from .pillow import decode_chunk, read_item

#: torch device the images are decoded to; tests set ``"cpu"`` with a stand-in torchvision.
_DEVICE = "cuda"
#: torchvision that decodes a list of JPEGs in one CUDA call (``decode_jpegs_cuda``).
MIN_TORCHVISION = (0, 19)
#: Pixels (width x height, summed over files) decoded by one nvJPEG call.
WAVE_PIXELS = 2**27
# Emulate Pillow's JPEG draft (block means) before resizing; the benchmark turns it off
# to measure what it brings.
_EMULATE_DRAFT = True

_FIX = ("install the torchvision build that matches your torch (pip install torchvision), "
        "or use --decoder threads (decoder='threads')")

# SOF markers: 0xC0 baseline, 0xC1 extended sequential and 0xC2 progressive (Huffman)
# go to nvJPEG; the other frame types (lossless, hierarchical, arithmetic) to Pillow.
_SOF_NVJPEG = frozenset((0xC0, 0xC1, 0xC2))
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # less DHT, JPG, DAC
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


@dataclass
class _Jpeg:
    """A file read on a host thread, for nvJPEG: its bytes and header facts."""

    data: bytearray
    orientation: int  # EXIF orientation, 1 (none) to 8; other values change nothing
    pixels: int       # width x height from the frame header


# --------------------------------------------------------------------------
# torchvision, and whether it can be used


def _version(text: str) -> tuple[int, int]:
    """'0.26.0+cu130' -> (0, 26); unreadable parts count as 0."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0
             for p in text.split("+")[0].split(".")[:2]]
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def _torchvision():
    """torch, ``torchvision.io.decode_jpeg`` and ``ImageReadMode``; SourceError if missing."""
    try:
        import torch
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise SourceError(f"decoder='nvjpeg' needs torchvision, which does not import "
                          f"({one_line(exc)}); {_FIX}") from None
    found = getattr(torchvision, "__version__", "0")
    if _version(found) < MIN_TORCHVISION:
        need = ".".join(map(str, MIN_TORCHVISION))
        raise SourceError(f"decoder='nvjpeg' needs torchvision >= {need} (batched JPEG "
                          f"decoding on CUDA), found {found}; upgrade torchvision, or use "
                          f"--decoder threads (decoder='threads')")
    return torch, decode_jpeg, ImageReadMode


def check_available() -> None:
    """Check that ``decoder='nvjpeg'`` can run here, before any file is read.

    torchvision >= 0.19 must import; on CUDA, torch must see a GPU and CuPy must
    be installed (the batches are CuPy arrays); and one small JPEG is decoded,
    so that a torchvision whose image extension did not load fails here, with
    its reason, instead of sending every file to Pillow.

    Raises
    ------
    SourceError
        One line: what is missing, what to install, and ``--decoder threads``.
    """
    torch, decode_jpeg, mode = _torchvision()
    if _DEVICE.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SourceError(f"decoder='nvjpeg' needs a CUDA GPU that torch can use, and "
                              f"torch {torch.__version__} sees none; install a CUDA build of "
                              f"torch and torchvision, or use --decoder threads "
                              f"(decoder='threads')")
        from ..backend import cuda_available

        if not cuda_available():
            raise SourceError("decoder='nvjpeg' hands the images to CuPy, which is not installed "
                              "or sees no GPU: pip install \"patch-order[gpu]\", or use "
                              "--decoder threads (decoder='threads')")
    import io

    from PIL import Image

    probe = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(probe, "JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)],
                    mode=mode.RGB, device=_DEVICE, apply_exif_orientation=False)
    except Exception as exc:
        raise SourceError(f"decoder='nvjpeg': torchvision cannot decode a JPEG on "
                          f"{_DEVICE!r} ({one_line(exc)}); {_FIX}") from None


# --------------------------------------------------------------------------
# The JPEG header, read on the host


def _u16(b, i: int, order: str = "big") -> int:
    return int.from_bytes(b[i:i + 2], order)


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of IFD0 of a TIFF block (an EXIF segment less ``Exif\\0\\0``).

    Returns the value, 0 when the tag is absent, or None when the block is not
    read as plainly as Pillow reads it (bad header, IFD out of bounds, a tag
    that is not one SHORT, a repeated tag, the value 0).
    """
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "little" if tiff[:2] == b"II" else "big"
    if _u16(tiff, 2, order) != 42:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd < 8 or ifd + 2 > len(tiff):
        return None
    count = _u16(tiff, ifd, order)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    value = 0
    for p in range(ifd + 2, ifd + 2 + 12 * count, 12):
        if _u16(tiff, p, order) != 0x0112:
            continue
        if value or _u16(tiff, p + 2, order) != 3 or int.from_bytes(tiff[p + 4:p + 8], order) != 1:
            return None  # repeated, or not one SHORT
        value = _u16(tiff, p + 8, order)
        if value == 0:
            return None
    return value


def _jpeg_plan(data) -> tuple[int, int] | None:
    """``(orientation, pixels)`` of a JPEG that nvJPEG may decode as Pillow would, else None.

    None sends the file to Pillow (the module docstring lists why). Only the
    markers before the first scan are read, and the file must end with EOI.
    """
    if len(data) < 8 or data[-2:] != b"\xff\xd9":
        return None
    segments = header_segments(data)
    if segments is None:
        return None
    sof, exif, xmp, jfif, adobe = None, None, False, False, None
    for marker, seg in segments:
        if marker in _SOF_ANY:
            if sof is not None or marker not in _SOF_NVJPEG:
                return None
            sof = seg
        elif marker == 0xE0 and seg.startswith(b"JFIF"):
            jfif = True
        elif marker == 0xE1 and seg.startswith(b"Exif"):
            if exif is not None or not seg.startswith(b"Exif\0\0"):
                return None
            exif = bytes(seg[6:])
        elif marker == 0xE1 and seg.startswith(_XMP):
            xmp = xmp or b"tiff:Orientation" in seg
        elif marker == 0xE2 and seg.startswith(b"MPF\0"):
            return None  # an MPO file: Pillow opens it as such (no draft)
        elif marker == 0xEE and seg.startswith(b"Adobe"):
            if len(seg) < 12:
                return None
            adobe = seg[11]
    if sof is None or len(sof) < 6:
        return None
    precision, height, width, comps = sof[0], _u16(sof, 1), _u16(sof, 3), sof[5]
    if precision != 8 or not height or not width or comps not in (1, 3) \
            or len(sof) != 6 + 3 * comps:
        return None
    if comps == 3 and ((adobe is not None and adobe != 1)
                       or (adobe is None and not jfif and bytes(sof[6::3]) == b"RGB")):
        return None  # stored as RGB, not YCbCr
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None  # Pillow warns or refuses: let it
    orientation = 0 if exif is None else _exif_orientation(exif)
    if orientation is None or (orientation == 0 and xmp):
        return None
    return orientation or 1, width * height


def read_chunk(paths: Sequence[str], size: int) -> list:
    """Read files on a host thread: a :class:`_Jpeg` for nvJPEG, else Pillow's result.

    Each entry is a :class:`_Jpeg`, or ``(image, "")`` / ``(None, reason)`` from
    :func:`~porder.sources.pillow.decode_chunk` for a file Pillow decodes (one
    that is not a JPEG nvJPEG is trusted with, or cannot be read).
    """
    out: list = []
    for path in paths:  # file paths, or the items of pillow.decode_file (tar members, bytes)
        try:
            data = bytearray(read_item(path))
        except Exception:  # Pillow's path raises it again, with its own message
            data = None
        plan = _jpeg_plan(data) if data is not None else None
        if plan is None:
            out.extend(decode_chunk([path], size))
        else:
            out.append(_Jpeg(data, *plan))
    return out


# --------------------------------------------------------------------------
# On the device


def _to_array(x):
    """(B, S, S, 3) uint8 torch tensor on the GPU -> CuPy array, through DLPack (no copy)."""
    import cupy

    return cupy.from_dlpack(x)


def _orient(t, orientation: int):
    """(C, H, W) tensor -> the tensor as Pillow's ``exif_transpose`` turns it."""
    if orientation == 2:
        return t.flip(-1)                   # FLIP_LEFT_RIGHT
    if orientation == 3:
        return t.flip(-2, -1)               # ROTATE_180
    if orientation == 4:
        return t.flip(-2)                   # FLIP_TOP_BOTTOM
    if orientation == 5:
        return t.transpose(-2, -1)          # TRANSPOSE
    if orientation == 6:
        return t.rot90(-1, (-2, -1))        # ROTATE_270 (90 degrees clockwise)
    if orientation == 7:
        return t.transpose(-2, -1).flip(-2, -1)  # TRANSVERSE
    if orientation == 8:
        return t.rot90(1, (-2, -1))         # ROTATE_90 (counter-clockwise)
    return t


def _draft_scale(height: int, width: int, size: int) -> int:
    """The factor Pillow's ``draft`` lets libjpeg scale by: 8, 4, 2 or 1, keeping both sides >= size."""
    fits = min(width // size, height // size)
    return next((f for f in (8, 4, 2) if f <= fits), 1)


def _draft(x, size: int):
    """(n, C, h, w) uint8 -> (n, C, ceil(h/f), ceil(w/f)) uint8: Pillow's JPEG ``draft``, emulated.

    Pillow decodes a JPEG at least twice ``size`` on each side at 1/2, 1/4 or
    1/8 scale (libjpeg's DCT scaling, :func:`_draft_scale`); the mean of each
    f x f block (partial blocks at the edges: their pixels' mean) approximates
    it, as the DCT's DC term is the block mean. Off with ``_EMULATE_DRAFT = False``.
    """
    f = _draft_scale(x.shape[-2], x.shape[-1], size) if _EMULATE_DRAFT else 1
    if f == 1:
        return x
    import torch

    y = torch.nn.functional.avg_pool2d(x.float(), f, f, ceil_mode=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _resize(x, size: int):
    """(n, 3, h, w) uint8 -> (n, 3, size, size) uint8: antialiased bicubic, unless already that size."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    import torch

    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic",
                                        antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class NvjpegDecoder:
    """Finishes the batches of a file source on the GPU (see the module docstring).

    ``counts`` tallies the files of all batches: ``nvjpeg`` (decoded by nvJPEG),
    ``pillow`` (sent to Pillow by their header, or unreadable) and ``refused``
    (nvJPEG raised; then decoded by Pillow).
    """

    def __init__(self):
        self.counts = {"nvjpeg": 0, "pillow": 0, "refused": 0}

    def read_chunk(self, paths: Sequence[str], size: int) -> list:
        """:func:`read_chunk`, on a host thread."""
        return read_chunk(paths, size)

    def _decode(self, tensors: list) -> list:
        """nvJPEG on a list of byte tensors: a (C, H, W) tensor per file, None where refused."""
        torch, decode_jpeg, mode = _torchvision()
        if not tensors:
            return []
        try:
            out = decode_jpeg(tensors, mode=mode.RGB, device=_DEVICE,
                              apply_exif_orientation=False)
            return list(out)
        except RuntimeError:  # one bad file fails the call: find it, halving the list
            if len(tensors) == 1:
                return [None]
            half = len(tensors) // 2
            return self._decode(tensors[:half]) + self._decode(tensors[half:])

    def finish(self, results: list, paths: Sequence[str], size: int) -> list:
        """Decode the :class:`_Jpeg` entries of ``results`` (from :func:`read_chunk`).

        Returns one ``(image, "")`` or ``(None, reason)`` per file; the images
        are (size, size, 3) uint8 tensors on the device, those Pillow decoded
        included.
        """
        torch, _, _ = _torchvision()
        out = list(results)
        jobs = [j for j, r in enumerate(results) if isinstance(r, _Jpeg)]
        self.counts["pillow"] += len(results) - len(jobs)
        waves, wave, pixels = [], [], 0
        for j in jobs:
            if wave and pixels + results[j].pixels > WAVE_PIXELS:
                waves.append(wave)
                wave, pixels = [], 0
            wave.append(j)
            pixels += results[j].pixels
        waves.append(wave)
        for wave in waves:
            decoded = self._decode([torch.frombuffer(results[j].data, dtype=torch.uint8)
                                    for j in wave])
            stored: dict = {}  # (C, h, w) as stored -> [(j, (C, h, w) tensor)]
            for j, t in zip(wave, decoded):
                if t is None or t.ndim != 3 or t.shape[0] not in (1, 3):
                    self.counts["refused"] += 1
                    out[j] = decode_chunk([paths[j]], size)[0]  # Pillow's pixels or reason
                    continue
                self.counts["nvjpeg"] += 1
                stored.setdefault(tuple(t.shape), []).append((j, t))
            oriented: dict = {}  # (h, w) after the EXIF orientation -> [(j, (3, h, w) tensor)]
            for members in stored.values():
                x = _draft(torch.stack([t for _, t in members]), size)  # (n, 1 or 3, h', w')
                for k, (j, _) in enumerate(members):
                    t = _orient(x[k].expand(3, -1, -1), results[j].orientation)
                    oriented.setdefault(tuple(t.shape[1:]), []).append((j, t))
            for members in oriented.values():
                x = _resize(torch.stack([t for _, t in members]), size)  # (n, 3, S, S)
                x = x.permute(0, 2, 3, 1)                                # (n, S, S, 3)
                for k, (j, _) in enumerate(members):
                    out[j] = (x[k], "")
        host = [j for j, r in enumerate(out) if isinstance(r[0], np.ndarray)]
        if host:  # Pillow's images: one copy to the device
            x = torch.from_numpy(np.stack([out[j][0] for j in host])).to(_DEVICE)
            for k, j in enumerate(host):
                out[j] = (x[k], "")
        return out

    def stack(self, images: list, size: int):
        """(S, S, 3) device tensors -> (B, S, S, 3) uint8 array (CuPy on CUDA) via :func:`_to_array`."""
        import torch

        if images:
            x = torch.stack(images)  # (B, S, S, 3)
        else:
            x = torch.empty((0, size, size, 3), dtype=torch.uint8, device=_DEVICE)
        return _to_array(x.contiguous())
