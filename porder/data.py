"""porder caches in PyTorch: a ``Dataset`` and a loader of whole device batches.

``PorderDataset(path, split)`` is a map-style :class:`torch.utils.data.Dataset`
over one split of a porder HDF5 file. It reads one image at a time (the file is
never loaded whole) and opens the file lazily, once per process, so it works
with ``DataLoader(num_workers > 0)``: each worker gets its own handle.

``BatchLoader(path, split, batch_size, device=...)`` yields whole batches
``(images, labels)`` already on the device, as ``porder train`` feeds its
models: the split is read in contiguous chunks (one HDF5 read per chunk, not
per image) and held on the device, or streamed through a bounded shuffle
buffer. It is the fast path; the Dataset is the flexible one (transforms,
samplers, any DataLoader).

Normalisation (``output="float"``) is exactly ``porder train``'s: per-channel
mean and standard deviation of the file's *training* images, all pixels of
all images, computed in float64 (:func:`channel_stats`), ``std =
sqrt(max(E[x^2] - E[x]^2, 1e-6))`` on the 0..255 scale, then ``(x - mean) /
std`` in float32. Reordering only moves patches, so every ordering of a
dataset gets the same statistics; the test split is normalised with the
training statistics.

This module is also the one home of what ``porder train`` shares with the
loaders: the channel statistics (:func:`channel_stats_of`), the epoch order
(:func:`epoch_order`) and torch's reading of device names
(:func:`resolve_torch_device`, over :func:`porder.backend.resolve_device`).

torch is imported by this module (and :mod:`porder.train`, :mod:`porder.nn`)
only; ``import porder`` does not import it.
"""
from __future__ import annotations

import math
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .backend import DEVICES, resolve_device
from .patches import restore_images
from .store import SPLITS, StoreError, iter_split, open_file, read_meta

OUTPUTS = ("uint8", "float")
VAR_FLOOR = 1e-6      # std = sqrt(max(var, VAR_FLOOR)), as porder train
STATS_ROWS = 4096     # images per chunk when summing: the same sums as porder train, bit for bit


# ------------------------------------------------------------------ normalisation
def channel_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a porder file's training images (0..255 scale).

    The numbers ``porder train`` normalises with: sums over every pixel of every
    training image in float64, ``mean = E[x]``, ``std = sqrt(max(E[x^2] -
    mean^2, 1e-6))``. Read in chunks of 4,096 images (bounded memory); cached
    per file (path, size and modification time) within a process.

    Returns
    -------
    mean, std : float64 arrays (3,), R, G, B

    Raises
    ------
    ValueError
        The file has no training images.
    """
    open_file(path).close()          # one-line StoreError for a missing or bad file
    p = Path(path).resolve()
    st = p.stat()
    mean, std = _channel_stats(str(p), st.st_mtime_ns, st.st_size)
    return mean.copy(), std.copy()


@lru_cache(maxsize=16)
def _channel_stats(path: str, mtime_ns: int, size: int):
    chunks = iter_split(path, "train", rows=STATS_ROWS, perm=False)
    return channel_stats_of((c["images"] for _, c in chunks), source=f"'{path}'")


def channel_stats_of(images, *, source: str = "the file") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images (0..255 scale).

    The one computation behind :func:`channel_stats` and ``porder train``:
    sums over every pixel in float64, :data:`STATS_ROWS` images at a time,
    ``mean = E[x]``, ``std = sqrt(max(E[x^2] - mean^2, 1e-6))``.

    Parameters
    ----------
    images : uint8 array (N, S, S, 3), or an iterable of uint8 arrays (m, S, S, 3)
        The images, or the images in chunks of :data:`STATS_ROWS` (an array
        is cut into them). The chunks fix the order of summation: the same
        images give bit-identical numbers, whether from memory or a file.
    source : str
        What holds the images, for the error.

    Returns
    -------
    mean, std : float64 arrays (3,), R, G, B

    Raises
    ------
    ValueError
        There are no images.
    """
    chunks = images
    if isinstance(images, np.ndarray):
        chunks = (images[lo:lo + STATS_ROWS] for lo in range(0, len(images), STATS_ROWS))
    s1 = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for chunk in chunks:
        c = chunk.reshape(-1, 3).astype(np.float64)      # (m*S*S, 3)
        s1 += c.sum(0)
        s2 += (c * c).sum(0)
        n += c.shape[0]
    if n == 0:
        raise ValueError(f"{source} has no training images to normalise with; use "
                         "output='uint8', or pass mean= and std=")
    mean = s1 / n
    return mean, np.sqrt(np.maximum(s2 / n - mean ** 2, VAR_FLOOR))


