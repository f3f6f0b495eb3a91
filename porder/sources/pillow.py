"""Decoding one image file with Pillow, and resizing: the one conversion rule of porder.

A leaf of :mod:`porder.sources`: it imports only :mod:`.base` and :mod:`.fastjpeg`,
and everything that decodes files calls it: the threads of the file source
(:mod:`.decode`), the worker processes (:mod:`.procs`) and the files that
``decoder='nvjpeg'`` leaves to Pillow (:mod:`.gpu_decode`). A test that patches
:func:`decode_file` here patches all three.

Image conversion (one rule for every file)
------------------------------------------
* Extensions .png .jpg .jpeg .bmp .gif .tif .tiff .webp (any case); names that
  start with a dot (``.DS_Store``, macOS ``._x.jpg``) are ignored. Multi-frame
  files (GIF, TIFF) give their first frame.
* The EXIF orientation is applied (``ImageOps.exif_transpose``). No colour
  management: embedded ICC profiles are ignored.
* Modes become RGB: alpha (RGBA, LA, PA, palette or grey/RGB transparency) is
  *composited on black*, i.e. every channel is multiplied by alpha/255, so
  fully transparent pixels are black whatever colour they store; 16-bit and
  32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 to 0..255
  with rounding (``round(v * 255 / 65535)``, values outside clipped); float
  images (``F``) are taken as 0..1 and scaled by 255 (clipped); CMYK, YCbCr,
  palette, 1-bit and grey images use Pillow's ``convert("RGB")``.
* Resizing *squashes* the whole image to ``size x size`` (no crop; the aspect
  ratio is not kept) with Pillow's antialiased ``Image.Resampling.BICUBIC``.
  An image that already has that size is not resampled, so its pixels are
  kept exactly. JPEGs are decoded with ``Image.draft`` first, which lets
  libjpeg scale by 1/2, 1/4 or 1/8 while staying at least ``size`` on each
  side (several times faster on photos; the result differs slightly from a
  full decode). CIFAR, ``digits`` and ``synthetic`` images are resized the
  same way when ``size`` is not their native size.
* Only regular files are opened (symbolic links to them included): a FIFO,
  socket, device or dangling link named like an image is a bad image, like a
  file Pillow cannot decode.
* A file Pillow cannot decode, truncated files included (Pillow's
  ``LOAD_TRUNCATED_IMAGES`` is left False and every image is fully loaded),
  raises :class:`~porder.sources.SourceError` under ``on_error="fail"``; under
  ``on_error="skip"`` it is left out of its batch and listed in
  :attr:`~porder.sources.Batch.skipped`.
* An image stored inside a larger file (a member of a WebDataset ``.tar``
  shard, the bytes of a Hugging Face ``image`` column) follows the same rule,
  from its bytes: see :func:`decode_file`'s items.
"""
from __future__ import annotations

import io
from typing import NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..messages import one_line
from . import fastjpeg
from .base import open_regular, stored_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The one resampling filter of porder (antialiased when shrinking).
RESAMPLE = Image.Resampling.BICUBIC


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(B, s, s, C) uint8 -> (B, size, size, C) uint8 with :data:`RESAMPLE`; C is 1 or 3."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out[i] = np.asarray(pil.resize((size, size), RESAMPLE)).reshape(size, size, -1)
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, by the rules of the module docstring."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img)  # (h, w) uint16 / int32 / float32
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0) * 255.0
            a8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        else:
            a = np.clip(a.astype(np.int64), 0, 65535)
            a8 = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")  # from L
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img if mode == "RGB" else img.convert("RGB")


def _open_image(handle) -> Image.Image:
    try:
        return Image.open(handle)
    except UnidentifiedImageError:  # Pillow's message would show the handle's repr
        raise UnidentifiedImageError("cannot identify image file") from None


class Member(NamedTuple):
    """An image stored inside a larger file: ``size`` bytes at ``offset`` of ``path``
    (a member of a WebDataset shard, located when the shard was listed)."""

    path: str
    offset: int
    size: int


class Missing(NamedTuple):
    """A sample with no image to decode; ``reason`` says why. It is skipped or
    raised (``on_error``) like an image Pillow cannot decode."""

    reason: str


#: What a decoder is given for one sample: a file's path, a :class:`Member` of a
#: file, the image's encoded bytes, or :class:`Missing`. Each is small to send to
#: a decoding process (a path or a member is read there).
Item = Union[str, Member, bytes, Missing]


def read_member(member: Member) -> bytes:
    """The bytes of a :class:`Member`, from a regular file; an OSError if they are
    not all there (the file was cut or changed since it was listed)."""
    with open_regular(member.path) as handle:
        handle.seek(member.offset)
        data = handle.read(member.size)
    if len(data) != member.size:
        raise OSError(f"the file ends {member.size - len(data):,} bytes into this image "
                      f"(cut or changed since it was listed)")
    return data


def read_item(item: Item) -> bytes:
    """The encoded bytes of an item (a whole file, a member, or the bytes themselves).

    Raises
    ------
    OSError
        The file cannot be read, or is not a regular file.
    ValueError
        ``item`` is :class:`Missing`.
    """
    if isinstance(item, Missing):
        raise ValueError(item.reason)
    if isinstance(item, Member):
        return read_member(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    with open_regular(item) as handle:
        return handle.read()


def decode_file(path: Item, size: int) -> np.ndarray:
    """Read one image (an :data:`Item`: a file's path, usually) as (size, size, 3)
    uint8; raises whatever Pillow raises.

    Only a regular file is opened (:func:`~porder.sources.base.open_regular`): a
    FIFO, device or dangling link named like an image is a bad image, never waited on.
    A :class:`Member`, bytes or :class:`Missing` go through :func:`decode_bytes`.
    """
    if not isinstance(path, str):
        return decode_bytes(read_item(path), size)
    with open_regular(path) as handle:
        head = handle.read(3)
        if head == b"\xff\xd8\xff":  # a JPEG: the common ones skip Pillow's Python parsing
            data = head + handle.read()
            image = fastjpeg.decode(data, size, RESAMPLE)
            if image is not None:
                return image
            source = io.BytesIO(data)
        else:
            handle.seek(0)
            source = handle
        return decode_pillow(source, size)


def decode_bytes(data: bytes, size: int) -> np.ndarray:
    """:func:`decode_file` of an image held in memory: the same rule, the same pixels."""
    if data[:3] == b"\xff\xd8\xff":
        image = fastjpeg.decode(data, size, RESAMPLE)
        if image is not None:
            return image
    return decode_pillow(io.BytesIO(data), size)


def decode_pillow(source, size: int) -> np.ndarray:
    """:func:`decode_file`'s regular path, from an open binary file."""
    with _open_image(source) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()  # decode fully now: truncated files fail here
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            img = ImageOps.exif_transpose(img)
        rgb = to_rgb(img)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), RESAMPLE)
        return np.asarray(rgb, dtype=np.uint8).reshape(size, size, 3)


def decode_chunk(paths: Sequence[Item], size: int) -> list[tuple[np.ndarray | None, str]]:
    """Decode several files (items); each result is (image (size, size, 3) uint8, "") or
    (None, reason)."""
    out: list[tuple[np.ndarray | None, str]] = []
    for path in paths:
        try:
            out.append((decode_file(path, size), ""))
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...)
            out.append((None, stored_name(one_line(exc))))
    return out
