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

What ``ds[i]`` does, in this order (the one documented order)::

    stored uint8 (S, S, 3) -- restore=True: the original, through perm row i (checked)
      -> uint8 tensor (3, S, S), CHW                 output='uint8' (default)
      -> output='float': ds.normalize, float32       (a porder.data.Normalize)
      -> transform(image)
    label i (checked against the classes when the Dataset is made) -> target_transform(label)

With the default ``output='uint8'`` the transform sees the stored image as a
uint8 CHW tensor, as torchvision datasets hand over theirs, so photometric
transforms (colour jitter, equalise, posterize, ...) work on real pixel values;
end the pipeline with :class:`Normalize` (``Normalize.from_file(path)``) to get
exactly ``output='float'``'s numbers after them. With ``output='float'`` the
transform sees the normalised float32 tensor (the model's input): for
geometric transforms (flips, crops) that do not care about the pixel scale.
:class:`porder.transforms.PatchOrder` reorders images on the fly, exactly as a
cache stores them. Under the ``spawn`` and ``forkserver`` start methods
(macOS, Windows, Linux from Python 3.14) a ``DataLoader`` pickles the Dataset
with its transforms: give module-level functions or objects, not lambdas.

``BatchLoader(..., rank=, world_size=)`` splits every batch over the processes
of data-parallel training (the ranks of ``torch.distributed`` by default): each
rank gets a disjoint share of each batch, in the same epoch order.

Every row a reader reads is checked: the labels of a split when a
``PorderDataset`` is made (all of them are read then), a ``perm`` row when
``ds[i]`` restores an image with it, and every chunk the ``BatchLoader`` reads,
either way (:func:`porder.validate.check_rows`): a label outside the classes or
a ``perm`` row that is not a permutation is a :class:`~porder.store.StoreError`
naming the file, the split and the row, never a wrong image.

Normalisation (``output="float"``) is exactly ``porder train``'s: per-channel
mean and standard deviation of the file's *training* images, all pixels of
all images, from exact sums (:func:`channel_stats`), ``std =
sqrt(max(E[x^2] - E[x]^2, 1e-6))`` on the 0..255 scale, then ``(x - mean) /
std`` in float32 (:class:`Normalize`, the one implementation). Reordering
only moves patches, so every ordering of a dataset gets the same statistics;
the test split is normalised with the training statistics.

This module is also the one home of what ``porder train`` shares with the
loaders: the channel statistics (:func:`channel_stats_of`), the normalisation
(:class:`Normalize`), the epoch order (:func:`epoch_order`), reading rows by
index (:func:`read_rows`) and torch's reading of device names
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
from .store import SPLITS, StoreError, iter_split, open_file, read_labels, read_meta
from .validate import check_perm_row, check_rows, reading, whole

OUTPUTS = ("uint8", "float")
VAR_FLOOR = 1e-6      # std = sqrt(max(var, VAR_FLOOR)), as porder train
STATS_ROWS = 4096     # images per chunk when summing (a chunk of an array; of a file, below)
STATS_BYTES = 64 * 2**20   # at most this many bytes of images per chunk read from a file


# ------------------------------------------------------------------ normalisation
def channel_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of a porder file's training images (0..255 scale).

    The numbers ``porder train`` normalises with: sums over every pixel of every
    training image in float64, ``mean = E[x]``, ``std = sqrt(max(E[x^2] -
    mean^2, 1e-6))`` (:func:`channel_stats_of`). Read in chunks of at most
    4,096 images and 64 MiB (bounded memory); cached per file (path, size and
    modification time) within a process.

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
    with open_file(path) as f:
        row = int(np.prod(f["train/images"].shape[1:], dtype=np.int64))     # bytes an image
    rows = max(1, min(STATS_ROWS, STATS_BYTES // max(1, row)))
    chunks = iter_split(path, "train", rows=rows, perm=False)
    return channel_stats_of((c["images"] for _, c in chunks), source=f"'{path}'")


def channel_stats_of(images, *, source: str = "the file") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images (0..255 scale).

    The one computation behind :func:`channel_stats` and ``porder train``:
    ``mean = E[x]``, ``std = sqrt(max(E[x^2] - mean^2, 1e-6))`` over every
    pixel of every image.

    Parameters
    ----------
    images : uint8 array (N, S, S, 3), or an iterable of uint8 arrays (m, S, S, 3)
        The images, or the images in chunks of any size (an array is cut into
        chunks of :data:`STATS_ROWS`).
    source : str
        What holds the images, for the error.

    Returns
    -------
    mean, std : float64 arrays (3,), R, G, B

    Raises
    ------
    ValueError
        There are no images.

    Notes
    -----
    The sums of x and x^2 are exact integers (counted from a histogram of the
    256 values of each channel, 2**18 pixels at a time: a few MB of memory at
    any image size), rounded to float64 once, so the same images give the same
    numbers bit for bit however they are chunked, from memory or from a file.
    Those are the numbers of summing the pixels in float64, in any order, as
    porder did before (exact while the sums stay below 2**53: 2.7 million
    images at 224x224).
    """
    chunks = images
    if isinstance(images, np.ndarray):
        chunks = (images[lo:lo + STATS_ROWS] for lo in range(0, len(images), STATS_ROWS))
    s1 = [0, 0, 0]           # Python numbers: exact integers for uint8 images
    s2 = [0, 0, 0]
    n = 0
    for chunk in chunks:
        c1, c2, m = _chunk_sums(chunk)
        s1 = [a + b for a, b in zip(s1, c1)]
        s2 = [a + b for a, b in zip(s2, c2)]
        n += m
    if n == 0:
        raise ValueError(f"{source} has no training images to normalise with; use "
                         "output='uint8', or pass mean= and std=")
    s1 = np.array([float(v) for v in s1])                                   # (3,) float64
    s2 = np.array([float(v) for v in s2])
    mean = s1 / n
    return mean, np.sqrt(np.maximum(s2 / n - mean ** 2, VAR_FLOOR))


_CHANNEL = np.array([0, 256, 512], dtype=np.intp)                 # (3,) bin offsets
_PIXELS = 2**18                                                   # pixels counted at a time


def _chunk_sums(chunk) -> tuple[list, list, int]:
    """Per-channel sums of x and x^2 over a chunk's pixels (3 numbers each), and their count.

    uint8 chunks: exact Python integers, from a histogram of the 256 values of each channel
    counted :data:`_PIXELS` pixels at a time. Other dtypes: float64 sums.
    """
    c = np.asarray(chunk).reshape(-1, 3)                                   # (P, 3)
    if c.dtype != np.uint8:
        f = c.astype(np.float64)
        return f.sum(0).tolist(), (f * f).sum(0).tolist(), c.shape[0]
    counts = np.zeros(768, np.int64)                                       # (3 * 256,)
    for lo in range(0, len(c), _PIXELS):
        counts += np.bincount((c[lo:lo + _PIXELS] + _CHANNEL).ravel(), minlength=768)
    counts = counts.reshape(3, 256).tolist()
    values = range(256)
    return ([sum(k * v for k, v in zip(row, values)) for row in counts],
            [sum(k * v * v for k, v in zip(row, values)) for row in counts], c.shape[0])


def _stats(path, mean, std) -> tuple[np.ndarray, np.ndarray]:
    """The normalisation to use: given ``mean``/``std`` (3 values each) or the file's."""
    if (mean is None) != (std is None):
        raise ValueError("pass both mean= and std= (3 values each, 0..255 scale), or neither "
                         "to use the file's training statistics")
    if mean is None:
        return channel_stats(path)
    return _mean_std(mean, std)


def _mean_std(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """``mean``, ``std`` as float64 (3,) each, std > 0 and both finite; ValueError otherwise."""
    try:
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be 3 numbers each (R, G, B); got mean={mean!r}, "
                         f"std={std!r}") from None
    if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all() \
            or not np.isfinite(mean).all() or not np.isfinite(std).all():
        raise ValueError(f"mean and std must be 3 values each (R, G, B), std > 0; got "
                         f"mean={mean.tolist()}, std={std.tolist()}")
    return mean, std


class Normalize:
    """``(x - mean) / std`` per channel, on the 0..255 scale: the normalisation of
    ``output='float'`` and ``porder train``, as a transform.

    The one implementation of it: :class:`PorderDataset` (``output='float'``),
    :class:`BatchLoader` and ``porder train`` (:class:`porder.train.batches.Data`)
    all call :meth:`apply` (one image or a batch, channels first) or :meth:`batch`
    (a stored uint8 batch to a model's input).

    A picklable callable for the end of a ``transforms.Compose``: after
    photometric transforms on the uint8 image it gives exactly the numbers
    ``output='float'`` gives (bit for bit, when the transforms change nothing).

    Parameters
    ----------
    mean, std : sequence of 3 floats
        R, G, B on the 0..255 scale, std > 0 (e.g. :func:`channel_stats`).
    dtype : torch.dtype, optional
        A floating dtype the result is computed and returned in: float32
        (default); ``porder train`` passes torch's default dtype (float64 in
        the equivalence tests, so that float64 models get float64 inputs).

    Notes
    -----
    Takes a tensor (3, H, W) or (N, 3, H, W), uint8 or real, on any device;
    returns ``(x.to(dtype) - mean) / std``, mean and std rounded to ``dtype``.
    :meth:`from_file` uses a file's training statistics, as ``output='float'``
    does.
    """

    def __init__(self, mean, std, *, dtype=torch.float32):
        mean, std = _mean_std(mean, std)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"Normalize needs a floating dtype (torch.float32, ...), got "
                             f"{dtype!r}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.dtype = dtype
        self._tensors = {}           # device -> (mean, std) in dtype, (3, 1, 1)

    @classmethod
    def from_file(cls, path) -> Normalize:
        """The normalisation ``output='float'`` uses for a porder file (its training images)."""
        return cls(*channel_stats(path))

    def __call__(self, x):
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[-3] != 3:
            what = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Normalize takes a tensor (3, H, W) or (N, 3, H, W), got {what}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"Normalize takes real images, got dtype {x.dtype}")
        return self.apply(x)

    def tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as tensors (3, 1, 1) of :attr:`dtype` on ``device`` (made once per device)."""
        device = torch.device(device)
        t = self._tensors.get(device)
        if t is None:
            t = self._tensors[device] = tuple(
                torch.tensor(v, dtype=self.dtype, device=device).view(3, 1, 1)
                for v in (self.mean, self.std))
        return t

    def apply(self, x):
        """:meth:`__call__` without its checks of ``x`` (the callers' own images)."""
        mean, std = self.tensors(x.device)
        return (x.to(self.dtype) - mean) / std

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """A stored batch, uint8 (B, S, S, 3), as a model's input (B, 3, S, S): normalised,
        contiguous on a CPU, channels-last memory on CUDA (NHWC is what tensor cores want,
        and the permuted batch already is). The values are the same either way."""
        x = images.permute(0, 3, 1, 2)                              # (B, 3, S, S) view
        if x.is_cuda:
            return self.apply(x).contiguous(memory_format=torch.channels_last)
        # On a CPU the float ops run many times faster on contiguous memory.
        return self.apply(x.contiguous())

    def __getstate__(self):
        return {"mean": self.mean, "std": self.std, "dtype": self.dtype}

    def __setstate__(self, state):
        self.__init__(state["mean"], state["std"], dtype=state.get("dtype", torch.float32))

    def __repr__(self) -> str:
        def fmt(v):
            return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"

        dtype = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"Normalize(mean={fmt(self.mean)}, std={fmt(self.std)}{dtype})"


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
        Applied to the image tensor of ``output`` (after normalisation for
        'float'); see the module docstring for the order. For photometric
        transforms keep ``output='uint8'`` and end them with
        :class:`Normalize`.
    target_transform : callable, optional
        Applied to the label (an int), as torchvision datasets do.
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
    targets : list of int
        The label of every image, as torchvision datasets have it (read once,
        with :attr:`labels`).
    labels : int64 array (N,)
        Every label of the split (read once; images are read on demand).
    options : dict
        The file's root attributes (measure, patch, bins, image_size, ...).
    mean, std : float64 arrays (3,) or None
        The normalisation used (None for ``output='uint8'``).
    normalize : Normalize or None
        That normalisation as a transform (None for ``output='uint8'``).

    Raises
    ------
    StoreError (a ValueError)
        A missing or damaged file, a split it lacks, or a label outside the
        classes (when made); a ``perm`` row that is not a permutation when
        ``ds[i]`` restores with it, or an image HDF5 cannot read: one line
        naming the file (and the split and row).

    Notes
    -----
    ``ds[i]`` is ``(image, label)`` with ``label`` an int. The HDF5 file is
    opened on first access in each process (the process id is checked on
    every access), so a Dataset created, or already used, in the parent is
    safe in ``DataLoader`` workers, forked or spawned; pickling drops the
    handle.
    """

    def __init__(self, path, split: str = "train", *, output: str = "uint8", transform=None,
                 target_transform=None, restore: bool = False, mean=None, std=None):
        _check(split, output)
        meta = _read_meta(path, split)
        self.path = Path(path)
        self.split = split
        self.output = output
        self.transform = transform
        self.target_transform = target_transform
        self.restore = bool(restore)
        self.classes = list(meta["classes"])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
        self.patch = int(meta["patch"])
        self._k = (int(meta["image_size"]) // self.patch) ** 2
        self.labels = read_labels(self.path, split)                  # (N,) int64, checked
        self.targets = self.labels.tolist()
        self.mean = self.std = self.normalize = None
        if output == "float":
            self.mean, self.std = _stats(self.path, mean, std)
            self.normalize = Normalize(self.mean, self.std)
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
        try:
            img = self._images[i]                                   # (S, S, 3) uint8
            perm = self._perm[i] if self.restore else None          # (K,)
        except Exception:
            with reading(self.path):     # what HDF5 raised, as one StoreError naming the file
                raise
        if self.restore:
            check_perm_row(self.path, self.split, i, perm, k=self._k)
            img = restore_images(img[None], perm[None], self.patch)[0]
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()    # (3, S, S) uint8
        if self.normalize is not None:
            x = self.normalize.apply(x)
        if self.transform is not None:
            x = self.transform(x)
        y = self.targets[i]
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

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


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on ``device``: the array itself on a CPU, copied through
    pinned memory (asynchronously) to a GPU."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def read_rows(path, dataset, index) -> np.ndarray:
    """Rows ``index`` of an open HDF5 dataset of a porder file, in the order asked.

    Parameters
    ----------
    path : path-like
        The file, for errors (one :class:`~porder.store.StoreError` naming it).
    dataset : h5py.Dataset
        E.g. ``f["train/images"]`` (N, S, S, 3).
    index : int array (B,)
        Rows in any order, repeats allowed, each in 0..N-1.

    Returns
    -------
    array (B, ...) of the dataset's dtype

    Notes
    -----
    HDF5 reads a selection in increasing order: the distinct rows are read
    sorted, each run of consecutive rows in one read straight into the
    result, then put in the order asked (a copy only when that differs).
    Memory: the rows read, once (twice when reordered).
    """
    index = np.asarray(index, dtype=np.int64).reshape(-1)                  # (B,)
    rows, inverse = np.unique(index, return_inverse=True)                  # (R,) sorted
    out = np.empty((len(rows), *dataset.shape[1:]), dataset.dtype)         # (R, ...)
    if len(rows) and (rows[0] < 0 or rows[-1] >= dataset.shape[0]):
        raise IndexError(f"rows {rows[0]}..{rows[-1]} of '{path}' asked for; it has "
                         f"{dataset.shape[0]}")
    cut = np.flatnonzero(np.diff(rows) != 1) + 1                           # run starts
    with reading(path):
        for a, b in zip(np.r_[0, cut], np.r_[cut, len(rows)]):
            if b > a:
                dataset.read_direct(out, np.s_[rows[a]:rows[b - 1] + 1], np.s_[a:b])
    if len(rows) == len(index) and np.array_equal(rows, index):
        return out
    return out[inverse.reshape(-1)]


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
        file every epoch in contiguous blocks (the file's HDF5 chunks, several
        together when a chunk is under 1 MiB) and,
        with ``shuffle``, the blocks are taken in a random order and the
        images shuffled within each buffer of blocks (a block shuffle, like
        FFCV's quasi-random order). The next buffer is read on a background
        thread.
    mean, std : sequence of 3 floats, optional
        Normalisation (0..255 scale); default the file's training statistics.
    rank, world_size : int, optional
        Data-parallel training (DDP): this process is ``rank`` of
        ``world_size``. ``batch_size`` is then the *global* batch, as in
        ``porder train``: every rank runs the same epoch order and the same
        batches, and yields its share of each, rows ``shard_range(B, (rank,
        world_size))`` of a batch of B images (:func:`porder.pipeline.shard_range`:
        ``[rank * B // world_size, (rank + 1) * B // world_size)``). The shares
        are disjoint and, concatenated in rank order, are the single-process
        batch; with ``batch_size`` a multiple of ``world_size`` they are exactly
        ``porder train``'s (``batch_indices(..., rank=, world_size=)``). Every
        rank yields ``len(loader)`` batches (DDP needs equal step counts); with
        ``drop_last=False`` the last, smaller batch may give a rank fewer
        images, or none when it has fewer than ``world_size``. Each rank reads
        the whole split (buffer=None: holds it on its device). Default: the
        process group's rank and size when ``torch.distributed`` is
        initialised, else 0 of 1; pass both or neither.

    Attributes
    ----------
    classes, options, mean, std : as :class:`PorderDataset`
    n : int
        Images in the split (``len(loader)`` is the number of batches).
    device : torch.device
    rank, world_size : int

    Raises
    ------
    ValueError
        An argument out of its range, or a number that is not an integer
        (``batch_size=1.5``, ``buffer=True``: one line naming it).
    StoreError (a ValueError)
        A missing or damaged file, a split it lacks; while iterating, a label
        outside the classes or a ``perm`` row that is not a permutation in
        the rows read (naming the file, split and row).
    """

    def __init__(self, path, split: str = "train", batch_size: int = 256, *, device="cpu",
                 output: str = "float", shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, restore: bool = False, buffer: int | None = None,
                 mean=None, std=None, rank: int | None = None, world_size: int | None = None):
        _check(split, output)
        batch_size = whole("batch_size", batch_size, lo=1)
        if buffer is not None:
            buffer = whole("buffer", buffer, lo=1,
                           hint=" image (or None for the whole split)")
        self.seed = whole("seed", seed, lo=0)
        self.rank, self.world_size = _ranks(rank, world_size)
        meta = _read_meta(path, split)
        self.path = Path(path)
        self.split = split
        self.batch_size = batch_size
        self.device = _loader_device(device)
        self.output = output
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.restore = bool(restore)
        self.buffer = buffer
        self.classes = list(meta["classes"])
        self.options = {k: v for k, v in meta.items() if k not in ("classes", "splits", "skipped")}
        self.patch = int(meta["patch"])
        self.size = int(meta["image_size"])
        self._k = (self.size // self.patch) ** 2
        self._classes = len(self.classes)
        self.n = int(meta["splits"][split])
        self.epoch = 0
        self.mean = self.std = self._normalize = None
        if output == "float":
            self.mean, self.std = _stats(self.path, mean, std)
            self._normalize = Normalize(self.mean, self.std)
        self._x = self._y = None       # the whole split on the device (buffer=None)

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration runs (its shuffle order)."""
        self.epoch = whole("epoch", epoch, lo=0)

    def _share(self, count: int) -> tuple[int, int]:
        """This rank's rows [a, b) of a batch of ``count`` images."""
        if self.world_size == 1:
            return 0, count
        from .pipeline import shard_range

        return shard_range(count, (self.rank, self.world_size))

    def _host(self, images: np.ndarray, perm) -> np.ndarray:
        return restore_images(images, perm, self.patch) if self.restore else images

    def _convert(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) on the device -> (B, 3, S, S) output (porder train's to_input)."""
        if self.output == "uint8":
            return images.permute(0, 3, 1, 2).contiguous()
        return self._normalize.batch(images)

    def _load_all(self) -> None:
        if self._x is not None:
            return
        s = self.size
        x = torch.empty((self.n, s, s, 3), dtype=torch.uint8, device=self.device)
        y = torch.empty((self.n,), dtype=torch.int64, device=self.device)
        for lo, chunk in iter_split(self.path, self.split, rows=STATS_ROWS, perm=self.restore):
            hi = lo + len(chunk["labels"])
            x[lo:hi] = to_device(self._host(chunk["images"], chunk.get("perm")), self.device)
            y[lo:hi] = to_device(chunk["labels"], self.device)
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
        for start in range(0, len(self) * b, b):
            a, z = self._share(min(start + b, self.n) - start)
            lo, hi = start + a, start + z                           # this rank's rows
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
            block = max(1, min(self.buffer, _block_rows(g["images"])))
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
                    a, z = self._share(self.batch_size)
                    yield self._convert(x[lo + a:lo + z]), y[lo + a:lo + z]
                left_x, left_y = x[full:], y[full:]
            if left_y is not None and len(left_y) and not self.drop_last:
                a, z = self._share(len(left_y))
                yield self._convert(left_x[a:z]), left_y[a:z]

    def _read_window(self, g, window) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of a window's blocks ``[(lo, hi), ...]`` of split group ``g``, on the device."""
        imgs, labels = [], []
        for lo, hi in window:
            with reading(self.path):
                perm = g["perm"][lo:hi] if self.restore else None           # (m, K)
                images = g["images"][lo:hi]                                  # (m, S, S, 3)
                labels.append(g["labels"][lo:hi].astype(np.int64))           # (m,)
            check_rows(self.path, self.split, lo, labels[-1], perm, classes=self._classes,
                       k=self._k)
            imgs.append(self._host(images, perm))
        return (to_device(np.concatenate(imgs), self.device),
                to_device(np.concatenate(labels), self.device))

    def __repr__(self) -> str:
        ranks = f", rank={self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return (f"BatchLoader('{self.path}', split={self.split!r}, batch_size={self.batch_size}, "
                f"device={str(self.device)!r}, output={self.output!r}, shuffle={self.shuffle}"
                f"{ranks}, {self.n} images, {len(self)} batches per epoch)")


# A streamed block is one HDF5 chunk, or several when a chunk is under a mebibyte (files of
# images above 32x32 keep their chunks within 1 MiB, 6 rows at 224x224): reading a 6-row
# chunk at a time ran at 0.66x the rate of 27-row ones; blocks of about STREAM_BLOCK_BYTES
# restore it. Chunks of 1 MiB or more (every 32x32 file) are a block alone, as before.
STREAM_BLOCK_BYTES = 4 * 2**20


def _block_rows(images) -> int:
    """Rows of one streamed block of the dataset ``images``: whole chunks (see above)."""
    rows = (images.chunks or (512,))[0]
    nbytes = rows * int(np.prod(images.shape[1:], dtype=np.int64)) * images.dtype.itemsize
    if nbytes >= 2**20:
        return rows
    return rows * max(1, STREAM_BLOCK_BYTES // max(1, nbytes))


def _ranks(rank, world_size) -> tuple[int, int]:
    """(rank, world_size): as given (both), torch.distributed's when initialised, or (0, 1)."""
    if rank is None and world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError("pass both rank= and world_size=, or neither (then torch.distributed's"
                         " own when its process group is initialised, else 0 of 1)")
    world_size = whole("world_size", world_size, lo=1)
    rank = whole("rank", rank, lo=0)
    if rank >= world_size:
        raise ValueError(f"rank={rank} must be below world_size={world_size}")
    return rank, world_size
