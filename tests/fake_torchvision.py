"""A stand-in for torchvision, for testing porder.sources.gpu_decode without a GPU.

``install(monkeypatch)`` puts modules ``torchvision`` and ``torchvision.io`` into
``sys.modules``. Their ``decode_jpeg`` has torchvision's signature and list
semantics, and decodes with Pillow (full decode, no draft) into CPU torch
tensors (C, H, W): ``mode`` RGB/GRAY/UNCHANGED and ``apply_exif_orientation``
are honoured, and what it cannot decode raises RuntimeError, failing the whole
call as torchvision's CUDA path does. A JPEG whose comment holds
:data:`REFUSE` is refused too, standing for a file nvJPEG rejects though
Pillow reads it. Every call is recorded in :data:`CALLS`.
"""
from __future__ import annotations

import enum
import io
import sys
import types

import numpy as np
import torch
from PIL import Image, ImageOps

REFUSE = b"fake-nvjpeg-refuses-this"
# one (number of files, mode, device, apply_exif_orientation) per call
CALLS: list[tuple[int, str, str, bool]] = []


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def _decode_one(data: bytes, mode: ImageReadMode, apply_exif_orientation: bool) -> torch.Tensor:
    if REFUSE in data:
        raise RuntimeError("fake nvjpeg: refused")
    try:
        im = Image.open(io.BytesIO(data))
        if im.format != "JPEG":
            raise RuntimeError(f"fake nvjpeg: not a JPEG ({im.format})")
        if im.mode not in ("L", "RGB"):
            raise RuntimeError(f"fake nvjpeg: unsupported mode {im.mode}")
        im.load()
    except RuntimeError:
        raise
    except Exception as exc:  # what Pillow raises becomes torchvision's RuntimeError
        raise RuntimeError(f"fake nvjpeg: {exc}") from None
    if apply_exif_orientation:
        im = ImageOps.exif_transpose(im)
    if mode == ImageReadMode.RGB:
        im = im.convert("RGB")
    elif mode == ImageReadMode.GRAY:
        im = im.convert("L")
    a = np.asarray(im)
    a = a[:, :, None] if a.ndim == 2 else a       # (H, W, C)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()  # (C, H, W)


def decode_jpeg(input, mode=ImageReadMode.UNCHANGED, device="cpu", apply_exif_orientation=False):
    """torchvision.io.decode_jpeg's signature; decodes with Pillow on the CPU."""
    if isinstance(mode, str):
        mode = ImageReadMode[mode.upper()]
    single = isinstance(input, torch.Tensor)
    items = [input] if single else list(input)
    if not items:
        raise ValueError("Input list must contain at least one element")
    for t in items:
        if t.device.type != "cpu" or t.dtype != torch.uint8 or t.ndim != 1:
            raise ValueError("expected 1-D uint8 CPU tensors")
    CALLS.append((len(items), mode.name, str(device), bool(apply_exif_orientation)))
    out = [_decode_one(t.numpy().tobytes(), mode, apply_exif_orientation).to(device)
           for t in items]
    return out[0] if single else out


def install(monkeypatch, version: str = "0.26.0+fake") -> types.ModuleType:
    """Make ``import torchvision`` and ``from torchvision.io import decode_jpeg`` find this."""
    CALLS.clear()
    tv = types.ModuleType("torchvision")
    tv.__version__ = version
    tv_io = types.ModuleType("torchvision.io")
    tv_io.decode_jpeg = decode_jpeg
    tv_io.ImageReadMode = ImageReadMode
    tv.io = tv_io
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.io", tv_io)
    return tv
