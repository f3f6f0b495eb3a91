"""Decoding image files with Pillow, resizing, and the source of image files
decoded per batch on a thread pool.

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
  raises :class:`SourceError` under ``on_error="fail"``; under
  ``on_error="skip"`` it is left out of its batch and listed in
  :attr:`Batch.skipped`.

Decoding files runs on ``workers`` threads or worker processes (default: the
CPUs this process may use), chosen by ``decoder``:

* ``"threads"``: start at once. Pillow releases the GIL while it decodes and
  resizes, so threads scale on photos (on the 1000 JPEGs of Dogs vs. Cats, 2
  cores, as fast as processes); on tiny files (CIFAR's 32x32 JPEGs) most of
  the time is Pillow's Python code under the GIL, and threads run at about
  one core.
* ``"processes"``: :class:`~porder.sources.procs.DecodeProcesses`, the same
  decoding function in worker processes, so identical pixels on every core; a
  worker costs about 0.3 s to start, and a decoder crash costs one file, not
  the run.
* ``"auto"`` (the default): processes when at least :data:`AUTO_PROCESSES_MIN`
  files are to be read and ``workers`` > 1, else threads.
* ``"nvjpeg"``: threads read the files' bytes, and JPEGs are decoded and
  resized on a CUDA GPU with torchvision's nvJPEG decoder; the batches are CuPy
  arrays on the GPU. Other files, and JPEGs nvJPEG is not trusted with, are
  decoded by Pillow as above. The pixels differ slightly from Pillow's; see
  :mod:`porder.sources.gpu_decode`.

With ``workers=1`` files are decoded in the caller's thread. The next batch is
decoded while the caller works on the current one.
"""
from __future__ import annotations

import io
import math
from concurrent.futures import Future
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import fastjpeg
from .base import Batch, Source, SourceError, _one_line, open_regular, printable, stored_name
from .procs import DecodeProcesses

DECODER_CHOICES = ("auto", "threads", "processes", "nvjpeg")
#: ``decoder="auto"`` reads this many files or more with worker processes.
AUTO_PROCESSES_MIN = 4096
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The one resampling filter of the module (antialiased when shrinking).
RESAMPLE = Image.Resampling.BICUBIC


def _resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(B, s, s, C) uint8 -> (B, size, size, C) uint8 with :data:`RESAMPLE`; C is 1 or 3."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
        out[i] = np.asarray(pil.resize((size, size), RESAMPLE)).reshape(size, size, -1)
    return out


# --------------------------------------------------------------------------
# Decoding one image file


def _to_rgb(img: Image.Image) -> Image.Image:
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


def _decode_file(path: str, size: int) -> np.ndarray:
    """Read one image file as (size, size, 3) uint8; raises whatever Pillow raises.

    Only a regular file is opened (:func:`~porder.sources.base.open_regular`): a
    FIFO, device or dangling link named like an image is a bad image, never waited on.
    """
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
        return _decode_pillow(source, size)


def _decode_pillow(source, size: int) -> np.ndarray:
    """:func:`_decode_file`'s regular path, from an open binary file."""
    with _open_image(source) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()  # decode fully now: truncated files fail here
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), RESAMPLE)
        return np.asarray(rgb, dtype=np.uint8).reshape(size, size, 3)


def _decode_chunk(paths: Sequence[str], size: int) -> list[tuple[np.ndarray | None, str]]:
    """Decode several files; each result is (image, "") or (None, reason)."""
    out: list[tuple[np.ndarray | None, str]] = []
    for path in paths:
        try:
            out.append((_decode_file(path, size), ""))
        except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ...)
            out.append((None, stored_name(_one_line(exc))))
    return out


