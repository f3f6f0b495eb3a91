"""Dataset readers: every SOURCE becomes batches of uint8 RGB images of one size.

A source is opened with :func:`open_source` and read split by split with
:meth:`Source.iter_batches`, one batch at a time, so memory stays bounded
whatever the dataset size (CIFAR and ``digits`` are small enough to be held
whole; image folders are decoded per batch; ``synthetic`` images are generated
per batch).

Accepted SOURCE forms (see :data:`SOURCE_HELP`)
-----------------------------------------------
* CIFAR-10 / CIFAR-100, the official *python* version: the extracted folder
  (``cifar-10-batches-py/``, ``cifar-100-python/``) or the archive as
  distributed (``.tar.gz``, read in one pass without extracting). Pickles are
  loaded by a restricted unpickler that only accepts NumPy arrays, so a
  malicious archive cannot run code.
* An image folder with one sub-folder per class (class names are the sorted
  sub-folder names; images are found recursively inside a class folder),
  optionally below ``train/`` and ``test/``, which must hold the same classes.
* The Kaggle Dogs vs. Cats layout: images directly inside a folder, named
  ``<label>.<id>.<ext>`` (``cat.12.jpg`` is class ``cat``).
* ``synthetic:N[:C]``: N generated images of C classes (default 10).
* ``digits``: scikit-learn's 1797 8x8 handwritten digits (bundled, no download).

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
* A file Pillow cannot decode, truncated files included (Pillow's
  ``LOAD_TRUNCATED_IMAGES`` is left False and every image is fully loaded),
  raises :class:`SourceError` under ``on_error="fail"``; under
  ``on_error="skip"`` it is left out of its batch and listed in
  :attr:`Batch.skipped`.

Splits
------
Every source has the splits ``train`` and ``test``. CIFAR and image folders
with ``train/`` and ``test/`` bring their own; every other source holds out a
deterministic fraction ``test_fraction`` of its samples: the samples whose rank
in ``np.random.default_rng(seed).permutation(n)`` is below
``round(test_fraction * n)`` form the test split; both splits keep the source
order. Samples are read in a fixed order (natural order of file names, e.g.
``cat.2.jpg`` before ``cat.10.jpg``), so resuming at sample ``start`` gives
exactly the batches an uninterrupted run would have given.

Decoding files runs on a thread pool of ``workers`` threads (default: the
CPUs this process may use); Pillow releases the GIL while decoding and resizing, and
threads start instantly and are safe next to CUDA, so they are preferred to a
process pool (on the 1000 JPEGs of Dogs vs. Cats, 2 cores, a thread pool was
as fast as or faster than a process pool, which also pays its start-up). The
next batch is decoded while the caller works on the current one.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import re
import tarfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "SOURCE_HELP",
    "IMAGE_EXTENSIONS",
    "RESAMPLE",
    "SourceError",
    "Batch",
    "Source",
    "open_source",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# The one resampling filter of the module (antialiased when shrinking).
RESAMPLE = Image.Resampling.BICUBIC
SPLITS = ("train", "test")
LABEL_CHOICES = ("fine", "coarse")
ON_ERROR_CHOICES = ("fail", "skip")
SYNTHETIC_SIZE = 32  # native size of synthetic images
DEFAULT_SYNTHETIC_CLASSES = 10

SOURCE_HELP = """\
SOURCE is one of:
  PATH/cifar-10-batches-py, cifar-10-python.tar.gz   CIFAR-10, python version, folder or archive
  PATH/cifar-100-python, cifar-100-python.tar.gz     CIFAR-100 (--label coarse: 20 superclasses)
  PATH/<class>/<image>                                image folder, one sub-folder per class
  PATH/train/<class>/..., PATH/test/<class>/...       image folder with its own test split
  PATH/<label>.<id>.<ext>                             flat folder, Kaggle Dogs vs. Cats (cat.12.jpg)
  synthetic:N[:C]                                     N generated images of C classes (default 10)
  digits                                              scikit-learn's 1797 8x8 handwritten digits
