"""The data of a training run: a porder file's splits as uint8 images on the device,
held there or read from the file batch by batch, the deterministic batch order,
batches reordered on the fly (``--measure``), and batches prepared one step ahead
(:class:`Prefetch`).

A split is held in memory (a uint8 tensor on the device) when it fits a budget
(:func:`porder.train.memory.data_budget`: a share of the memory free when the run
starts), and streamed otherwise: its images stay in the file and each batch's
are read when the batch is prepared (:class:`FileImages`), the test split's as
each block is evaluated. Either way a step gets the same images, bit for bit,
so a run's metrics do not depend on where its data lives.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data import Normalize, channel_stats, channel_stats_of, epoch_order, read_rows, to_device
from ..kernels.cpu import cores
from ..reorder import reorder
from ..store import open_file, read_labels, read_meta, read_split
from .config import TrainConfig
from .memory import data_budget


def _read(path, split: str) -> dict:
    """:func:`read_split`, with HDF5's read errors (a damaged file) naming the file and split."""
    try:
        return read_split(path, split)
    except OSError as e:
        raise ValueError(f"cannot read the {split} split of '{path}' (a damaged file?): "
                         f"{' '.join(str(e).split())}") from None


class FileImages:
    """The images (N, S, S, 3) uint8 of one split of a porder file, read when indexed.

    What :class:`Data` holds in place of a tensor for a split it streams:
    ``images[key]``, ``key`` a slice or integer indices (a tensor or array (B,),
    any order, repeats allowed), is the uint8 tensor (B, S, S, 3) on ``device``
    that indexing the whole split in memory would give; each read is one HDF5
    read per run of consecutive rows (:func:`porder.data.read_rows`). With
    ``reorder_opts`` (the test split of a ``--measure`` run), the images come
    reordered, each keyed by its own dataset index, exactly as :class:`Data`
    reorders a split it holds.

    The file is opened on first use in each process (HDF5 handles must not
    cross a fork) and stays open; h5py serialises the reads of threads.
    """

    def __init__(self, path, split: str, shape: tuple, device: torch.device, *,
                 reorder_opts: Optional[dict] = None):
        self.path, self.split = Path(path), split
        self.shape = tuple(shape)                       # (N, S, S, 3)
        self.dtype = torch.uint8
        self.device = device
        self.reorder_opts = reorder_opts
        self._lock = threading.Lock()
        self._h5 = self._images = self._pid = None

    def __len__(self) -> int:
        return self.shape[0]

    def _dataset(self):
        with self._lock:
            if self._pid != os.getpid():
                self._h5 = open_file(self.path)
                self._images, self._pid = self._h5[self.split]["images"], os.getpid()
            return self._images

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            index = np.arange(*key.indices(len(self)))                         # (B,)
        elif _indices(key):
            index = key.cpu().numpy() if isinstance(key, torch.Tensor) else key       # (B,)
            index = np.where(index < 0, index + len(self), index)
        else:
            raise TypeError(f"FileImages takes a slice or integer indices (B,), got {key!r}")
        images = torch.from_numpy(read_rows(self.path, self._dataset(), index))   # (B, S, S, 3)
        if self.reorder_opts is not None:       # on the host, as Data reorders a split it holds
            images = reorder_tensor(images, torch.from_numpy(index), **self.reorder_opts)
        return images.to(self.device) if self.device.type == "cpu" else \
            to_device(images.numpy(), self.device)

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        with self._lock:
            if self._h5 is not None and self._pid == os.getpid():
                self._h5.close()
            self._h5 = self._images = self._pid = None

    def __repr__(self) -> str:
        return f"FileImages('{self.path}', {self.split!r}, {len(self)} images on {self.device})"


def _indices(key) -> bool:
    """Whether ``key`` is a 1-D tensor or array of integers (not booleans)."""
    if isinstance(key, torch.Tensor):
        return key.ndim == 1 and not (key.dtype.is_floating_point or key.dtype.is_complex
                                      or key.dtype == torch.bool)
    return isinstance(key, np.ndarray) and key.ndim == 1 and key.dtype.kind in "iu"