def _stats(path, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The normalisation to use: given ``mean``/``std`` (3 values each) or the file's."""
    if (mean is None) != (std is None):
        raise ValueError("pass both mean= and std= (3 values each, 0..255 scale), or neither "
                         "to use the file's training statistics")
    if mean is None:
        return channel_stats(path)
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
        raise ValueError(f"mean and std must be 3 values each (R, G, B), std > 0; got "
                         f"mean={mean.tolist()}, std={std.tolist()}")
    return mean, std


def _check(split: str, output: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r} is not one of {', '.join(OUTPUTS)}")


def _read_meta(path, split: str) -> dict:
    meta = read_meta(path)
    if split not in meta["splits"]:
        raise StoreError(f"'{path}' has no split {split!r}")
    return meta


# ------------------------------------------------------------------ dataset
class PorderDataset(torch.utils.data.Dataset):
    """One split of a porder HDF5 file as a map-style torch Dataset.

    Parameters
    ----------
    path : path-like
        A complete porder file (``porder reorder`` writes them).
    split : {'train', 'test'}
    output : {'uint8', 'float'}
        'uint8': the image as stored, a uint8 tensor (3, S, S) (CHW).
        'float': float32 (3, S, S) normalised exactly as ``porder train`` does
        (see the module docstring and :func:`channel_stats`).
    transform : callable, optional
        Applied to the image tensor last (after normalisation).
    restore : bool
        Return the original images, recovered through the stored ``perm``,
        instead of the reordered ones.
    mean, std : sequence of 3 floats, optional
        Normalisation for ``output='float'`` on the 0..255 scale; default the
        file's training statistics.

    Attributes
    ----------
    classes : list of str
        Class names, index = label.
    class_to_idx : dict
    labels : int64 array (N,)
        Every label of the split (read once; images are read on demand).
    options : dict
        The file's root attributes (measure, patch, bins, image_size, ...).
    mean, std : float64 arrays (3,) or None
        The normalisation used (None for ``output='uint8'``).

    Notes
    -----
    ``ds[i]`` is ``(image, label)`` with ``label`` an int. The HDF5 file is
    opened on first access in each process (the process id is checked on
    every access), so a Dataset created, or already used, in the parent is
    safe in ``DataLoader`` workers, forked or spawned; pickling drops the
    handle.
    """

    def __init__(self, path, split: str = "train", *, output: str = "uint8", transform=None,
                 restore: bool = False, mean=None, std=None):
        _check(split, output)
        meta = _read_meta(path, split)
        self.path = Path(path)
        self.split = split
        self.output = output
        self.transform = transform
        self.restore = bool(restore)
        self.classes = list(meta["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
        self.patch = int(meta["patch"])
        with open_file(self.path) as f:
            self.labels = f[split]["labels"][()].astype(np.int64)     # (N,)
        self.mean = self.std = None
        if output == "float":
            self.mean, self.std = _stats(self.path, mean, std)
            self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._h5 = self._images = self._perm = self._pid = None

    def __len__(self) -> int:
        return len(self.labels)

    def _open(self) -> None:
        """A handle of this process's own (HDF5 handles must not cross a fork)."""
        self._h5 = open_file(self.path)
        g = self._h5[self.split]
        self._images, self._perm = g["images"], g["perm"]
        self._pid = os.getpid()

    def __getitem__(self, index):
        n = len(self.labels)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range for a split of {n} images")
        if self._pid != os.getpid():
            self._open()
        img = self._images[i]                                       # (S, S, 3) uint8
        if self.restore:
            img = restore_images(img[None], self._perm[i][None], self.patch)[0]
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()    # (3, S, S) uint8
        if self.output == "float":
            x = (x.float() - self._mean_t) / self._std_t
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    def close(self) -> None:
        """Close this process's file handle (reopened on the next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = self._images = self._perm = self._pid = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state.update(_h5=None, _images=None, _perm=None, _pid=None)
        return state

    def __repr__(self) -> str:
        return (f"PorderDataset('{self.path}', split={self.split!r}, output={self.output!r}, "
                f"restore={self.restore}, {len(self)} images, {len(self.classes)} classes, "
                f"measure={self.options.get('measure')!r}, patch={self.patch})")


# ------------------------------------------------------------------ the batch order
@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order (n,) int64 in which epoch ``epoch`` visits n images: ``porder train``'s.

    ``torch.randperm(n)`` of a CPU generator seeded with ``seed * 1_000_003 +
    epoch``: a pure function of (n, seed, epoch). Cached (the last 4): the
    tensor returned is shared, so do not modify it in place.
    """
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ------------------------------------------------------------------ devices
def resolve_torch_device(device: str, *, fix: str = "device='cpu'") -> str:
    """``'cpu' | 'cuda' | 'auto'`` -> ``'cpu'`` or ``'cuda'``, as torch sees the GPU.

    :func:`porder.backend.resolve_device` with torch's view of the GPU
    (``torch.cuda.is_available()``) in place of CuPy's: torch code needs
    torch's CUDA. ValueError for an unknown name, or for 'cuda' when torch sees
    no GPU (the message ends with ``use {fix}``).
    """
    return resolve_device(device, gpu=torch.cuda.is_available, no_gpu=_no_gpu(device, fix))


def _no_gpu(device, fix: str) -> str:
    return (f"device {str(device)!r} asked for, but this torch ({torch.__version__}) sees no "
            f"CUDA GPU; use {fix}")


def _loader_device(device) -> torch.device:
    """A device name (:func:`resolve_torch_device`), or any torch device ('cuda:1', a torch.device)."""
    if isinstance(device, str) and device in DEVICES:
        return torch.device(resolve_torch_device(device))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(_no_gpu(device, "device='cpu'"))
    return dev


# ------------------------------------------------------------------ device batches
class BatchLoader:
    """Whole batches of one split of a porder file, on the device, for speed.

    Iterating gives one epoch of ``(images, labels)``: images (B, 3, S, S),
    float32 normalised like ``porder train`` (``output='float'``) or uint8,
    labels int64 (B,), both on ``device``. Every image is visited once per
    epoch; successive iterations are successive epochs (``set_epoch`` to pick
    one, e.g. when resuming).

    Parameters
    ----------
    path : path-like
    split : {'train', 'test'}
    batch_size : int
    device : str or torch.device
        'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when torch sees a GPU).
    output : {'float', 'uint8'}
    shuffle : bool
        Visit the images in a new seeded random order every epoch.
    seed : int
    drop_last : bool
        Drop the last, smaller batch of an epoch.
    restore : bool
        Yield the original images (recovered through ``perm``).
    buffer : int, optional
        None (default): the whole split is read once, in contiguous chunks,
        and kept on the device (N * S * S * 3 bytes: 150 MB for CIFAR's
        50,000 32x32 images), as ``porder train`` does; with ``shuffle``, epoch
        e visits the images in the order ``porder train`` uses for its epoch e
        (``torch.randperm`` seeded with (seed, e)). An int: at most about
        ``buffer`` images are held at once; the split is streamed from the
        file every epoch in contiguous blocks (the file's HDF5 chunks) and,
        with ``shuffle``, the blocks are taken in a random order and the
        images shuffled within each buffer of blocks (a block shuffle, like
        FFCV's quasi-random order). The next buffer is read on a background
        thread.
    mean, std : sequence of 3 floats, optional
        Normalisation (0..255 scale); default the file's training statistics.

    Attributes
    ----------
    classes, options, mean, std : as :class:`PorderDataset`
    n : int
        Images in the split (``len(loader)`` is the number of batches).
    device : torch.device
    """

    def __init__(self, path, split: str = "train", batch_size: int = 256, *, device="cpu",
                 output: str = "float", shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, restore: bool = False, buffer: int | None = None,
                 mean=None, std=None):
        _check(split, output)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if buffer is not None and int(buffer) < 1:
            raise ValueError(f"buffer must be at least 1 image (or None for the whole split), "
                             f"got {buffer}")
        meta = _read_meta(path, split)
        self.path = Path(path)
        self.split = split
        self.batch_size = int(batch_size)
        self.device = _loader_device(device)
        self.output = output
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.restore = bool(restore)
        self.buffer = None if buffer is None else int(buffer)
        self.classes = list(meta["classes"])
        self.options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
        self.patch = int(meta["patch"])
        self.size = int(meta["image_size"])
        self.n = int(meta["splits"][split])
        self.epoch = 0
        self.mean = self.std = None
        if output == "float":
            self.mean, self.std = _stats(self.path, mean, std)
            self._mean_t = torch.tensor(self.mean, dtype=torch.float32,
                                        device=self.device).view(1, 3, 1, 1)
            self._std_t = torch.tensor(self.std, dtype=torch.float32,
                                       device=self.device).view(1, 3, 1, 1)
        self._x = self._y = None       # the whole split on the device (buffer=None)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (its shuffle order)."""
        self.epoch = int(epoch)

    def _host(self, images: np.ndarray, perm) -> np.ndarray:
        return restore_images(images, perm, self.patch) if self.restore else images

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) on the device -> (B, 3, S, S) output (porder train's to_input)."""
        x = images.permute(0, 3, 1, 2)                              # (B, 3, S, S) view
        if self.output == "uint8":
            return x.contiguous()
        if x.is_cuda:   # NHWC memory, as porder train feeds its models on CUDA
            x = (x.float() - self._mean_t) / self._std_t
            return x.contiguous(memory_format=torch.channels_last)
        # On a CPU the float ops run many times faster on contiguous memory; same values.
        return (x.contiguous().float() - self._mean_t) / self._std_t

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _load_all(self) -> None:
        if self._x is not None:
            return
        s = self.size
        x = torch.empty((self.n, s, s, 3), dtype=torch.uint8, device=self.device)
        y = torch.empty((self.n,), dtype=torch.int64, device=self.device)
        for lo, chunk in iter_split(self.path, self.split, rows=STATS_ROWS, perm=self.restore):
            hi = lo + len(chunk["labels"])
            x[lo:hi] = self._to_device(self._host(chunk["images"], chunk.get("perm")))
            y[lo:hi] = self._to_device(chunk["labels"])
        self._x, self._y = x, y

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.buffer is None:
            return self._iter_resident(epoch)
        return self._iter_streamed(epoch)

    def _iter_resident(self, epoch: int):
        self._load_all()
        order = epoch_order(self.n, self.seed, epoch).to(self.device) if self.shuffle else None
        b = self.batch_size
        for lo in range(0, len(self) * b, b):
            hi = min(lo + b, self.n)
            if order is None:
                x, y = self._x[lo:hi], self._y[lo:hi]
            else:
                idx = order[lo:hi]            # index_select: ~100x faster than x[idx] on a CPU
                x = self._x.index_select(0, idx)                   # (B, S, S, 3)
                y = self._y.index_select(0, idx)                   # (B,)
            yield self._convert(x), y

    def _iter_streamed(self, epoch: int):
        rng = np.random.default_rng([self.seed, epoch])
        gen = torch.Generator(device=self.device).manual_seed(int(rng.integers(2**62)))
        with open_file(self.path) as f, ThreadPoolExecutor(1) as pool:
            g = f[self.split]
            chunk_rows = (g["images"].chunks or (512,))[0]
            block = max(1, min(self.buffer, chunk_rows))
            blocks = [(lo, min(lo + block, self.n)) for lo in range(0, self.n, block)]
            if self.shuffle:
                blocks = [blocks[i] for i in rng.permutation(len(blocks))]
            per = max(1, self.buffer // block)
            windows = [blocks[j:j + per] for j in range(0, len(blocks), per)]
            left_x = left_y = None
            pending = pool.submit(self._read_window, g, windows[0]) if windows else None
            for j in range(len(windows)):
                x, y = pending.result()
                if j + 1 < len(windows):
                    pending = pool.submit(self._read_window, g, windows[j + 1])
                if self.shuffle:
                    idx = torch.randperm(len(y), generator=gen, device=self.device)
                    x, y = x.index_select(0, idx), y.index_select(0, idx)
                if left_x is not None:
                    x, y = torch.cat([left_x, x]), torch.cat([left_y, y])
                full = len(y) - len(y) % self.batch_size
                for lo in range(0, full, self.batch_size):
                    yield (self._convert(x[lo:lo + self.batch_size]),
                           y[lo:lo + self.batch_size])
                left_x, left_y = x[full:], y[full:]
            if left_y is not None and len(left_y) and not self.drop_last:
                yield self._convert(left_x), left_y

    def _read_window(self, g, window) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of a window's blocks ``[(lo, hi), ...]`` of split group ``g``, on the device."""
        imgs, labels = [], []
        for lo, hi in window:
            perm = g["perm"][lo:hi] if self.restore else None
            imgs.append(self._host(g["images"][lo:hi], perm))
            labels.append(g["labels"][lo:hi].astype(np.int64))
        return (self._to_device(np.concatenate(imgs)),
                self._to_device(np.concatenate(labels)))

    def __repr__(self) -> str:
        return (f"BatchLoader('{self.path}', split={self.split!r}, batch_size={self.batch_size}, "
                f"device={str(self.device)!r}, output={self.output!r}, shuffle={self.shuffle}, "
                f"{self.n} images, {len(self)} batches per epoch)")