Images (.png .jpg .jpeg .bmp .gif .tif .tiff .webp) of any mode become RGB (alpha composited on
black, 16-bit scaled to 8-bit, EXIF orientation applied) and are squashed, not cropped, to
SIZE x SIZE with bicubic resampling. Sources without their own test split hold out a seeded
random TEST_FRACTION of their samples as the test split."""


class SourceError(ValueError):
    """A source that cannot be opened or read; the message is one line naming the file."""


@dataclass
class Batch:
    """One batch of samples read from a :class:`Source`.

    Attributes
    ----------
    images : numpy.ndarray
        uint8 array of shape (B, S, S, 3).
    labels : numpy.ndarray
        int64 array of shape (B,); index into :attr:`Source.classes`.
    names : list of str
        Where each image came from, e.g. ``"cat.12.jpg"``, ``"train/cat/x.png"``,
        ``"cifar-100-python/train#17"``, ``"synthetic#5"``.
    skipped : list of (str, str)
        ``(name, reason)`` of each sample of this batch left out under
        ``on_error="skip"``; ``len(names) + len(skipped)`` is the number of
        samples the batch covers.
    """

    images: np.ndarray  # (B, S, S, 3) uint8
    labels: np.ndarray  # (B,) int64
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------
# Small shared helpers


def _one_line(exc: BaseException) -> str:
    """A one-line reason for an exception: its message, else its type name."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SourceError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _natural_key(text: str) -> tuple:
    """Sort key putting 'cat.2.jpg' before 'cat.10.jpg'; ties broken by the text itself."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def _holdout(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into (train, test) indices, both increasing.

    The test split is the samples whose rank in
    ``np.random.default_rng(seed).permutation(n)`` is below ``round(test_fraction * n)``.
    """
    k = round(test_fraction * n)
    is_test = np.zeros(n, dtype=bool)  # (n,)
    is_test[np.random.default_rng(seed).permutation(n)[:k]] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


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


def _decode_file(path: str, size: int) -> np.ndarray:
    """Read one image file as (size, size, 3) uint8; raises whatever Pillow raises."""
    with Image.open(path) as img:
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
            out.append((None, _one_line(exc)))
    return out


# --------------------------------------------------------------------------
# Sources


class Source:
    """A dataset opened by :func:`open_source`: class names and two splits of samples.

    Attributes
    ----------
    kind : str
        One of ``"cifar10", "cifar100", "folder", "kaggle", "synthetic", "digits"``.
    description : str
        The SOURCE string as given to :func:`open_source`.
    classes : list of str
        Class names; index = label.
    image_size : int
        Side S of every image yielded, (S, S, 3).
    held_out : float or None
        The ``test_fraction`` held out as the test split, or None when the
        source brings its own test split.
    """

    def __init__(self, kind: str, description: str, classes: list[str], image_size: int,
                 held_out: float | None, workers: int = 1):
        self.kind = kind
        self.description = description
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.held_out = held_out
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    # -- public API -------------------------------------------------------

    def splits(self) -> list[str]:
        """The split names, ``["train", "test"]``."""
        return list(SPLITS)

    def count(self, split: str) -> int:
        """Number of samples of ``split``, counted before any is skipped.

        Parameters
        ----------
        split : {'train', 'test'}

        Returns
        -------
        int
        """
        return self._count(self._check_split(split))

    def iter_batches(self, split: str, batch_size: int, start: int = 0,
                     stop: int | None = None) -> Iterator[Batch]:
        """Yield samples ``[start, stop)`` of a split, in order, in batches.

        Parameters
        ----------
        split : {'train', 'test'}
        batch_size : int
            Samples covered by each batch (>= 1); the last batch may cover fewer.
            A batch holds fewer images than it covers when some were skipped.
        start : int, optional
            First sample index, 0 <= start <= count(split). The batches from
            ``start`` are identical to the tail of a run from 0 when ``start``
            is a multiple of ``batch_size`` (and sample-for-sample identical
            in any case).
        stop : int, optional
            One past the last sample index, start <= stop <= count(split);
            default count(split). Shards of a dataset read ``[lo, hi)``.

        Returns
        -------
        iterator of Batch
            Arguments are checked at once; images are read as it is consumed,
            the next batch of image files being decoded in the background.

        Raises
        ------
        SourceError
            A bad argument; under ``on_error="fail"``, an image that cannot be decoded.
        """
        split = self._check_split(split)
        if self._closed:
            raise SourceError(f"source {self.description!r} is closed")
        batch_size = _check_int("batch_size", batch_size, 1)
        n = self._count(split)
        start = _check_int("start", start, 0)
        if start > n:
            raise SourceError(f"start {start} is past the end of split {split!r} ({n} samples)")
        if stop is not None:
            stop = _check_int("stop", stop, start)
            if stop > n:
                raise SourceError(f"stop {stop} is past the end of split {split!r} ({n} samples)")
            n = stop
        return self._batches(split, batch_size, start, n)

    def close(self) -> None:
        """Release what the source holds (worker threads); it cannot be read afterwards."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self._count(s)}" for s in SPLITS)
        return (f"<Source {self.kind} {self.description!r}: {len(self.classes)} classes, "
                f"{counts}, size {self.image_size}>")

    # -- for subclasses -----------------------------------------------------

    def _check_split(self, split: str) -> str:
        if split not in SPLITS:
            raise SourceError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
        return split

    def _count(self, split: str) -> int:
        raise NotImplementedError

    def _executor(self) -> ThreadPoolExecutor:
        """The worker threads, started on first use."""
        if self._closed:
            raise SourceError(f"source {self.description!r} is closed")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="porder-source")
        return self._pool

    def _read(self, split: str, lo: int, hi: int) -> Batch:
        """The batch covering samples [lo, hi) of ``split``."""
        raise NotImplementedError

    def _batches(self, split: str, batch_size: int, start: int, n: int) -> Iterator[Batch]:
        for lo in range(start, n, batch_size):
            yield self._read(split, lo, min(lo + batch_size, n))


class _CifarSource(Source):
    """CIFAR-10/100 held in memory as the original (N, 3072) channel-planar rows."""

    def __init__(self, kind, description, classes, size, data, labels, parts):
        super().__init__(kind, description, classes, size, None)
        self._data = data  # split -> (N, 3072) uint8
        self._labels = labels  # split -> (N,) int64
        self._parts = parts  # split -> (names of the pickle files, their first rows)

    def _count(self, split):
        return len(self._labels[split])

    def _read(self, split, lo, hi):
        rows = self._data[split][lo:hi]  # (B, 3072)
        images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        files, firsts = self._parts[split]
        part = np.searchsorted(firsts, np.arange(lo, hi), side="right") - 1  # (B,)
        names = [f"{files[p]}#{i - firsts[p]}" for i, p in zip(range(lo, hi), part, strict=True)]
        return Batch(_resize_images(images, self.image_size),
                     self._labels[split][lo:hi].copy(), names)


class _DigitsSource(Source):
    """scikit-learn's 8x8 digits, grey 0..16 scaled to 0..255, held-out test split."""

    def __init__(self, description, size, test_fraction, seed):
        from sklearn.datasets import load_digits  # slow import; only when used

        digits = load_digits()
        super().__init__("digits", description, [str(c) for c in range(10)], size,
                         test_fraction)
        grey = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        self._grey = grey[..., None]  # (1797, 8, 8, 1)
        self._labels = digits.target.astype(np.int64)  # (1797,)
        train, test = _holdout(len(grey), test_fraction, seed)
        self._index = {"train": train, "test": test}

    def _count(self, split):
        return len(self._index[split])

    def _read(self, split, lo, hi):
        idx = self._index[split][lo:hi]  # (B,)
        grey = _resize_images(self._grey[idx], self.image_size)  # (B, S, S, 1)
        images = np.ascontiguousarray(np.repeat(grey, 3, axis=3))
        return Batch(images, self._labels[idx], [f"digits#{i}" for i in idx])