class Data:
    """A porder file's train and test splits, as uint8 images on the device.

    ``train_x`` (N, S, S, 3) holds the images as stored; with ``reorder`` set,
    :func:`get_batch` reorders each batch and ``test_x`` is reordered here
    (or as it is read), so test images are ordered exactly like training images.
    ``train_y``, ``test_y`` (N,), (M,) int64: the labels, always on the device.

    Each of ``train_x`` and ``test_x`` is a uint8 tensor on the device when the
    split is held in memory, or a :class:`FileImages` reading it from the file
    as it is indexed: both give the same tensor for ``x[idx]`` and ``x[lo:hi]``.

    Parameters
    ----------
    in_memory : bool, optional
        True: hold both splits in memory; False: stream both; None (default):
        hold a split when it fits :func:`.memory.data_budget` (the train split first,
        then the test split in what is left), stream it otherwise.

    Attributes
    ----------
    in_memory : dict
        ``{"train": bool, "test": bool}``: which splits are held.
    budget : (int, str) or None
        The budget the choice was made with (None when ``in_memory`` was given).
    """

    def __init__(self, path, *, device: str, reorder: Optional[str] = None, patch: int = 8,
                 bins: int = 256, order_seed: int = 0, in_memory: Optional[bool] = None):
        self.path = Path(path)
        self.meta = read_meta(path)
        self.classes = list(self.meta["classes"])
        try:
            self.size = int(self.meta["image_size"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"'{path}' has no valid image_size attribute "
                             f"(got {self.meta.get('image_size')!r}); remake the file with "
                             f"`porder reorder`") from None
        if self.meta["splits"].get("train", 0) < 1 or self.meta["splits"].get("test", 0) < 1:
            raise ValueError(f"'{path}' needs images in both train and test splits, has "
                             f"{self.meta['splits']}")
        if len(self.classes) < 2:
            raise ValueError(f"'{path}' has {len(self.classes)} class; need at least 2 to train")
        if reorder is not None and self.meta.get("measure") != "none":
            raise ValueError(f"--measure needs an unmodified file (measure 'none'); '{path}' "
                             f"was reordered with {self.meta.get('measure')!r}")
        self.device = device
        self.reorder_opts = None if reorder is None else dict(
            measure=reorder, patch=patch, bins=bins, seed=order_seed)
        dev = torch.device(device)
        shapes = {split: (int(self.meta["splits"][split]), self.size, self.size, 3)
                  for split in ("train", "test")}
        self.in_memory, self.budget = self._choose(shapes, dev, in_memory)
        self._read(shapes, dev)
        for labels in (self.train_y, self.test_y):
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
                raise ValueError(f"'{path}' has labels outside 0..{len(self.classes) - 1}")

    def _choose(self, shapes: dict, dev: torch.device, in_memory: Optional[bool]):
        """({split: held in memory}, the budget or None): see ``in_memory``."""
        if in_memory is not None:
            return {"train": bool(in_memory), "test": bool(in_memory)}, None
        budget = data_budget(dev)
        left = budget[0]
        held = {}
        for split in ("train", "test"):
            nbytes = int(np.prod(shapes[split], dtype=np.int64))
            held[split] = nbytes <= left
            left -= nbytes if held[split] else 0
        return held, budget

    def _read(self, shapes: dict, dev: torch.device) -> None:
        path = self.path
        if self.in_memory["train"]:
            train = _read(path, "train")
            # Per-channel statistics of the training images; reordering only moves
            # patches, so every ordering of a dataset is normalised identically.
            mean, std = channel_stats_of(train["images"], source=f"'{path}'")
            self.train_x = torch.from_numpy(train["images"]).to(dev)          # (N, S, S, 3)
            self.train_y = torch.from_numpy(train["labels"]).to(dev)          # (N,) int64
            del train
        else:   # the same sums, over the file in the same chunks (cached per file)
            mean, std = channel_stats(path)
            self.train_x = FileImages(path, "train", shapes["train"], dev)
            self.train_y = torch.from_numpy(read_labels(path, "train")).to(dev)
        if self.in_memory["test"]:
            test = _read(path, "test")
            test_x = torch.from_numpy(test["images"])                         # (M, S, S, 3)
            if self.reorder_opts is not None:
                test_x = reorder_tensor(test_x, torch.arange(len(test_x)), **self.reorder_opts)
            self.test_x = test_x.to(dev)
            self.test_y = torch.from_numpy(test["labels"]).to(dev)            # (M,) int64
        else:
            self.test_x = FileImages(path, "test", shapes["test"], dev,
                                     reorder_opts=self.reorder_opts)
            self.test_y = torch.from_numpy(read_labels(path, "test")).to(dev)
        # Inputs in torch's default dtype: float32, or float64 where a caller (the
        # equivalence tests) set it, so that float64 models get float64 inputs.
        self.dtype = torch.get_default_dtype()
        self.normalize = Normalize(mean, std, dtype=self.dtype)
        self.mean, self.std = self.normalize.tensors(dev)                     # (3, 1, 1) each

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) (channels-last on CUDA):
        :meth:`porder.data.Normalize.batch`."""
        return self.normalize.batch(images)

    def close(self) -> None:
        """Close the file handles of the streamed splits (reopened if read again)."""
        for x in (self.train_x, self.test_x):
            if isinstance(x, FileImages):
                x.close()


def reorder_tensor(images: torch.Tensor, index: torch.Tensor, *, measure: str, patch: int,
                   bins: int, seed: int) -> torch.Tensor:
    """Reorder a uint8 batch (B, S, S, 3) of training images with :func:`porder.reorder`.

    ``reorder`` takes the tensor as it is (a CPU tensor as NumPy, a CUDA one as
    CuPy when installed, else through the host) and returns a tensor on its
    device. ``index`` (B,) holds the images' dataset indices: orderings of
    every measure depend only on the image, except ``random``, which is keyed
    by the dataset index, so those images are reordered one at a time on the
    CPU and each keeps its own shuffle, whatever batch it lands in.
    """
    if measure != "random":
        return reorder(images, measure, patch, bins=bins)[0]
    host = images.cpu()
    out = torch.empty_like(host)
    for i, j in enumerate(index.tolist()):
        out[i:i + 1] = reorder(host[i:i + 1], measure, patch, seed=seed, start=j)[0]
    return out.to(images.device, non_blocking=True)


def batch_indices(step: int, n: int, batch_size: int, seed: int, *, rank: int = 0,
                  world_size: int = 1, order=epoch_order) -> torch.Tensor:
    """Training-set indices of the batch of (0-based) ``step``: (batch_size / world_size,) int64.

    Epoch e visits all n images in the order :func:`porder.data.epoch_order`
    (n, seed, e); batches run through epochs back to back. A pure
    function of its arguments, so a resumed run sees the same batches.

    ``batch_size`` is the global batch; with ``world_size`` processes, ``rank``
    gets its slice ``[rank * b, (rank + 1) * b)`` of it, ``b = batch_size /
    world_size``: the slices of all ranks are disjoint and, concatenated in rank
    order, are the single-process batch. ValueError unless ``world_size``
    divides ``batch_size``. ``order``: :func:`porder.data.epoch_order` or a cache of it
    (the lockstep trainer keeps one per run: the shared cache holds 4 epochs).
    """
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} "
                         f"processes; use a multiple of {world_size}")
    if world_size > 1:
        b = batch_size // world_size
        return batch_indices(step, n, batch_size, seed, order=order)[rank * b:(rank + 1) * b]
    pos = step * batch_size
    parts = []
    while batch_size > 0:
        epoch, off = divmod(pos, n)
        take = min(batch_size, n - off)
        parts.append(order(n, seed, epoch)[off:off + take])
        pos += take
        batch_size -= take
    return torch.cat(parts)


def get_batch(data: Data, step: int, cfg: TrainConfig, *, rank: int = 0, world_size: int = 1,
              order=epoch_order):
    """The inputs (B, 3, S, S) float and labels (B,) int64 of (0-based) ``step``.

    With ``world_size`` processes, B = batch_size / world_size: rank's slice of the step's
    batch. ``order``: as for :func:`batch_indices`.
    """
    idx = batch_indices(step, len(data.train_y), cfg.batch_size, cfg.seed, rank=rank,
                        world_size=world_size, order=order)
    dev_idx = idx.to(data.train_y.device)
    streamed = isinstance(data.train_x, FileImages)     # read from the file: host indices
    images = data.train_x[idx if streamed else dev_idx]                 # (B, S, S, 3) uint8
    if data.reorder_opts is not None:
        images = reorder_tensor(images, idx, **data.reorder_opts)
    return data.to_input(images), data.train_y[dev_idx]


def background_batches(device: str) -> bool:
    """Whether :class:`Prefetch` prepares batches on a background thread: on CUDA, and on
    the CPU only when torch's threads leave a core free (``-j`` below the cores).

    When torch's threads take every core, a thread preparing batches beside them slows
    every step: on the 2-core development machine with 2 threads (VGG width 0.125,
    32x32), a batch-1 run trained at 75 images/s with the background thread and at 280
    without it (the same as with one thread), batch 32 at 1,019 against 1,903, and
    batch 1 with ``--measure mi`` on the fly at 64 against 193.
    """
    return device == "cuda" or torch.get_num_threads() < cores()


class Prefetch:
    """The batches of steps ``start`` .. ``stop - 1``, each prepared on a background thread
    while the step before it trains (``background``; else when asked for, in the caller's
    thread: :func:`background_batches`)."""

    def __init__(self, fetch, start: int, stop: int, background: bool = True):
        self.fetch, self.stop = fetch, stop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="porder-batch") if background \
            else None
        self.next = self.pool.submit(fetch, start) if background and start < stop else None

    def get(self, step: int):
        """The batch of ``step`` and the seconds waited for it (the time it took to prepare
        without a background thread); starts preparing the next."""
        t0 = time.perf_counter()
        batch = self.next.result() if self.pool is not None else self.fetch(step)
        waited = time.perf_counter() - t0
        if self.pool is not None:
            self.next = self.pool.submit(self.fetch, step + 1) if step + 1 < self.stop else None
        return batch, waited

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