class _FileSource(Source):
    """Image files (class folders or Kaggle layout), decoded per batch by worker
    threads or processes (``decoder``, see the module docstring)."""

    def __init__(self, kind, description, classes, size, held_out, files, on_error,
                 workers, unlisted=None, decoder="auto"):
        super().__init__(kind, description, classes, size, held_out, workers)
        # split -> (paths, labels (N,) int64, names)
        self._files = files
        self._on_error = on_error
        self._decoder = decoder
        self._procs: DecodeProcesses | None = None
        self._gpu = None  # gpu_decode.NvjpegDecoder with decoder="nvjpeg"
        if decoder == "nvjpeg":
            from .gpu_decode import NvjpegDecoder

            self._gpu = NvjpegDecoder()
        # split -> [(folder name, reason)]: folders that could not be listed (on_error="skip"),
        # reported with the batch that covers sample 0 of the split
        self._unlisted = {split: list((unlisted or {}).get(split, ())) for split in files}

    def _count(self, split):
        return len(self._files[split][0])

    def close(self) -> None:
        super().close()
        if self._procs is not None:
            self._procs.shutdown()
            self._procs = None

    def _use_processes(self, files: int) -> bool:
        """Whether reading ``files`` files goes to worker processes (see ``decoder``)."""
        if self._workers == 1 or self._decoder in ("threads", "nvjpeg"):
            return False
        return self._decoder == "processes" or files >= AUTO_PROCESSES_MIN

    def _submit(self, split, lo, hi, processes=False) -> list[Future] | tuple[int, int]:
        """Start decoding samples [lo, hi); the work is collected by :meth:`_collect`."""
        if self._workers == 1:
            return (lo, hi)  # decoded serially in _collect
        paths = self._files[split][0][lo:hi]
        # A few chunks per worker: low overhead, and the workers stay balanced.
        step = max(1, math.ceil(len(paths) / (4 * self._workers)))
        chunks = [paths[i:i + step] for i in range(0, len(paths), step)]
        if processes:
            if self._closed:
                raise SourceError(f"source {self.description!r} is closed")
            if self._procs is None:
                self._procs = DecodeProcesses(self._workers)
            return [self._procs.submit(chunk, self.image_size) for chunk in chunks]
        pool = self._executor()
        return [pool.submit(self._read_chunk, chunk, self.image_size) for chunk in chunks]

    @property
    def _read_chunk(self):
        """What the threads run on a chunk of paths: Pillow's decode, or nvjpeg's file reads."""
        return _decode_chunk if self._gpu is None else self._gpu.read_chunk

    def _collect(self, split, lo, hi, work) -> Batch:
        paths, labels, names = self._files[split]
        if isinstance(work, tuple):
            results = self._read_chunk(paths[lo:hi], self.image_size)
        else:
            results = [r for future in work for r in future.result()]
        if self._gpu is not None:  # the JPEGs read, decoded on the GPU now
            results = self._gpu.finish(results, paths[lo:hi], self.image_size)
        keep, skipped = [], []
        for j, (image, reason) in enumerate(results):
            if image is not None:
                keep.append(j)
            elif self._on_error == "skip":
                skipped.append((names[lo + j], reason))
            else:
                raise SourceError(f"cannot decode image '{printable(paths[lo + j])}': "
                                  f"{printable(reason)} (to leave bad images out: --on-error "
                                  f"skip, or on_error='skip' in Python)")
        if lo == 0:
            skipped = self._unlisted[split] + skipped
        s = self.image_size
        if self._gpu is not None:  # a CuPy array on the GPU
            images = self._gpu.stack([results[j][0] for j in keep], s)
        else:
            images = (np.stack([results[j][0] for j in keep]) if keep
                      else np.empty((0, s, s, 3), dtype=np.uint8))  # (B, S, S, 3)
        return Batch(images, labels[lo:hi][keep], [names[lo + j] for j in keep], skipped)

    def _read(self, split, lo, hi):
        return self._collect(split, lo, hi,
                             self._submit(split, lo, hi, self._use_processes(hi - lo)))

    def _batches(self, split, batch_size, start, n):
        # Decode batch k + 1 while the caller works on batch k.
        bounds = [(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]
        if start == n == 0 and self._unlisted[split]:  # nothing to read: report them alone
            bounds = [(0, 0)]
        processes = self._use_processes(n - start)
        pending = []  # (lo, hi, work) submitted, not yet collected; at most 2
        try:
            for k, (lo, hi) in enumerate(bounds):
                if not pending:
                    pending.append((lo, hi, self._submit(split, lo, hi, processes)))
                if k + 1 < len(bounds):
                    pending.append((*bounds[k + 1],
                                    self._submit(split, *bounds[k + 1], processes)))
                batch = self._collect(split, *pending.pop(0))
                yield batch
        finally:  # abandoned early or failed: drop what was prefetched
            for _, _, work in pending:
                if isinstance(work, list):
                    for future in work:
                        future.cancel()