class _FileSource(Source):
    """Image files (class folders or Kaggle layout), decoded per batch on worker threads."""

    def __init__(self, kind, description, classes, size, held_out, files, on_error,
                 workers):
        super().__init__(kind, description, classes, size, held_out, workers)
        # split -> (paths, labels (N,) int64, names)
        self._files = files
        self._on_error = on_error

    def _count(self, split):
        return len(self._files[split][0])

    def _submit(self, split, lo, hi) -> list[Future] | tuple[int, int]:
        """Start decoding samples [lo, hi); the work is collected by :meth:`_collect`."""
        if self._workers == 1:
            return (lo, hi)  # decoded serially in _collect
        pool = self._executor()
        paths = self._files[split][0][lo:hi]
        # A few chunks per worker: low overhead, and the workers stay balanced.
        step = max(1, math.ceil(len(paths) / (4 * self._workers)))
        return [pool.submit(_decode_chunk, paths[i:i + step], self.image_size)
                for i in range(0, len(paths), step)]

    def _collect(self, split, lo, hi, work) -> Batch:
        paths, labels, names = self._files[split]
        if isinstance(work, tuple):
            results = _decode_chunk(paths[lo:hi], self.image_size)
        else:
            results = [r for future in work for r in future.result()]
        keep, skipped = [], []
        for j, (image, reason) in enumerate(results):
            if image is not None:
                keep.append(j)
            elif self._on_error == "skip":
                skipped.append((names[lo + j], reason))
            else:
                raise SourceError(f"cannot decode image '{paths[lo + j]}': {reason} "
                                  f"(use on_error='skip' to leave bad images out)")
        s = self.image_size
        images = (np.stack([results[j][0] for j in keep]) if keep
                  else np.empty((0, s, s, 3), dtype=np.uint8))  # (B, S, S, 3)
        return Batch(images, labels[lo:hi][keep], [names[lo + j] for j in keep], skipped)

    def _read(self, split, lo, hi):
        return self._collect(split, lo, hi, self._submit(split, lo, hi))

    def _batches(self, split, batch_size, start, n):
        # Decode batch k + 1 while the caller works on batch k.
        bounds = [(lo, min(lo + batch_size, n)) for lo in range(start, n, batch_size)]
        pending = []  # (lo, hi, work) submitted, not yet collected; at most 2
        try:
            for k, (lo, hi) in enumerate(bounds):
                if not pending:
                    pending.append((lo, hi, self._submit(split, lo, hi)))
                if k + 1 < len(bounds):
                    pending.append((*bounds[k + 1], self._submit(split, *bounds[k + 1])))
                batch = self._collect(split, *pending.pop(0))
                yield batch
        finally:  # abandoned early or failed: drop what was prefetched
            for _, _, work in pending:
                if isinstance(work, list):
                    for future in work:
                        future.cancel()


