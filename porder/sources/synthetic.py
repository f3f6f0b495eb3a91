"""Generated sources: ``synthetic:N[:C]`` (seeded, learnable images) and ``digits``
(the 8x8 handwritten digits shipped with porder); both hold out a seeded test split."""
from __future__ import annotations

from importlib import resources

import numpy as np

from .base import Batch, Source, SourceError, holdout
from .pillow import resize_images

SYNTHETIC_SIZE = 32  # native size of synthetic images
DEFAULT_SYNTHETIC_CLASSES = 10

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
# Bounds of synthetic:N:C, checked before anything is allocated. _holdout draws the
# split of all N at once: a permutation (int64), a mask (bool) and the train indices
# (int64), 17 bytes an image.
_HOLDOUT_BYTES = 17
MAX_SYNTHETIC_IMAGES = 100_000_000      # 1.7 GB of split indices
MAX_SYNTHETIC_CLASSES = 1_000_000


def _hue_rgb(h: np.ndarray) -> np.ndarray:
    """(B,) hues in turns -> (B, 3) smooth colour-wheel RGB in [0, 1]."""
    return 0.5 + 0.5 * np.cos(2 * np.pi * (h[:, None] - np.array([0.0, 1 / 3, 2 / 3])))


class SyntheticSource(Source):
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
        train, test = holdout(n, test_fraction, seed)
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
        return resize_images(images, self.image_size), labels

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


#: The ``digits`` data, shipped in the package: scikit-learn's copy of the UCI handwritten
#: digits (provenance and licence: ``data/DIGITS-NOTICE.txt``; built by
#: ``tools/make_digits_data.py``).
DIGITS_DATA = "data/digits.npz"


def load_digits_data() -> tuple[np.ndarray, np.ndarray]:
    """The shipped digits: images (1797, 8, 8) uint8 in 0..16, digits (1797,) uint8.

    Equal to ``sklearn.datasets.load_digits()``'s ``images`` and ``target``
    (``tests/sources/test_digits_data.py``), without scikit-learn.
    """
    with resources.files(__package__).joinpath(DIGITS_DATA).open("rb") as handle, \
            np.load(handle, allow_pickle=False) as data:
        return data["images"], data["target"]


class DigitsSource(Source):
    """The 1797 8x8 handwritten digits, grey 0..16 scaled to 0..255, held-out test split."""

    def __init__(self, description, size, test_fraction, seed):
        images, target = load_digits_data()
        super().__init__("digits", description, [str(c) for c in range(10)], size,
                         test_fraction)
        grey = np.rint(images.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        self._grey = grey[..., None]  # (1797, 8, 8, 1)
        self._labels = target.astype(np.int64)  # (1797,)
        train, test = holdout(len(grey), test_fraction, seed)
        self._index = {"train": train, "test": test}

    def _count(self, split):
        return len(self._index[split])

    def _read(self, split, lo, hi):
        idx = self._index[split][lo:hi]  # (B,)
        grey = resize_images(self._grey[idx], self.image_size)  # (B, S, S, 1)
        images = np.ascontiguousarray(np.repeat(grey, 3, axis=3))
        return Batch(images, self._labels[idx], [f"digits#{i}" for i in idx])


def parse_synthetic(spec: str) -> tuple[int, int]:
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
    if n > MAX_SYNTHETIC_IMAGES:
        raise SourceError(f"bad synthetic source {spec!r}: N is at most "
                          f"{MAX_SYNTHETIC_IMAGES:,} images, as the train/test split of all N "
                          f"is drawn in memory at the start ({_HOLDOUT_BYTES} bytes an image, "
                          f"{MAX_SYNTHETIC_IMAGES * _HOLDOUT_BYTES / 1e9:.1f} GB at the limit)")
    if classes > MAX_SYNTHETIC_CLASSES:
        raise SourceError(f"bad synthetic source {spec!r}: C is at most "
                          f"{MAX_SYNTHETIC_CLASSES:,} classes, as every class name is held in "
                          f"memory and stored in the file")
    return n, classes
