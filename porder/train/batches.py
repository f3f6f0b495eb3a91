"""The data of a training run: a porder file's splits as uint8 tensors on the device,
the deterministic batch order, batches reordered on the fly (``--measure``), and
batches prepared one step ahead (:class:`Prefetch`)."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from ..data import channel_stats_of, epoch_order
from ..reorder import reorder
from ..store import read_meta, read_split
from .config import TrainConfig


def _read(path, split: str) -> dict:
    """:func:`read_split`, with HDF5's read errors (a damaged file) naming the file and split."""
    try:
        return read_split(path, split)
    except OSError as e:
        raise ValueError(f"cannot read the {split} split of '{path}' (a damaged file?): "
                         f"{' '.join(str(e).split())}") from None


class Data:
    """A porder file's train and test splits as uint8 tensors on the device.

    ``train_x`` (N, S, S, 3) holds the images as stored; with ``reorder`` set,
    :func:`get_batch` reorders each batch and ``test_x`` is reordered once here,
    so test images are ordered exactly like training images.
    """

    def __init__(self, path, *, device: str, reorder: Optional[str] = None, patch: int = 8,
                 bins: int = 256, order_seed: int = 0):
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
        train, test = _read(path, "train"), _read(path, "test")
        for split in (train, test):
            bad = (split["labels"] < 0) | (split["labels"] >= len(self.classes))
            if bad.any():
                raise ValueError(f"'{path}' has labels outside 0..{len(self.classes) - 1}")
        test_x = torch.from_numpy(test["images"])                   # (M, S, S, 3) uint8
        if reorder is not None:
            test_x = reorder_tensor(test_x, torch.arange(len(test_x)), **self.reorder_opts)
        # Per-channel statistics of the training images; reordering only moves
        # patches, so every ordering of a dataset is normalised identically.
        mean, std = channel_stats_of(train["images"], source=f"'{path}'")
        dev = torch.device(device)
        # Inputs in torch's default dtype: float32, or float64 where a caller (the
        # equivalence tests) set it, so that float64 models get float64 inputs.
        self.dtype = torch.get_default_dtype()
        self.mean = torch.tensor(mean, dtype=self.dtype, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=self.dtype, device=dev).view(1, 3, 1, 1)
        self.train_x = torch.from_numpy(train["images"]).to(dev)   # (N, S, S, 3) uint8
        self.train_y = torch.from_numpy(train["labels"]).to(dev)   # (N,) int64
        self.test_x = test_x.to(dev)                                # (M, S, S, 3) uint8
        self.test_y = torch.from_numpy(test["labels"]).to(dev)     # (M,) int64

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S) (channels-last on CUDA)."""
        x = (images.permute(0, 3, 1, 2).to(self.dtype) - self.mean) / self.std
        if x.is_cuda:  # NHWC memory is what tensor cores want; the permute already is
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


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
    dev_idx = idx.to(data.train_x.device)
    images = data.train_x[dev_idx]                             # (B, S, S, 3) uint8
    if data.reorder_opts is not None:
        images = reorder_tensor(images, idx, **data.reorder_opts)
    return data.to_input(images), data.train_y[dev_idx]


class Prefetch:
    """The batches of steps ``start`` .. ``stop - 1``, each prepared on a background thread
    while the step before it trains."""

    def __init__(self, fetch, start: int, stop: int):
        self.fetch, self.stop = fetch, stop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="porder-batch")
        self.next = self.pool.submit(fetch, start) if start < stop else None

    def get(self, step: int):
        """The batch of ``step`` and the seconds waited for it; starts preparing the next."""
        t0 = time.perf_counter()
        batch = self.next.result()
        waited = time.perf_counter() - t0
        self.next = self.pool.submit(self.fetch, step + 1) if step + 1 < self.stop else None
        return batch, waited

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