# --------------------------------------------------------------------------
# Synthetic data

# Words of 64 random bits per sample: parameters, then the noise image.
_SYN_PARAM_WORDS = 11
# Per-sample hue jitter (turns): makes colour a weak cue, so the class is
# told mostly by the spatial structure (what patch ordering changes).
_SYN_HUE_JITTER = 0.3
_SYN_NOISE_WORDS = SYNTHETIC_SIZE * SYNTHETIC_SIZE * 3 // 8
_SYN_WORDS = _SYN_PARAM_WORDS + _SYN_NOISE_WORDS
_SYN_CHUNK = 256  # fewest samples worth sending to a worker thread
_SYN_CLEAN_SCALE = 192.0  # clean image in 0..192, plus noise in 0..63: never clips


def _hue_rgb(h: np.ndarray) -> np.ndarray:
    """(B,) hues in turns -> (B, 3) smooth colour-wheel RGB in [0, 1]."""
    return 0.5 + 0.5 * np.cos(2 * np.pi * (h[:, None] - np.array([0.0, 1 / 3, 2 / 3])))


class _SyntheticSource(Source):
    """Seeded synthetic images, generated per batch from (seed, sample index).

    Sample ``i`` is drawn from the 64-bit words ``[i * W, (i + 1) * W)`` of one
    PCG64 stream seeded by ``seed`` (W = 395: 11 parameter words and a
    3072-byte noise image), reached with ``PCG64.advance``; so any batch is
    regenerated alone, whatever the batch size or split. Images are
    bit-identical on one machine; another CPU or NumPy build may round a rare
    pixel differently (float32 sin/cos/exp).

    Each image (32 x 32) is a convex mix of three colours: a base colour A, a
    stripe colour B where the stripe profile ``t = (1 + cos(k.x + phi)) / 2``
    is high, and a blob colour D under a Gaussian blob ``g`` (weights
    ``(1 - t)(1 - g)``, ``t (1 - g)``, ``g``), times a per-channel gain, plus
    uniform noise (0..63 on a 0..192 image, so nothing clips). The class
    (label uniform over C) sets the stripe orientation ``pi * c / C``, the
    stripe frequency, the blob position and the hue; each sample jitters
    them (the hue by up to +-0.15 turn, so colour alone is a weak cue: a linear
    probe on mean colour reaches ~0.32 on 10 classes, one on stripe spectra
    plus pixels ~0.99) and draws its own phase, blob size, gain and noise.
    """

    def __init__(self, description, n, num_classes, size, test_fraction, seed, workers):
        super().__init__("synthetic", description,
                         [f"class{c}" for c in range(num_classes)], size, test_fraction,
                         workers)
        self._num_classes = num_classes
        self._state = np.random.PCG64(seed).state  # each call starts its own copy
        train, test = _holdout(n, test_fraction, seed)
        self._index = {"train": train, "test": test}

    def _count(self, split):
        return len(self._index[split])

    def _words(self, idx: np.ndarray) -> np.ndarray:
        """(B,) increasing sample indices -> (B, W) uint64 random words of those samples."""
        out = np.empty((len(idx), _SYN_WORDS), dtype=np.uint64)  # (B, W)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        firsts = np.concatenate(([0], breaks)).tolist()
        lasts = np.concatenate((breaks, [len(idx)])).tolist()
        gen = np.random.PCG64()
        gen.state = self._state  # a private generator: calls may run on several threads
        position = 0  # in words
        for a, b in zip(firsts, lasts, strict=True):  # one advance per run of consecutive indices
            target = int(idx[a]) * _SYN_WORDS
            gen.advance(target - position)
            out[a:b] = gen.random_raw((b - a) * _SYN_WORDS).reshape(b - a, _SYN_WORDS)
            position = int(idx[b - 1] + 1) * _SYN_WORDS
        return out

    def generate(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``idx`` (increasing) -> images (B, 32, 32, 3) uint8, labels (B,) int64."""
        words = self._words(idx)  # (B, W)
        b, c_count = len(idx), self._num_classes
        u = (words[:, :_SYN_PARAM_WORDS] >> np.uint64(11)) * (1.0 / 2**53)  # (B, 11) in [0, 1)
        labels = np.minimum((u[:, 0] * c_count).astype(np.int64), c_count - 1)  # (B,)
        c = labels.astype(np.float64)
        u = u.astype(np.float32)  # float32 from here: SIMD sin/cos/exp, half the memory
        # Class structure (fixed per class) jittered per sample.
        theta = (np.pi * (c + 0.5 * (u[:, 1] - 0.5)) / c_count).astype(np.float32)  # stripes
        freq = (1.5 + 2.5 * ((c * 0.7548776662) % 1.0)) * (0.9 + 0.2 * u[:, 2])  # cycles/image
        k = (2 * np.pi / SYNTHETIC_SIZE * freq).astype(np.float32)
        phase = np.float32(2 * np.pi) * u[:, 3]
        cx = (8 + 16 * ((c * 0.5698402910) % 1.0) + 6 * (u[:, 4] - 0.5)).astype(np.float32)
        cy = (8 + 16 * ((c * 0.3247179572) % 1.0) + 6 * (u[:, 5] - 0.5)).astype(np.float32)
        sigma = 2.5 + 2.0 * u[:, 6]  # blob size, px
        hue = (c * 0.6180339887 + _SYN_HUE_JITTER * (u[:, 10] - 0.5)) % 1.0  # colours
        a_col = _hue_rgb(hue)  # (B, 3)
        b_col = 0.15 + 0.35 * _hue_rgb(hue + 0.5)
        d_col = 0.55 + 0.45 * _hue_rgb(hue + 0.25)
        gain = _SYN_CLEAN_SCALE * (0.75 + 0.25 * u[:, 7:10])  # (B, 3) per channel

        # The clean image is a sum of 6 separable terms (rows P x columns R), so
        # one batched matmul (B, 32, 6) @ (B, 6, 32 * 3) renders it interleaved:
        #   clean = A + t (1 - g) U + g V,  U = B - A, V = D - A,  t = (1 + s) / 2,
        #   s = cos(al_x) cos(be_y) - sin(al_x) sin(be_y),  g = gx(x) gy(y).
        pos = np.arange(SYNTHETIC_SIZE, dtype=np.float32)  # (32,)
        centred = pos - np.float32((SYNTHETIC_SIZE - 1) / 2)
        al = (k * np.cos(theta))[:, None] * centred + phase[:, None]  # (B, 32) over x
        be = (k * np.sin(theta))[:, None] * centred  # (B, 32) over y
        inv = (-0.5 / sigma**2)[:, None]
        gx = np.exp(inv * (pos - cx[:, None]) ** 2)  # (B, 32)
        gy = np.exp(inv * (pos - cy[:, None]) ** 2)
        cos_al, sin_al, cos_be, sin_be = np.cos(al), np.sin(al), np.cos(be), np.sin(be)
        ones = np.ones_like(gx)
        rows = np.stack([ones, cos_be, sin_be, gy, cos_be * gy, sin_be * gy], axis=2)  # (B,32,6)
        cols = np.stack([ones, cos_al, -sin_al, gx, cos_al * gx, -sin_al * gx], axis=1)  # (B,6,32)
        u_col, v_col = b_col - a_col, d_col - a_col  # (B, 3)
        coef = np.stack([a_col + u_col / 2, u_col / 2, u_col / 2, v_col - u_col / 2,
                         -u_col / 2, -u_col / 2], axis=1) * gain[:, None, :]  # (B, 6, 3)
        coef[:, 0] += 0.5  # round to nearest on the cast below
        coef = coef.astype(np.float32)
        right = np.empty((b, 6, SYNTHETIC_SIZE, 3), dtype=np.float32)  # (B, 6, 32, 3)
        for ch in range(3):  # a loop: broadcasting over a last axis of 3 is slow
            np.multiply(cols, coef[:, :, ch, None], out=right[..., ch])
        clean = np.matmul(rows, right.reshape(b, 6, -1))  # (B, 32, 96)
        images = clean.astype(np.uint8).reshape(b, SYNTHETIC_SIZE, SYNTHETIC_SIZE, 3)
        noise = words[:, _SYN_PARAM_WORDS:].view(np.uint8)  # (B, 3072)
        images += (noise >> 2).reshape(images.shape)  # 0..63, no overflow
        return images, labels

    def _render(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.generate(idx)
        return _resize_images(images, self.image_size), labels

    def _read(self, split, lo, hi):
        idx = self._index[split][lo:hi]  # (B,)
        # Chunks of >= _SYN_CHUNK samples on the worker threads (NumPy releases
        # the GIL); every sample depends on its index only, so chunking is free.
        parts = min(self._workers, max(1, len(idx) // _SYN_CHUNK))
        if parts == 1:
            images, labels = self._render(idx)
        else:
            done = list(self._executor().map(self._render, np.array_split(idx, parts)))
            images = np.concatenate([d[0] for d in done])
            labels = np.concatenate([d[1] for d in done])
        return Batch(images, labels, [f"synthetic#{i}" for i in idx])


# --------------------------------------------------------------------------
# CIFAR


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and NumPy arrays; refuses any other class."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _cifar_pickle(raw: bytes, where: str) -> dict:
    """Unpickle one CIFAR file; keys are normalised to str ('data', 'labels', ...)."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise SourceError(f"cannot read CIFAR pickle '{where}': {_one_line(exc)}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"CIFAR pickle '{where}' holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_names(meta: dict, key: str, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, (list, tuple)) or not names:
        raise SourceError(f"CIFAR meta file '{where}' has no {key!r} list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _cifar_part(obj: dict, key: str, n_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one pickle -> data (N, 3072) uint8, labels (N,) int64."""
    data, labels = obj.get("data"), obj.get(key)
    if data is None or labels is None:
        missing = "data" if data is None else key
        raise SourceError(f"CIFAR pickle '{where}' has no {missing!r} entry")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise SourceError(f"CIFAR pickle '{where}': 'data' has shape {data.shape}, "
                          f"expected (N, 3072)")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255)):
            raise SourceError(f"CIFAR pickle '{where}': 'data' must hold 8-bit values, "
                              f"got dtype {data.dtype}")
        data = data.astype(np.uint8)
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise SourceError(f"CIFAR pickle '{where}': {key!r} is not a list of integers") from None
    if len(labels) != len(data):
        raise SourceError(f"CIFAR pickle '{where}': {len(labels)} {key!r} for "
                          f"{len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise SourceError(f"CIFAR pickle '{where}': {key!r} outside 0..{n_classes - 1}")
    return data, labels


_CIFAR_LAYOUT = {
    # kind: (meta file, train files, test files)
    "cifar10": ("batches.meta", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("meta", ["train"], ["test"]),
}


def _cifar_kind(names: set[str]) -> str | None:
    """Which CIFAR layout a set of file names looks like, if any."""
    if "batches.meta" in names or any(n.startswith("data_batch_") for n in names):
        return "cifar10"
    if "meta" in names and ("train" in names or "test" in names):
        return "cifar100"
    return None


def _open_cifar(kind: str, description: str, where: str, prefix: str, files: dict[str, bytes],
                label: str, size: int) -> _CifarSource:
    """Build a CIFAR source from the raw bytes of its files (name -> bytes).

    ``where`` names the folder or archive in messages; ``prefix`` is the folder
    part of sample names (``cifar-10-batches-py``).
    """
    meta_file, train_files, test_files = _CIFAR_LAYOUT[kind]
    missing = [f for f in [meta_file, *train_files, *test_files] if f not in files]
    if missing:
        raise SourceError(f"{kind.upper().replace('CIFAR', 'CIFAR-')} source '{where}' is "
                          f"missing {', '.join(missing)}")
    if label == "coarse" and kind == "cifar10":
        raise SourceError(f"label='coarse' needs CIFAR-100, but '{where}' is CIFAR-10; "
                          f"use label='fine'")
    if kind == "cifar10":
        names_key, labels_key = "label_names", "labels"
    else:
        names_key, labels_key = f"{label}_label_names", f"{label}_labels"
    meta_where = f"{where}/{meta_file}"
    classes = _cifar_names(_cifar_pickle(files[meta_file], meta_where), names_key, meta_where)
    data, labels, parts = {}, {}, {}
    for split, split_files in (("train", train_files), ("test", test_files)):
        arrays, label_arrays, firsts, first = [], [], [], 0
        for name in split_files:
            file_where = f"{where}/{name}"
            d, lab = _cifar_part(_cifar_pickle(files.pop(name), file_where), labels_key,
                                 len(classes), file_where)
            arrays.append(d)
            label_arrays.append(lab)
            firsts.append(first)
            first += len(d)
        data[split] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        labels[split] = np.concatenate(label_arrays)
        part_names = [f"{prefix}/{f}" if prefix else f for f in split_files]
        parts[split] = (part_names, np.asarray(firsts, dtype=np.int64))
    return _CifarSource(kind, description, classes, size, data, labels, parts)


def _open_cifar_folder(kind, description, folder: Path, label, size):
    meta_file, train_files, test_files = _CIFAR_LAYOUT[kind]
    files = {}
    for name in [meta_file, *train_files, *test_files]:
        path = folder / name
        if path.is_file():
            files[name] = path.read_bytes()
    return _open_cifar(kind, description, str(folder), folder.name, files, label, size)


def _open_cifar_archive(description, path: Path, label, size):
    """Read a CIFAR .tar(.gz) in one pass, keeping the members of one folder level."""
    wanted = {f for meta, train, test in _CIFAR_LAYOUT.values() for f in [meta, *train, *test]}
    files: dict[str, bytes] = {}
    prefix = ""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) > 2 or parts[-1] not in wanted:
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    files[parts[-1]] = handle.read()
                    prefix = "/".join(parts[:-1])
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SourceError(f"cannot read archive '{path}': {_one_line(exc)}") from None
    kind = _cifar_kind(set(files))
    if kind is None:
        raise SourceError(f"archive '{path}' is not a CIFAR-10/100 python archive: "
                          f"no batches.meta or meta member found")
    return _open_cifar(kind, description, str(path), prefix, files, label, size)


# --------------------------------------------------------------------------
# Image folders


def _is_visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _is_image_name(name: str) -> bool:
    return _is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_dir(folder: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, image file names) directly inside ``folder``, sorted."""
    dirs, images = [], []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise SourceError(f"cannot list folder '{folder}': {_one_line(exc)}") from None
    for entry in entries:
        if entry.is_dir() and _is_visible(entry.name):
            dirs.append(entry.name)
        elif entry.is_file() and _is_image_name(entry.name):
            images.append(entry.name)
    return sorted(dirs), sorted(images, key=_natural_key)


def _images_below(folder: Path) -> list[str]:
    """Image files anywhere below ``folder``, as sorted POSIX paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _is_visible(d)]
        rel = Path(root).relative_to(folder)
        found.extend((rel / f).as_posix() for f in files if _is_image_name(f))
    return sorted(found, key=_natural_key)


def _class_folders(folder: Path, classes: list[str], prefix: str):
    """Samples of a class-folder tree -> (paths, labels (N,) int64, names)."""
    paths, labels, names = [], [], []
    for label, cls in enumerate(classes):
        files = _images_below(folder / cls)
        if not files:
            if _cifar_kind({p.name for p in (folder / cls).iterdir()}):
                raise SourceError(f"folder '{folder / cls}' looks like CIFAR: give that "
                                  f"folder itself as the source, not '{folder}'")
            raise SourceError(f"class folder '{folder / cls}' holds no images "
                              f"({' '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        paths.extend(str(folder / cls / f) for f in files)
        names.extend(f"{prefix}{cls}/{f}" for f in files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), names


def _select(files, idx: np.ndarray):
    paths, labels, names = files
    return [paths[i] for i in idx], labels[idx], [names[i] for i in idx]


def _open_folder(description, folder: Path, size, test_fraction, seed, on_error, workers):
    dirs, images = _list_dir(folder)
    if "train" in dirs or "test" in dirs:
        return _open_split_folder(description, folder, dirs, size, test_fraction, seed,
                                  on_error, workers)
    if images:
        class_dirs = [d for d in dirs if _images_below(folder / d)]
        if class_dirs:
            raise SourceError(f"folder '{folder}' holds both image files and class folders "
                              f"({', '.join(class_dirs[:3])}); keep one layout")
        return _open_kaggle(description, folder, images, size, test_fraction, seed,
                            on_error, workers)
    if not dirs:
        raise SourceError(f"folder '{folder}' holds no images and no class folders")
    classes = dirs
    files = _class_folders(folder, classes, "")
    train, test = _holdout(len(files[0]), test_fraction, seed)
    return _FileSource("folder", description, classes, size, test_fraction,
                       {"train": _select(files, train), "test": _select(files, test)},
                       on_error, workers)


def _open_split_folder(description, folder, dirs, size, test_fraction, seed, on_error,
                       workers):
    other = [d for d in dirs if d not in SPLITS]
    if other:
        raise SourceError(f"folder '{folder}' has train/ or test/ beside other folders "
                          f"({', '.join(other[:3])}); put every class folder inside train/ "
                          f"and test/")
    if "train" not in dirs:
        raise SourceError(f"folder '{folder}' has test/ but no train/")
    train_classes, train_images = _list_dir(folder / "train")
    if train_images or not train_classes:
        raise SourceError(f"folder '{folder / 'train'}' must hold one sub-folder per class "
                          f"and no image files")
    train_files = _class_folders(folder / "train", train_classes, "train/")
    if "test" not in dirs:  # no test/: hold out part of train/
        train, test = _holdout(len(train_files[0]), test_fraction, seed)
        files = {"train": _select(train_files, train), "test": _select(train_files, test)}
        return _FileSource("folder", description, train_classes, size, test_fraction, files,
                           on_error, workers)
    test_classes, test_images = _list_dir(folder / "test")
    if test_classes != train_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise SourceError(f"folder '{folder}': test/ and train/ must have the same class "
                          f"folders; only in train/: {only_train}, only in test/: {only_test}")
    if test_images:
        raise SourceError(f"folder '{folder / 'test'}' must hold one sub-folder per class "
                          f"and no image files")
    files = {"train": train_files,
             "test": _class_folders(folder / "test", test_classes, "test/")}
    return _FileSource("folder", description, train_classes, size, None, files, on_error,
                       workers)


def _open_kaggle(description, folder, images, size, test_fraction, seed, on_error, workers):
    """Flat folder of '<label>.<id>.<ext>' files (Kaggle Dogs vs. Cats)."""
    prefixes = []
    for name in images:
        stem = name.rsplit(".", 1)[0]
        if "." not in stem:
            raise SourceError(f"cannot take a label from '{folder / name}': a flat image "
                              f"folder needs names '<label>.<id>.<ext>' such as 'cat.12.jpg' "
                              f"(or use one sub-folder per class)")
        prefixes.append(stem.split(".", 1)[0])
    classes = sorted(set(prefixes))
    index = {c: i for i, c in enumerate(classes)}
    files = ([str(folder / n) for n in images],
             np.asarray([index[p] for p in prefixes], dtype=np.int64), list(images))
    train, test = _holdout(len(images), test_fraction, seed)
    return _FileSource("kaggle", description, classes, size, test_fraction,
                       {"train": _select(files, train), "test": _select(files, test)},
                       on_error, workers)


# --------------------------------------------------------------------------
# Entry point


def _default_workers() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _parse_synthetic(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        classes = int(parts[2]) if len(parts) == 3 else DEFAULT_SYNTHETIC_CLASSES
    except ValueError:
        raise SourceError(f"bad synthetic source {spec!r}; write synthetic:N or "
                          f"synthetic:N:C, e.g. synthetic:50000:10") from None
    if n < 1 or classes < 2:
        raise SourceError(f"bad synthetic source {spec!r}: needs N >= 1 images and C >= 2 "
                          f"classes")
    return n, classes


def open_source(spec: str, *, size: int = 32, label: str = "fine", test_fraction: float = 0.1,
                seed: int = 0, on_error: str = "fail", workers: int | None = None) -> Source:
    """Open a dataset as a :class:`Source` of uint8 RGB images of ``size x size``.

    Parameters
    ----------
    spec : str
        A path (CIFAR folder or ``.tar.gz``, image folder, Kaggle flat folder),
        ``"synthetic:N"``, ``"synthetic:N:C"`` or ``"digits"``; see :data:`SOURCE_HELP`.
        ``digits`` and ``synthetic:...`` win over a path of the same name
        (write ``./digits`` for the folder).
    size : int, optional
        Side of the output images (>= 1); images are squashed to it with
        bicubic resampling.
    label : {'fine', 'coarse'}, optional
        CIFAR-100 labels: the 100 classes or the 20 superclasses. ``'coarse'``
        is an error for every other source.
    test_fraction : float, optional
        Fraction of samples held out as the test split, 0 <= f < 1, for
        sources without their own test split (ignored by the others).
    seed : int, optional
        Seed (>= 0) of the held-out split and of ``synthetic`` images.
    on_error : {'fail', 'skip'}, optional
        What an undecodable image file does: raise, or leave it out and list it
        in :attr:`Batch.skipped`.
    workers : int or None, optional
        Threads decoding image files or generating ``synthetic`` images (>= 1;
        1 works in the caller's thread); default: the CPUs this process may use (``os.cpu_count()``
        narrowed to the CPU affinity where the OS has one).

    Returns
    -------
    Source
        Call :meth:`Source.close` when done (or use it in a ``with`` block).

    Raises
    ------
    SourceError
        A missing path, an unknown form, a wrong layout or a bad option; the
        message is one line naming the file or option.
    """
    spec_text = str(spec)
    size = _check_int("size", size, 1)
    seed = _check_int("seed", seed, 0)
    if label not in LABEL_CHOICES:
        raise SourceError(f"label must be one of {list(LABEL_CHOICES)}, got {label!r}")
    if on_error not in ON_ERROR_CHOICES:
        raise SourceError(f"on_error must be one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 <= test_fraction < 1:
        raise SourceError(f"test_fraction must be a number with 0 <= f < 1, "
                          f"got {test_fraction!r}")
    test_fraction = float(test_fraction)
    workers = _default_workers() if workers is None else _check_int("workers", workers, 1)

    if spec_text.startswith("synthetic:") or spec_text == "digits":
        if label != "fine":
            raise SourceError(f"label='coarse' needs CIFAR-100, not {spec_text!r}; "
                              f"use label='fine'")
        if spec_text == "digits":
            return _DigitsSource(spec_text, size, test_fraction, seed)
        n, num_classes = _parse_synthetic(spec_text)
        return _SyntheticSource(spec_text, n, num_classes, size, test_fraction, seed,
                                workers)

    path = Path(spec_text).expanduser()
    try:
        if not path.exists():
            raise SourceError(f"source '{spec_text}' does not exist; give a CIFAR folder or "
                              f".tar.gz, an image folder, synthetic:N[:C] or digits")
        if path.is_file():
            if not tarfile.is_tarfile(path):
                raise SourceError(f"source '{spec_text}' is a file but not a CIFAR .tar.gz "
                                  f"archive; give a folder of images or a CIFAR archive")
            return _open_cifar_archive(spec_text, path, label, size)
        kind = _cifar_kind({p.name for p in path.iterdir() if p.is_file()})
        if kind is not None:
            return _open_cifar_folder(kind, spec_text, path, label, size)
        if label != "fine":
            raise SourceError(f"label='coarse' needs CIFAR-100, but '{spec_text}' is an "
                              f"image folder; use label='fine'")
        return _open_folder(spec_text, path, size, test_fraction, seed, on_error, workers)
    except OSError as exc:  # unreadable folder or file
        raise SourceError(f"cannot read source '{spec_text}': {_one_line(exc)}") from None
